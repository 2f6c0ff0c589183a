"""A Reinforcement Learning Framework for Robust and Secure LLM Watermarking (An et al., EACL 2026).

A frozen tiny GPT-2 (Ray Train, cached) continues stdlib docstring prompts. The policy is the
split encoder of :mod:`learned_split` (causal GRU → D dims → sign_ste → fixed vocabulary map); the
watermark multiplies logits by (1 + δ·g) under the entropy gate, and the detector scores
s(x) = mean_{t∈S} g_t[x_t]. GRPO (G rollouts per prompt) trains only the encoder, on the anchored
rewards of the development code (V2) plus the anti-collapse regulariser:
    d1 = s(wm) − s(orig)                                    detectability vs the unwatermarked text
    d2 = s(para(wm)) − mean[s(senti(wm)), s(latter(wm)), s(hate(wm))]   robustness − spoofing
    reg = |ĝ(wm) − ½|,  ĝ = share of the vocabulary that is green       (green-fraction collapse)
    advantage reward  r = mm(d1) + mm(d2) + λ·mm(−reg)   (mm = min-max within the group)
    A_i = (r_i − mean_G r) / std_G r
    loss = L_pg(A, log π under the biased logits, clip c) + L_rg(r̃ = d1 + d2 − λ·reg, differentiable)
(:mod:`grpo`); gradients reach the encoder through g (straight-through). Attacks are the offline
simulators of :mod:`text_attacks`. Baseline: KGW (γ = 0.25, δ = 2, h = 1, z-score) on the same LM and
prompts. Reported: AUC of human vs watermarked / paraphrased / spoofed texts, TPR at 1% FPR, the
green fraction, and perplexity of the watermarked text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.engines.grpo import group_advantages, minmax_normalize, policy_loss, reward_gradient_loss
from methods.language_models.corpus import stdlib_docstrings
from methods.language_models.learned_split import (LearnedSplitWatermark, SplitEncoder, detection_mask,
                                                   detection_score, green_fraction, policy_logprobs)
from methods.language_models.lm_pretrain import TinyLMConfig, cached_tokenizer, load_lm, pretrained_lm
from methods.language_models.text_attacks import hate_spoof, paraphrase, sentiment_spoof
from methods.language_models.tiny_lm import generate, pad_rows, strip_generated, token_blocks
from methods.language_models.tokenizer import load_tokenizer, train_bpe_tokenizer
from methods.language_models.watermarks import KGWWatermark
from pipelines import train
from pipelines.claims import compare, per_seed
from pipelines.pipeline import Outputs, Pipeline, Stage
from pipelines.results import columns, group_means, subplots
from pipelines.units import Unit, Work, no_steps, run_units, unit_key, unit_seed

TEXTS = ("wm", "para", "senti", "latter", "hate", "orig")
ATTACKS = ("para", "senti", "latter", "hate")


class RLWatermarkConfig(TinyLMConfig):
    # corpus and LM (TinyLMConfig)
    vocab_size: int = Field(1024, ge=300)
    block: int = Field(64, ge=16)
    pretrain_epochs: int = Field(4, ge=1)
    prompt_tokens: int = Field(16, ge=2)
    continuation_tokens: int = Field(40, ge=8)
    n_train_prompts: int = Field(64, ge=1)
    n_eval: int = Field(32, ge=4)
    # policy and watermark
    embed_dim: int = Field(384, ge=2, description="D of the split (dev code: 384)")
    encoder_hidden: int = Field(64, ge=4)
    delta: float = Field(0.4, ge=0, description="multiplicative bias strength (dev code 0.13 for Llama logits)")
    alpha: float = Field(1.0, ge=0, description="entropy threshold of the gate")
    measure_threshold: int = Field(20, ge=0, description="tokens always watermarked before the gate")
    top_p: float = Field(0.9, gt=0, le=1)
    # GRPO
    iterations: int = Field(30, ge=1)
    batch_prompts: int = Field(4, ge=1)
    group: int = Field(8, ge=2, description="G rollouts per prompt")
    minibatches: int = Field(2, ge=1)
    lr: float = Field(3e-3, gt=0, description="Adam lr of the encoder (dev code 1e-5 for RoBERTa)")
    max_grad_norm: float = Field(0.5, gt=0)
    clip: float = Field(0.2, ge=0, description="PPO ratio clip (0 = unclipped)")
    reward_gradient: bool = Field(True, description="add the differentiable-reward term L_rg")
    reg_weight: float = Field(1.0, ge=0, description="λ of the green-fraction regulariser (0 = none)")
    para_replace: float = Field(0.25, ge=0, le=1)
    para_delete: float = Field(0.05, ge=0, le=1)
    # KGW baseline
    kgw_gamma: float = Field(0.25, gt=0, lt=1)
    kgw_delta: float = Field(2.0, ge=0)
    kgw_context: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.batch_prompts % self.minibatches:
            raise ValueError("batch_prompts must be a multiple of minibatches")
        return self


DEVIATIONS = [
    "frozen LM: 2-layer GPT-2 (d=128) trained on stdlib docstrings, continuing docstring prompts, instead of "
    "Llama-3.1-8B / Qwen paraphrasing C4 texts",
    "policy: a random-init causal GRU encoder over the prefix instead of the pretrained RoBERTa embedding "
    "model of the original text",
    "attacks simulated offline (LM-sampled token replacement + deletion; antonym swaps; inserted phrases) "
    "instead of LLM paraphrase / sentiment / hate attackers",
    "reward: anchored detectability terms of the dev code (V2) + an |ĝ − ½| regulariser [reconstruction]; "
    "no LLM-judge relevance / quality terms, no KL to a reference encoder; final paper rewards unverified",
    "GRPO on token log-probs under the biased logits (earlier dev code; the latest dev code samples "
    "splits as actions); lr 3e-3 for a random-init GRU (dev 1e-5 for a pretrained RoBERTa); PPO clip 0.2 applied",
    "TPR at 1% FPR from the empirical 99th percentile of human-text scores (few texts)",
    "δ = 0.4 instead of 0.13: the tiny LM's top logits are ≈ 5 (Llama's ≈ 20+), so 0.4 gives the top green "
    "tokens about KGW's +2",
]


def prepare(cfg: RLWatermarkConfig, stage: Stage) -> dict:
    """The GRPO loop's inputs: the LM and tokenizer folders (cached) and the prompt sets: prompt ids (N, P)
    and human continuations (N, L)."""
    docs = stdlib_docstrings()
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    tokenizer_dir = cached_tokenizer(stage.storage, train_bpe_tokenizer, docs, cfg.vocab_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    need = cfg.prompt_tokens + cfg.continuation_tokens
    encoded = [tokenizer(d)["input_ids"] for d in docs]
    long = [i for i, e in enumerate(encoded) if len(e) >= need][: cfg.n_train_prompts + cfg.n_eval]
    if len(long) < cfg.n_train_prompts + cfg.n_eval:
        raise ValueError(f"only {len(long)} docstrings have {need} tokens")
    held = set(long)
    stream = [t for i, e in enumerate(encoded) if i not in held for t in e + [tokenizer.eos_token_id]]
    lm_dir = pretrained_lm(token_blocks(stream, cfg.block), tokenizer, cfg.lm_spec(max(cfg.block, need + 32)), cfg,
                           stage.storage, "docstring_lm", stage.log)
    rows = torch.tensor([encoded[i][:need] for i in long])
    split = {"prompt": rows[:, : cfg.prompt_tokens], "human": rows[:, cfg.prompt_tokens :]}
    data = {name: {k: v[sl] for k, v in split.items()}
            for name, sl in (("train", slice(0, cfg.n_train_prompts)), ("eval", slice(cfg.n_train_prompts, None)))}
    return {"data": data, "lm_dir": str(lm_dir), "tokenizer_dir": str(tokenizer_dir)}


@dataclass
class Texts:
    """prompt + continuation rows (right-padded), the continuation mask, the frozen LM's logits and the
    detector's scored tokens S (both fixed: the LM is frozen)."""

    ids: torch.Tensor
    continuation: torch.Tensor
    lm_logits: torch.Tensor
    scored: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, lm, prompts: torch.Tensor, continuations: list[list[int]], pad: int, cfg: RLWatermarkConfig):
        ids, _ = pad_rows([p + c for p, c in zip(prompts.tolist(), continuations)], pad)
        real = _real(ids, prompts.shape[1], continuations)
        continuation = (torch.arange(ids.shape[1])[None] >= prompts.shape[1]) & real.bool()
        lm_logits = lm(input_ids=ids, attention_mask=real).logits.float()
        return cls(ids, continuation, lm_logits,
                   detection_mask(lm_logits, continuation, cfg.alpha, cfg.measure_threshold))

    def rows(self, index) -> "Texts":
        return Texts(self.ids[index], self.continuation[index], self.lm_logits[index], self.scored[index])


