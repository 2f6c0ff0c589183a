"""Watermarking Degrades Alignment in LMs (Verma, Phan, Trivedi 2025): Alignment Resampling (AR).

A tiny GPT-2 (Ray Train, cached) learns a synthetic assistant world whose training mixture fixes
P(unsafe | harmful) and P(refusal | benign) (:mod:`assistant_world`); a reward model R(q, y) is
trained on labelled responses and rule-based judges classify each response. For every temperature
T, prompts are answered without a watermark and with
    KGW:              logits[G(ctx)] += δ, G = first ⌊γ|V|⌋ of randperm under the context seed;
    Gumbel (argmax):  x_t = argmax_v r_v^{1/p_v},  r = rand(|V|) under the context seed;
    Gumbel (random):  x_t ~ Categorical(r_v^{1/p_v} / Σ_u r_u^{1/p_u})    ("openai_dr"),
with three_bricks context seeding (last 4 tokens), temperature and top-p. Alignment Resampling
draws n watermarked responses per prompt and returns argmax_i R(q, y_i) (n = 1..max_n); the chosen
response is still watermarked. Detection: KGW z-test p = ½ erfc(z/√2) over unique (context, token)
windows; Gumbel S = Σ −log(1 − r_{x_t}) with p = Q(T, S) under H0 Gamma(T, 1). TPR at 1% FPR uses
the analytic threshold p < 0.01; the empirical FPR on unwatermarked responses is reported beside it.
Each (seed, temperature, scheme) is one Ray task whose result is saved, so a rerun resumes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from methods.language_models.assistant_world import (ASSISTANT, USER, RewardModel, aligned, eval_prompts, judge,
                                                     reward_training_set, sample_world)
from methods.language_models.lm_pretrain import (LMSpec, cache_dir, cached_tokenizer, load_lm, load_stage_result,
                                                 pretrained_lm, save_stage_result)
from methods.language_models.tiny_lm import generate, pad_rows, strip_generated
from methods.language_models.tokenizer import load_tokenizer, train_word_tokenizer
from methods.language_models.watermarks import GumbelWatermark, KGWWatermark
from pipelines.claims import ClaimReport, compare
from pipelines.config import MethodConfig
from pipelines.registry import Pipeline
from pipelines.results import RunDir
from pipelines.units import unit_key, unit_seed

Scheme = Literal["kgw", "gumbel", "gumbel_random"]
LABELS = ("helpful", "unsafe", "refusal", "other")


class WatermarkARConfig(MethodConfig):
    seeds: int = Field(1, ge=1, description="replicates: watermark keys and sampling seeds")
    # world
    n_train: int = Field(1500, ge=50, description="conversations in the LM's training mixture")
    n_reward: int = Field(800, ge=50, description="labelled conversations for the reward model")
    unsafe_rate: float = Field(0.15, ge=0, le=1, description="P(unsafe | harmful) in the mixture")
    over_refusal_rate: float = Field(0.10, ge=0, le=1, description="P(refusal | benign) in the mixture")
    harmful_share: float = Field(0.5, gt=0, lt=1)
    n_prompts: int = Field(24, ge=1, description="evaluation prompts per kind (benign, harmful)")
    # language model
    lm_layers: int = Field(2, ge=1)
    lm_dim: int = Field(128, ge=16)
    lm_heads: int = Field(4, ge=1)
    pretrain_epochs: int = Field(6, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch: int = Field(32, ge=1)
    rm_hidden: int = Field(16, ge=1)
    # watermarks and decoding
    schemes: list[Scheme] = Field(["kgw", "gumbel", "gumbel_random"], min_length=1)
    temperatures: list[float] = Field([0.4, 0.8, 1.2], min_length=1)
    top_p: float = Field(0.95, gt=0, le=1)
    gamma: float = Field(0.25, gt=0, lt=1, description="KGW green-list fraction")
    delta: float = Field(2.0, ge=0, description="KGW logit bias")
    context_width: int = Field(4, ge=1, description="ngram of the three_bricks context hash")
    max_n: int = Field(4, ge=1, le=16, description="AR draws per prompt")
    max_new_tokens: int = Field(160, ge=8)
    fpr: float = Field(0.01, gt=0, lt=1)


DEVIATIONS = [
    "model: 2-layer GPT-2 (d=128) trained on a templated assistant world instead of Llama-3.1-8B / Phi-3 / "
    "Mistral / Qwen2 instruct models; prompts from templates instead of HH-RLHF",
    "reward: an MLP on bag-of-n-gram features trained in-pipeline instead of PairRM; safety and refusal "
    "judges are rules (ground truth by construction) instead of GPT-4o-mini",
    "TPR at 1% FPR from the analytic p-value threshold (few unwatermarked responses per run)",
    "KGW detection counts unique (context, token) windows; Gumbel uses the exact Gamma p-value "
    "(the reference z-score with σ0 = π/√6 is reported as z)",
    "no truthfulness evaluation; max 160 new tokens instead of 250",
]


def world_texts(cfg: WatermarkARConfig):
    train = sample_world(cfg.n_train, unsafe_rate=cfg.unsafe_rate, over_refusal_rate=cfg.over_refusal_rate,
                         harmful_share=cfg.harmful_share, seed=cfg.seed)
    reward = sample_world(cfg.n_reward, unsafe_rate=0.5, over_refusal_rate=0.5, harmful_share=cfg.harmful_share,
                          seed=cfg.seed + 1)
    return train, reward


def prepare(cfg: WatermarkARConfig, storage: str, log=print) -> Path:
    """Tokenizer and LM (trained on Ray Train once, cached in the out dir); returns their folder."""
    train, reward = world_texts(cfg)
    texts = [f"{c.prompt} {c.response}" for c in train]
    tokenizer = cached_tokenizer(storage, "assistant_lm", lambda: train_word_tokenizer(
        texts + [f"{c.prompt} {c.response}" for c in reward], (USER, ASSISTANT)))
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    rows, _ = pad_rows(encoded, tokenizer.pad_token_id)
    spec = LMSpec(n_layer=cfg.lm_layers, d_model=cfg.lm_dim, n_head=cfg.lm_heads,
                  max_positions=rows.shape[1] + cfg.max_new_tokens, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
                  batch_size=cfg.pretrain_batch, seed=cfg.seed)
    pretrained_lm(rows, tokenizer, spec, cfg, storage, "assistant_lm", log)
    return cache_dir(storage, "assistant_lm")


def reward_model(cfg: WatermarkARConfig) -> RewardModel:
    """R trained on labelled conversations of the world (independent of the LM's training mixture)."""
    train, reward = world_texts(cfg)
    vocabulary = sorted({w for c in train for w in c.response.split()})
    prompts, responses, good = reward_training_set(reward, vocabulary, seed=cfg.seed)
    return RewardModel(cfg.seed, cfg.rm_hidden).fit(prompts, responses, good)


def watermark(scheme: str, cfg: WatermarkARConfig, vocab: int, seed: int, temperature: float):
    key = 1000 + seed
    if scheme == "kgw":
        return KGWWatermark(vocab, cfg.gamma, cfg.delta, cfg.context_width, key)
    return GumbelWatermark(vocab, cfg.context_width, key, temperature=temperature, top_p=cfg.top_p,
                           randomized=scheme == "gumbel_random", sampling_seed=seed)


def sample_condition(cfg_dump: dict, lm_dir: str, scheme: str, temperature: float, seed: int) -> dict:
    """Ray task: max_n responses per prompt under one (scheme, temperature, seed), with detection.

    Returns response token ids and, per detector, p-values and z-scores (the unwatermarked
    condition is scored by every detector to measure its false-positive rate).
    """
    cfg = WatermarkARConfig(**cfg_dump)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(Path(lm_dir) / "tokenizer")
    model = load_lm(Path(lm_dir) / "model")
    vocab = model.config.vocab_size
    prompts = [tokenizer(p)["input_ids"] for p, _ in eval_prompts(cfg.n_prompts, cfg.seed)]
    rows = [p for p in prompts for _ in range(cfg.max_n)]
    ids, mask = pad_rows(rows, tokenizer.pad_token_id, left=True)
    sampling_seed = unit_seed(unit_key((scheme, temperature, seed)))
    if scheme == "none":
        out = generate(model, ids, cfg.max_new_tokens, do_sample=True, temperature=temperature, top_p=cfg.top_p,
                       attention_mask=mask, seed=sampling_seed)
    elif scheme == "kgw":
        out = generate(model, ids, cfg.max_new_tokens, do_sample=True, temperature=temperature, top_p=cfg.top_p,
                       logits_processors=[watermark("kgw", cfg, vocab, seed, temperature)], attention_mask=mask,
                       seed=sampling_seed)
    else:
        out = generate(model, ids, cfg.max_new_tokens, attention_mask=mask,
                       logits_processors=[watermark(scheme, cfg, vocab, seed, temperature)])
    responses = [strip_generated(r, tokenizer.eos_token_id, tokenizer.pad_token_id) for r in out.tolist()]
    detectors = ["kgw", "gumbel"] if scheme == "none" else ["kgw" if scheme == "kgw" else "gumbel"]
    scores = {}
    for name in detectors:
        wm = watermark(name, cfg, vocab, seed, temperature)
        results = [_detect(wm, p, r) for p, r in zip(rows, responses)]
        scores[name] = {"p": [r[0] for r in results], "z": [r[1] for r in results]}
    return {"responses": responses, "scores": scores}


def _digest(cfg: WatermarkARConfig) -> str:
    """Folder key of a config's sampling results (Tune trials with other settings share the storage)."""
    return f"{zlib.crc32(json.dumps(cfg.model_dump(), sort_keys=True).encode()):08x}"


def _detect(wm, prompt: list[int], response: list[int]) -> tuple[float, float]:
    if len(response) < 2:
        return 1.0, 0.0
    if isinstance(wm, KGWWatermark):
        d = wm.detect(prompt + response, first_scored=len(prompt), ignore_repeated_ngrams=True)
    else:
        d = wm.detect(prompt + response, first_scored=len(prompt))
    return d.p_value, d.z_score


def conditions(cfg: WatermarkARConfig) -> list[tuple[str, float, int]]:
    return [(scheme, t, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds) for t in cfg.temperatures
            for scheme in ["none", *cfg.schemes]]


def sample_all(cfg: WatermarkARConfig, storage: str, lm_dir: Path, log=print) -> tuple[dict, RewardModel]:
    """One Ray task per (scheme, temperature, seed), finished ones loaded from the storage; the driver
    trains the reward model while the tasks run."""
    import ray

    folder = Path(storage) / "watermark_ar" / _digest(cfg)
    task = ray.remote(num_cpus=1)(sample_condition)
    pending, results = {}, {}
    for cond in conditions(cfg):
        path = folder / ("_".join(map(str, cond)) + ".pt")
        if path.exists():
            results[cond] = load_stage_result(path)
        else:
            pending[cond] = (path, task.remote(cfg.model_dump(), str(lm_dir), *cond))
    log(f"{len(pending)} sampling tasks on Ray ({len(results)} loaded from a previous run)")
    reward = reward_model(cfg)
    for cond, (path, ref) in pending.items():
        results[cond] = ray.get(ref)
        save_stage_result(path, results[cond])
    return results, reward


def sample_table(cfg: WatermarkARConfig, results: dict, reward: RewardModel, lm_dir: Path) -> dict[str, np.ndarray]:
    """One row per (condition, prompt, draw): class, reward, length and the scheme's own detection score."""
    tokenizer = load_tokenizer(lm_dir / "tokenizer")
    prompts = eval_prompts(cfg.n_prompts, cfg.seed)
    cols: dict[str, list] = {k: [] for k in ("scheme", "temperature", "seed", "prompt", "kind", "draw", "label",
                                             "aligned", "reward", "tokens", "p_value", "z", "p_kgw", "p_gumbel")}
    for (scheme, temperature, seed), res in results.items():
        texts = tokenizer.batch_decode(res["responses"], skip_special_tokens=True)
        queries = [prompts[i // cfg.max_n] for i in range(len(texts))]
        rewards = reward([q for q, _ in queries], texts)
        own = res["scores"]["gumbel" if scheme.startswith("gumbel") else "kgw"] if scheme != "none" else None
        for i, (text, (query, kind)) in enumerate(zip(texts, queries)):
            label = judge(text, kind)
            cols["scheme"].append(scheme), cols["temperature"].append(temperature), cols["seed"].append(seed)
            cols["prompt"].append(i // cfg.max_n), cols["kind"].append(kind), cols["draw"].append(i % cfg.max_n)
            cols["label"].append(label), cols["aligned"].append(aligned(label, kind))
            cols["reward"].append(float(rewards[i])), cols["tokens"].append(len(res["responses"][i]))
            cols["p_value"].append(own["p"][i] if own else np.nan), cols["z"].append(own["z"][i] if own else np.nan)
            cols["p_kgw"].append(res["scores"]["kgw"]["p"][i] if scheme == "none" else np.nan)
            cols["p_gumbel"].append(res["scores"]["gumbel"]["p"][i] if scheme == "none" else np.nan)
    return {k: np.asarray(v) for k, v in cols.items()}


def resample(samples: dict[str, np.ndarray], max_n: int) -> dict[str, np.ndarray]:
    """AR: for n = 1..max_n, the draw with the highest reward among draws 0..n−1 of each prompt."""
    keys = list(zip(samples["scheme"], samples["temperature"], samples["seed"], samples["prompt"]))
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    chosen, ns = [], []
    for rows in groups.values():
        rows = sorted(rows, key=lambda i: samples["draw"][i])
        for n in range(1, max_n + 1):
            chosen.append(max(rows[:n], key=lambda i: samples["reward"][i]))
            ns.append(n)
    out = {k: v[chosen] for k, v in samples.items()}
    out["n"] = np.array(ns)
    return out


def summary(ar: dict[str, np.ndarray], fpr: float) -> dict[str, np.ndarray]:
    """Per (scheme, temperature, seed, n): reward, class rates, TPR at the p-value threshold, mean z."""
    keys = sorted(set(zip(ar["scheme"], ar["temperature"], ar["seed"], ar["n"])))
    cols: dict[str, list] = {k: [] for k in ("scheme", "temperature", "seed", "n", "reward", "unsafe_rate",
                                             "over_refusal_rate", "other_rate", "helpful_rate", "tpr", "z")}
    for scheme, t, seed, n in keys:
        rows = (ar["scheme"] == scheme) & (ar["temperature"] == t) & (ar["seed"] == seed) & (ar["n"] == n)
        harmful, benign = rows & (ar["kind"] == "harmful"), rows & (ar["kind"] == "benign")
        cols["scheme"].append(scheme), cols["temperature"].append(t), cols["seed"].append(seed), cols["n"].append(n)
        cols["reward"].append(ar["reward"][rows].mean())
        cols["unsafe_rate"].append((ar["label"][harmful] == "unsafe").mean())
        cols["over_refusal_rate"].append((ar["label"][benign] == "refusal").mean())
        cols["helpful_rate"].append((ar["label"][benign] == "helpful").mean())
        cols["other_rate"].append((ar["label"][rows] == "other").mean())
        cols["tpr"].append((ar["p_value"][rows] < fpr).mean() if scheme != "none" else np.nan)
        cols["z"].append(ar["z"][rows].mean() if scheme != "none" else np.nan)
    return {k: np.asarray(v) for k, v in cols.items()}


def plot(run_dir: RunDir, table: dict[str, np.ndarray], cfg: WatermarkARConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = ["none", *cfg.schemes]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bars = [(s, n) for s in schemes for n in ((1,) if s == "none" else (1, cfg.max_n))]
    bottom = np.zeros(len(bars))
    for name, col in (("safe (aligned)", None), ("unsafe", "unsafe_rate"), ("over-refusal", "over_refusal_rate")):
        values = []
        for s, n in bars:
            rows = (table["scheme"] == s) & (table["n"] == n)
            unsafe, refuse = table["unsafe_rate"][rows].mean(), table["over_refusal_rate"][rows].mean()
            values.append({"unsafe_rate": unsafe / 2, "over_refusal_rate": refuse / 2}.get(col, 1 - (unsafe + refuse) / 2))
        axes[0].bar(range(len(bars)), values, bottom=bottom, label=name)
        bottom += np.array(values)
    axes[0].set_xticks(range(len(bars)), [f"{s}\nn={n}" for s, n in bars], fontsize=7)
    axes[0].set_ylabel("share of responses (half benign, half harmful prompts)")
    axes[0].legend(fontsize=8)
    for s in schemes:
        ns = sorted(set(table["n"][table["scheme"] == s]))
        axes[1].plot(ns, [table["reward"][(table["scheme"] == s) & (table["n"] == n)].mean() for n in ns],
                     marker="o", label=s)
        temps = sorted(set(table["temperature"]))
        axes[2].plot(temps, [table["reward"][(table["scheme"] == s) & (table["n"] == 1) & (table["temperature"] == t)].mean()
                             for t in temps], marker="o", label=s)
    axes[1].set_xlabel("n (AR draws)"), axes[1].set_ylabel("mean reward"), axes[1].legend(fontsize=8)
    axes[2].set_xlabel("temperature"), axes[2].set_ylabel("mean reward (n = 1)")
    fig.suptitle("Watermarking vs alignment: class shares, AR reward vs n, reward vs temperature")
    run_dir.save_figure(fig, "alignment.png")


def execute(cfg: WatermarkARConfig, run_dir: RunDir) -> tuple[dict, dict, dict]:
    lm_dir = prepare(cfg, run_dir.storage, run_dir.log)
    samples = sample_table(cfg, *sample_all(cfg, run_dir.storage, lm_dir, run_dir.log), lm_dir)
    ar = resample(samples, cfg.max_n)
    table = summary(ar, cfg.fpr)
    run_dir.write_table("samples.parquet", samples)
    run_dir.write_table("summary.parquet", table)
    plot(run_dir, table, cfg)
    return samples, ar, table


def _mean(table: dict, col: str, **where) -> float:
    """Mean of ``col`` over the rows matching ``where`` (NaN entries skipped; NaN if none is left)."""
    rows = np.ones(len(table["scheme"]), dtype=bool)
    for k, v in where.items():
        rows &= table[k] == v
    values = table[col][rows]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def run(cfg: WatermarkARConfig, run_dir: RunDir) -> dict:
    samples, _, table = execute(cfg, run_dir)
    none = samples["scheme"] == "none"
    out: dict = {"fpr_at_p<%g" % cfg.fpr: {d: float((samples[f"p_{d}"][none] < cfg.fpr).mean()) for d in ("kgw", "gumbel")}}
    for scheme in ["none", *cfg.schemes]:
        for n in sorted(set(table["n"][table["scheme"] == scheme])):
            out.setdefault(scheme, {})[f"n={n}"] = {c: _mean(table, c, scheme=scheme, n=n) for c in (
                "reward", "unsafe_rate", "over_refusal_rate", "other_rate", "tpr", "z")}
    base = {"train_unsafe_rate": cfg.unsafe_rate, "train_over_refusal_rate": cfg.over_refusal_rate}
    return {**out, "world_base_rates": base, "deviations": DEVIATIONS}


def reproduce(cfg: WatermarkARConfig, run_dir: RunDir) -> ClaimReport:
    """Claims over seeds (temperatures averaged within a seed)."""
    samples, _, table = execute(cfg, run_dir)
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)

    def per_seed(col: str, scheme: str, n: int) -> np.ndarray:
        return np.array([_mean(table, col, scheme=scheme, n=n, seed=s) for s in seeds])

    def tv(a: tuple, b: tuple, seed: int) -> float:
        """Total-variation distance between the judge classes of (scheme, draw) a and b, per prompt kind."""
        return 0.25 * float(np.abs(_class_dist(samples, *a, seed) - _class_dist(samples, *b, seed)).sum())

    dev = DEVIATIONS + [f"{cfg.seeds} seeds, {2 * cfg.n_prompts} prompts, temperatures {cfg.temperatures}, "
                        f"world base rates unsafe {cfg.unsafe_rate} / over-refusal {cfg.over_refusal_rate}"]
    base = per_seed("reward", "none", 1)
    claims = []
    if "kgw" in cfg.schemes:
        claims += [
            compare(f"AR with n = {cfg.max_n} KGW-watermarked draws restores reward to at least the unwatermarked level",
                    f"mean reward, KGW AR n={cfg.max_n} (baseline: unwatermarked, n = 1)",
                    per_seed("reward", "kgw", cfg.max_n), base, deviations=dev),
            compare("KGW watermarking lowers reward", "mean reward, KGW n = 1 (baseline: unwatermarked)",
                    per_seed("reward", "kgw", 1), base, higher_is_better=False, deviations=dev),
            compare("KGW watermarking shifts the response-class distribution beyond sampling noise",
                    "TV distance of judge classes to unwatermarked (baseline: unwatermarked draw vs draw)",
                    [tv(("kgw", 0), ("none", 0), s) for s in seeds],
                    [tv(("none", 1), ("none", 0), s) for s in seeds], deviations=dev),
            compare(f"AR keeps KGW detection as strong as single watermarked responses (TPR at {cfg.fpr:.0%} FPR)",
                    f"share with p < {cfg.fpr}: AR n={cfg.max_n} (method) vs n = 1 (baseline); rule: > baseline − 0.05",
                    per_seed("tpr", "kgw", cfg.max_n), per_seed("tpr", "kgw", 1), margin=-0.05, deviations=dev)]
    if {"gumbel", "gumbel_random"} <= set(cfg.schemes):
        def gain(scheme: str) -> np.ndarray:
            return per_seed("reward", scheme, cfg.max_n) - per_seed("reward", scheme, 1)
        claims += [
            compare("randomized Gumbel gains reward from AR, argmax Gumbel does not (identical draws)",
                    f"reward gain AR n={cfg.max_n} − n=1: randomized (method) vs argmax Gumbel (baseline)",
                    gain("gumbel_random"), gain("gumbel"), deviations=dev),
            compare(f"AR with n = {cfg.max_n} randomized-Gumbel draws restores reward to at least the unwatermarked level",
                    f"mean reward, randomized Gumbel AR n={cfg.max_n} (baseline: unwatermarked, n = 1)",
                    per_seed("reward", "gumbel_random", cfg.max_n), base, deviations=dev),
            compare(f"AR keeps randomized-Gumbel detection as strong as single responses (TPR at {cfg.fpr:.0%} FPR)",
                    f"share with p < {cfg.fpr}: AR n={cfg.max_n} (method) vs n = 1 (baseline); rule: > baseline − 0.05",
                    per_seed("tpr", "gumbel_random", cfg.max_n), per_seed("tpr", "gumbel_random", 1), margin=-0.05,
                    deviations=dev)]
    if not claims:
        from pipelines.errors import UserError

        raise UserError("reproduce needs scheme kgw and/or both gumbel and gumbel_random")
    return ClaimReport(headline=claims[0], more=claims[1:])


def _class_dist(samples: dict, scheme: str, draw: int, seed: int) -> np.ndarray:
    rows = (samples["scheme"] == scheme) & (samples["seed"] == seed) & (samples["draw"] == draw)
    return np.array([[(samples["label"][rows & (samples["kind"] == k)] == c).mean() for c in LABELS]
                     for k in ("benign", "harmful")])


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver (function trainable): KGW AR reward gain over the unwatermarked reward, with TPR."""
    from ray import tune

    cfg = WatermarkARConfig(**config).model_copy(update={"schemes": ["kgw"], "seeds": 1})
    run_dir = RunDir(Path(storage).parent / "trials" / tune.get_context().get_trial_id(), "watermark_ar")
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lm_dir = prepare(cfg, storage, run_dir.log)
    table = summary(resample(sample_table(cfg, *sample_all(cfg, storage, lm_dir, run_dir.log), lm_dir), cfg.max_n),
                    cfg.fpr)
    gap = _mean(table, "reward", scheme="kgw", n=cfg.max_n) - _mean(table, "reward", scheme="none", n=1)
    tune.report({"objective": gap, "tpr": _mean(table, "tpr", scheme="kgw", n=cfg.max_n)})


PIPELINE = Pipeline(
    config=WatermarkARConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="objective",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 2, "n_train": 1200, "n_prompts": 24, "temperatures": [0.7, 1.0], "pretrain_epochs": 5},
        "full": {"seeds": 3, "n_train": 3000, "n_reward": 3000, "n_prompts": 100, "temperatures": [0.4, 0.8, 1.2],
                 "pretrain_epochs": 8},
    },
)