def _real(ids: torch.Tensor, prompt_len: int, conts: list[list[int]]) -> torch.Tensor:
    """Attention mask of right-padded prompt + continuation rows."""
    ends = torch.tensor([prompt_len + len(c) for c in conts])[:, None]
    return (torch.arange(ids.shape[1])[None] < ends).long()


def all_texts(lm, tokenizer, prompts: torch.Tensor, wm: list[list[int]], human: torch.Tensor,
              cfg: RLWatermarkConfig, seed: int) -> Texts:
    """Rows in blocks of len(wm): watermarked, its four attacked versions, the human continuation (TEXTS)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids, _ = pad_rows([p + c for p, c in zip(prompts.tolist(), wm)], tokenizer.pad_token_id)
    with torch.no_grad():
        probs = lm(input_ids=ids, attention_mask=_real(ids, prompts.shape[1], wm)).logits.softmax(-1)
    p, cap = prompts.shape[1], cfg.continuation_tokens + 16
    conts: dict[str, list[list[int]]] = {"wm": wm, **{k: [] for k in ATTACKS}, "orig": human.tolist()}
    for i, cont in enumerate(wm):
        conts["para"].append(paraphrase(cont, probs[i, p - 1 : p - 1 + len(cont)], generator, cfg.para_replace,
                                        cfg.para_delete) or cont[:1])
        text = tokenizer.decode(cont)
        for name, edited in (("senti", sentiment_spoof(text, rng)), ("latter", sentiment_spoof(text, rng, True)),
                             ("hate", hate_spoof(text, rng))):
            conts[name].append(tokenizer(edited)["input_ids"][:cap] or cont[:1])
    rows = [c for name in TEXTS for c in conts[name]]
    return Texts.build(lm, torch.cat([prompts] * len(TEXTS)), rows, tokenizer.pad_token_id, cfg)


def split_scores(policy, texts: Texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, ĝ, green) of every text under the policy's split (grad follows the caller's grad mode)."""
    green = policy(texts.ids)
    return detection_score(green, texts.ids, texts.scored), green_fraction(green, texts.scored), green


def blocks(values: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    return {name: values[i * n : (i + 1) * n] for i, name in enumerate(TEXTS)}


def rewards(s: dict[str, torch.Tensor], frac: torch.Tensor, reg_weight: float) -> dict[str, torch.Tensor]:
    d1 = s["wm"] - s["orig"]
    d2 = s["para"] - (s["senti"] + s["latter"] + s["hate"]) / 3
    reg = (frac - 0.5).abs()
    return {"d1": d1, "d2": d2, "reg": reg, "total": d1 + d2 - reg_weight * reg}


def watermarked_generation(lm, policy, prompts: torch.Tensor, cfg: RLWatermarkConfig, seed: int, tokenizer
                           ) -> list[list[int]]:
    wm = LearnedSplitWatermark(policy, prompts.shape[1], cfg.delta, cfg.alpha, cfg.measure_threshold)
    return continuations(generate(lm, prompts, cfg.continuation_tokens, do_sample=True, top_p=cfg.top_p,
                                  logits_processors=[wm], seed=seed), tokenizer.eos_token_id, tokenizer.pad_token_id)


def continuations(generated: torch.Tensor, eos: int, pad: int) -> list[list[int]]:
    """Generated rows up to their EOS, pads removed; an empty row becomes [EOS] (every text scores ≥ 1 token)."""
    return [strip_generated(row, eos, pad) or [eos] for row in generated.tolist()]


def grpo_step(lm, policy, optimizer, tokenizer, prompts: torch.Tensor, human: torch.Tensor, cfg: RLWatermarkConfig,
              seed: int, reg_weight: float) -> dict[str, float]:
    """One GRPO iteration on ``prompts`` (B, P): G rollouts each, rewards, then ``minibatches`` updates."""
    group = cfg.group
    prompts_g = prompts.repeat_interleave(group, dim=0)
    policy.eval()
    with torch.no_grad():
        wm = watermarked_generation(lm, train.unwrap(policy), prompts_g, cfg, seed, tokenizer)
        texts = all_texts(lm, tokenizer, prompts_g, wm, human.repeat_interleave(group, dim=0), cfg, seed)
        n = len(wm)
        s_all, frac_all, green = split_scores(policy, texts)
        s = blocks(s_all, n)
        r = rewards(s, frac_all[:n], reg_weight)
        grouped = lambda x: x.view(len(prompts), group)  # noqa: E731
        shaped = (minmax_normalize(grouped(r["d1"])) + minmax_normalize(grouped(r["d2"]))
                  + reg_weight * minmax_normalize(grouped(-r["reg"])))
        advantages = group_advantages(shaped).flatten()
        wm_texts = texts.rows(slice(0, n))
        old = policy_logprobs(wm_texts.lm_logits, green[:n], wm_texts.ids, wm_texts.continuation, cfg.delta,
                              cfg.alpha, cfg.measure_threshold)
    policy.train()
    for chunk in torch.arange(len(prompts)).chunk(min(cfg.minibatches, len(prompts))):
        rows = torch.cat([torch.arange(p * group, (p + 1) * group) for p in chunk.tolist()])
        m = len(rows)
        sub = texts.rows(torch.cat([rows + i * n for i in range(len(TEXTS))]))
        s_mb, frac_mb, green_mb = split_scores(policy, sub)
        new = policy_logprobs(sub.lm_logits[:m], green_mb[:m], sub.ids[:m], sub.continuation[:m], cfg.delta,
                              cfg.alpha, cfg.measure_threshold)
        mask = sub.continuation[:m, 1:].float()
        loss = policy_loss(new, old[rows], advantages[rows], mask, cfg.clip)
        if cfg.reward_gradient:
            r_new = rewards(blocks(s_mb, m), frac_mb[:m], reg_weight)["total"]
            loss = loss + reward_gradient_loss(r_new, torch.exp(new - old[rows]), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
    return {"reward": float(r["total"].mean()), "d1": float(r["d1"].mean()), "d2": float(r["d2"].mean()),
            "green_fraction": float(frac_all[:n].mean()), **{f"s_{k}": float(v.mean()) for k, v in s.items()}}


@dataclass(frozen=True)
class Run:
    """A unit of the plan at ``seed``: the KGW baseline (``reg_weight`` None) or GRPO with λ = ``reg_weight``."""

    seed: int
    reg_weight: float | None = None

    @property
    def key(self) -> str:
        return unit_key(("kgw", self.seed) if self.reg_weight is None else ("rl", self.seed, self.reg_weight))

    @property
    def arm(self) -> str:
        return "kgw" if self.reg_weight is None else f"rl_reg{self.reg_weight:g}"


def plan(cfg: RLWatermarkConfig, reg_weights: list[float]) -> list[Run]:
    return [run for seed in cfg.seed_range() for run in [Run(seed), *(Run(seed, w) for w in reg_weights)]]


def _seed(*parts) -> int:
    return unit_seed(unit_key(parts))


def grpo_loop(config: dict) -> None:
    """Ray Train worker: per seed the KGW baseline, then a GRPO run of the encoder per regulariser weight."""
    cfg = RLWatermarkConfig(**config["cfg"])
    session = train.WorkerSession(config)
    lm, tokenizer = load_lm(config["lm_dir"]), load_tokenizer(config["tokenizer_dir"])
    train_set, eval_set = config["data"]["train"], config["data"]["eval"]

    def start(seed: int) -> Work:
        torch.manual_seed(_seed("encoder", seed))
        encoder = SplitEncoder(len(tokenizer), cfg.embed_dim, cfg.encoder_hidden)
        return Work(saved=("encoder", "optimizer", "history"), encoder=encoder,
                    optimizer=torch.optim.Adam(encoder.parameters(), lr=cfg.lr), ddp=train.prepare(encoder), history=[])

    def iteration(work: Work, it: int, run: Run) -> dict:
        idx = torch.randperm(len(train_set["prompt"]), generator=torch.Generator().manual_seed(_seed(run.seed, it)))
        idx = idx[: cfg.batch_prompts][session.rank :: session.world_size]
        stats = grpo_step(lm, work.ddp, work.optimizer, tokenizer, train_set["prompt"][idx], train_set["human"][idx],
                          cfg, _seed(run.seed, it, session.rank), run.reg_weight)
        work.history.append(stats)
        return {"iteration": it + 1, **stats}

    def unit(run: Run) -> Unit:
        if run.reg_weight is None:
            return Unit(run.key, 0, lambda done: Work(), no_steps,
                        lambda work, done: evaluate_kgw(lm, tokenizer, eval_set, cfg, run.seed))
        return Unit(run.key, cfg.iterations, lambda done: start(run.seed), lambda work, it: iteration(work, it, run),
                    lambda work, done: {**evaluate_rl(lm, tokenizer, work.encoder, eval_set, cfg, run.seed),
                                        "history": work.history}, step_name="iteration")

    run_units(session, [unit(run) for run in plan(cfg, config["reg_weights"])])


def detection_metrics(scores: torch.Tensor, n: int) -> dict[str, float]:
    """AUC of human ('orig') vs each text kind of the TEXTS blocks of ``scores``, TPR at the empirical 1% FPR
    threshold of human texts."""
    from sklearn.metrics import roc_auc_score

    s = {k: v.tolist() for k, v in blocks(scores, n).items()}
    threshold = np.quantile(np.asarray(s["orig"]), 0.99)
    out = {f"auc_{k}": float(roc_auc_score([0] * len(s["orig"]) + [1] * len(s[k]), s["orig"] + s[k]))
           for k in ("wm", *ATTACKS)}
    out["auc_spoof"] = float(np.mean([out["auc_senti"], out["auc_latter"], out["auc_hate"]]))
    out.update({f"tpr_{k}": float((np.asarray(s[k]) > threshold).mean()) for k in ("wm", *ATTACKS)})
    return out


@torch.no_grad()
def perplexity(lm, prompts: torch.Tensor, conts: list[list[int]], pad: int) -> float:
    """exp(mean NLL) of the continuation tokens under the (unbiased) LM."""
    ids, _ = pad_rows([p + c for p, c in zip(prompts.tolist(), conts)], pad)
    real = _real(ids, prompts.shape[1], conts)
    logits = lm(input_ids=ids, attention_mask=real).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return float(nll[real[:, 1:].bool() & (torch.arange(1, ids.shape[1]) >= prompts.shape[1])].mean().exp())


@torch.no_grad()
def evaluate_rl(lm, tokenizer, encoder: SplitEncoder, data: dict, cfg: RLWatermarkConfig, seed: int
                ) -> dict[str, float]:
    encoder.eval()
    wm = watermarked_generation(lm, encoder, data["prompt"], cfg, _seed("eval", seed), tokenizer)
    texts = all_texts(lm, tokenizer, data["prompt"], wm, data["human"], cfg, _seed("attack", seed))
    s, frac, _ = split_scores(encoder, texts)
    return {**detection_metrics(s, len(wm)), "green_fraction_human": float(blocks(frac, len(wm))["orig"].mean()),
            "green_fraction_wm": float(frac[: len(wm)].mean()),
            "ppl_wm": perplexity(lm, data["prompt"], wm, tokenizer.pad_token_id)}


@torch.no_grad()
def evaluate_kgw(lm, tokenizer, data: dict, cfg: RLWatermarkConfig, seed: int) -> dict[str, float]:
    """KGW on the same LM and prompts (lefthash seeding, h = ``kgw_context``), z-scores of the continuations."""
    kgw = KGWWatermark(lm.config.vocab_size, cfg.kgw_gamma, cfg.kgw_delta, cfg.kgw_context, key=15485863 + seed,
                       seeding="lefthash", bos_token_id=tokenizer.bos_token_id)
    prompts, pad, eos = data["prompt"], tokenizer.pad_token_id, tokenizer.eos_token_id
    sample = lambda processors, name: continuations(generate(  # noqa: E731
        lm, prompts, cfg.continuation_tokens, do_sample=True, top_p=cfg.top_p, logits_processors=processors,
        seed=_seed(name, seed)), eos, pad)
    wm, plain = sample([kgw], "eval"), sample([], "plain")
    texts = all_texts(lm, tokenizer, prompts, wm, data["human"], cfg, _seed("attack", seed))
    z = [kgw.detect(row[: int(cont.sum()) + prompts.shape[1]].tolist(), first_scored=prompts.shape[1]).z_score
         for row, cont in zip(texts.ids, texts.continuation)]
    return {**detection_metrics(torch.tensor(z), len(wm)), "green_fraction_human": cfg.kgw_gamma,
            "green_fraction_wm": cfg.kgw_gamma, "ppl_wm": perplexity(lm, prompts, wm, pad),
            "ppl_plain": perplexity(lm, prompts, plain, pad)}


@dataclass(frozen=True)
class Results:
    """One row per (arm, seed) (arms ``kgw`` and ``rl_reg<λ>``) and one per GRPO iteration of each RL arm."""

    table: dict[str, np.ndarray]
    history: dict[str, np.ndarray]


def execute(cfg: RLWatermarkConfig, stage: Stage) -> Results:
    """KGW and GRPO with ``reg_weight`` on Ray Train; a claim check runs GRPO with and without the regulariser."""
    reg_weights = [cfg.reg_weight or 1.0, 0.0] if stage.claims else [cfg.reg_weight]
    inputs, runs = prepare(cfg, stage), plan(cfg, reg_weights)
    stage.log(f"{len(runs)} units (KGW baseline + GRPO runs per seed) on Ray Train")
    done = stage.fit(grpo_loop, {"cfg": cfg.model_dump(), "reg_weights": reg_weights, **inputs}, cfg)["done"]
    table = columns([{"arm": run.arm, "seed": run.seed, **{k: v for k, v in done[run.key].items()
                                                            if k != "history"}} for run in runs])
    history = columns([{"arm": run.arm, "seed": run.seed, "iteration": it + 1, **stats} for run in runs
                       for it, stats in enumerate(done[run.key].get("history", []))])
    return Results(table, history)


def plot(table: dict, history: dict):
    fig, axes = subplots(1, 3, figsize=(15, 4), layout="constrained")
    kinds, arms = ["wm", *ATTACKS], list(dict.fromkeys(table["arm"]))
    for j, arm in enumerate(arms):
        axes[0].bar(np.arange(len(kinds)) + j / (len(arms) + 1), [table[f"auc_{k}"][table["arm"] == arm].mean()
                                                                  for k in kinds], width=1 / (len(arms) + 1), label=arm)
    axes[0].set_xticks(np.arange(len(kinds)) + 0.3, kinds)
    axes[0].set_ylabel("AUC vs human text (spoofs: lower = more secure)")
    for arm in dict.fromkeys(history["arm"]):
        rows = history["arm"] == arm
        for ax, key in ((axes[1], "reward"), (axes[2], "green_fraction")):
            ax.plot(history["iteration"][rows], history[key][rows], ".", alpha=0.6, label=arm)
    axes[1].set(xlabel="GRPO iteration", ylabel="GRPO reward (d1 + d2 − λ·reg)")
    axes[2].set(xlabel="GRPO iteration", ylabel="green fraction ĝ of the watermarked texts")
    axes[2].axhline(0.5, color="k", ls="--", lw=1)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("RL watermark vs KGW: detection, robustness, spoofing; training curves")
    return fig


def outputs(cfg: RLWatermarkConfig, results: Results) -> Outputs:
    """The per-arm results and the GRPO curves, their plot, and the mean over seeds per arm."""
    return Outputs(tables={"results": results.table, "history": results.history},
                   figures={"rl_watermark.png": plot(results.table, results.history)},
                   metrics={"by_arm": group_means(results.table, "arm")})


def claims(cfg: RLWatermarkConfig, results: Results, outputs: Outputs) -> list:
    """RL split (with and without the regulariser) vs KGW on the same LM and prompts, paired by seed."""
    table, reg = results.table, cfg.reg_weight or 1.0
    rl, bare = f"rl_reg{reg:g}", "rl_reg0"

    def arms(name: str) -> tuple[dict, dict]:
        return per_seed(table, name, arm=rl), per_seed(table, name, arm="kgw")

    def drift(arm: str) -> dict:
        return {seed: abs(g - 0.5) for seed, g in per_seed(table, "green_fraction_wm", arm=arm).items()}

    return [
        compare("the learned split resists spoofing better than KGW", "AUC human vs spoofed watermarked text (mean "
                "of sentiment, latter-half sentiment and hate edits; lower = more secure; rule: RL < KGW − 0.05)",
                *arms("auc_spoof"), higher_is_better=False, margin=0.05,
                why="0.05 AUC, a tenth of the way from a perfect detector (1) to chance (0.5)"),
        compare("the learned split is about as detectable as KGW", "AUC human vs watermarked text "
                "(rule: RL > KGW − 0.1)", *arms("auc_wm"), margin=-0.1,
                why="'about as detectable': not worse by more than 0.1 AUC, a fifth of the way to chance"),
        compare("the learned split is about as robust to paraphrase as KGW", "AUC human vs paraphrased watermarked "
                "text (rule: RL > KGW − 0.1)", *arms("auc_para"), margin=-0.1,
                why="'about as robust': not worse by more than 0.1 AUC, a fifth of the way to chance"),
        compare("without the regulariser the green fraction drifts from ½ (reward hacking)",
                f"|ĝ − ½| of the watermarked texts: no regulariser (method) vs λ = {reg:g} (baseline); "
                "rule: > baseline + 0.05", drift(bare), drift(rl), margin=0.05,
                why="a tenth of the way from ½ to a collapsed split (ĝ = 0 or 1)"),
    ]


PIPELINE = Pipeline(
    config=RLWatermarkConfig,
    execute=execute,
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: (f"{cfg.seeds} seeds, {cfg.iterations} GRPO iterations × {cfg.batch_prompts} prompts × "
                        f"G = {cfg.group}, {cfg.n_eval} evaluation prompts"),
    # one Tune trial: one GRPO run; reports the reward every iteration
    trial=lambda cfg: cfg.model_copy(update={"seeds": 1}),
    sweep_metric="reward",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 2, "iterations": 60, "batch_prompts": 4, "group": 4, "n_eval": 32, "pretrain_epochs": 3},
        "full": {"seeds": 5, "iterations": 200, "batch_prompts": 8, "group": 8, "n_train_prompts": 256,
                 "n_eval": 100, "pretrain_epochs": 8, "lm_layers": 2},
    },
)
