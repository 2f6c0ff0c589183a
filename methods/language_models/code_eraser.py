"""Scrub It Out! CodeEraser (Chu et al., ICSE'26): erasing memorized secrets from a code LM.

A tiny GPT-2 is pretrained (Ray Train, cached in the out dir) on stdlib Python source in which a
pool of files carries planted secrets; those files and a retain set are repeated until memorized.
Each seed draws a forget set D_f of ``forget_size`` secret files and unlearns it with one of

    ga           L_f = −CE(D_f)
    cu           L_f = −CE(D_f) − λ·KL_f,                      L_r = λα·KL_r
    ssga         L_f = −mean_{s=1} ℓ + γ·mean_{s=0} ℓ
    code_eraser  L_f = −mean_{s=1} ℓ + γ·mean_{s=0} ℓ − λ·KL_secret,   L_r = λα·KL_r

(losses in :mod:`unlearning_losses`). An epoch is one Adam(0.9, 0.98) step on the whole forget set
(effective batch = |D_f|), then one on the retain set for cu / code_eraser. Early stopping as in the
official code: once mean secret MA ≤ τ_MA + margin, EL10 is tracked as well; stop when MA < τ_MA and
(EL10 < τ_EL10 or ``el_patience`` epochs without an EL10 improvement); the best epoch is kept.
The "forgotten" thresholds τ are the original model's mean MA / EL_n on held-out files.
Metrics: secret MA and EL_{3,5,10} on D_f, accuracy on the non-secret tokens of D_f, MA / EL on the
retain set, held-out perplexity and accuracy, and seconds per forgotten sample.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.language_models.corpus import build_code_corpus, code_snippets, subset
from methods.language_models.lm_pretrain import TinyLMConfig, cached_tokenizer, load_lm, pretrained_lm
from methods.language_models.memorization import memorization_scores
from methods.language_models.tokenizer import load_tokenizer, train_bpe_tokenizer
from methods.language_models.unlearning_losses import METHODS, USES_RETAIN, Method, forget_loss, retain_loss
from pipelines import train
from pipelines.claims import compare, per_seed
from pipelines.pipeline import Outputs, Pipeline, Stage
from pipelines.results import columns, group_means, subplots
from pipelines.units import Unit, Work, no_steps, run_units, unit_key

EL_NS = (3, 5, 10)


class CodeEraserConfig(TinyLMConfig):
    method: Method = Field("code_eraser", description="unlearning method of `run` (reproduce runs all four)")
    # corpus
    snippet_lines: int = Field(10, ge=3)
    block: int = Field(96, ge=32, le=512, description="tokens per sample")
    vocab_size: int = Field(1024, ge=300)
    n_secret: int = Field(16, ge=1, description="secret-bearing files memorized in pretraining")
    forget_size: int = Field(8, ge=1, description="|D_f| drawn from them per seed")
    n_retain: int = Field(16, ge=1)
    n_background: int = Field(256, ge=0, description="files seen once in pretraining")
    n_heldout: int = Field(32, ge=2)
    repeats: int = Field(10, ge=1, description="copies of the secret and retain files in pretraining")
    # language model (TinyLMConfig)
    pretrain_epochs: int = Field(12, ge=1)
    pretrain_batch: int = Field(16, ge=1)
    # unlearning
    lr: float = Field(3e-4, gt=0, description="Adam lr (paper 3e-6 for 350M–7B models)")
    gamma: float = Field(0.1, ge=0, description="select_gamma: weight of the context descent")
    lam: float = Field(0.1, ge=0, description="control_lambda: weight of the KL terms")
    alpha: float = Field(1.0, ge=0, description="control_alpha: retain KL multiplier")
    max_epochs: int = Field(30, ge=1)
    ma_margin: float = Field(0.3, ge=0, description="EL10 is tracked once MA ≤ τ_MA + margin")
    el_patience: int = Field(5, ge=1)
    el_window: int = Field(32, ge=12, description="tokens per file for whole-file EL_n")

    @model_validator(mode="after")
    def _sizes(self):
        if self.forget_size > self.n_secret:
            raise ValueError(f"forget_size {self.forget_size} exceeds n_secret {self.n_secret}")
        return self


DEVIATIONS = [
    "model: 2-layer GPT-2 (d=128) trained from scratch instead of CodeParrot / CodeGen / Qwen2.5-Coder",
    "data: stdlib Python source with planted synthetic secrets (regex patterns) instead of codeparrot-clean "
    "secrets found by detect-secrets; retain set = repeated stdlib files instead of 'Traces of Memorisation'",
    "forget set of `forget_size` files (paper 32) drawn per seed; block of `block` tokens (paper ≤ 512)",
    "lr raised to 3e-4 (paper 3e-6; spec sweep 1e-5–1e-4) for a tiny fp32 model; plain Adam(0.9, 0.98), "
    "no DeepSpeed / fp16",
    "utility = held-out perplexity and next-token accuracy instead of HumanEval pass@k",
    "secret prefix and secret tokens come from the in-context tokenization (official: encoded separately)",
    "whole-file EL_n of retain / held-out files over the first `el_window` tokens; padding masked out of "
    "every loss term (official: pads count as zero-loss context tokens in ssga/sscu and as KL positions)",
    "PECU (LoRA variant) not run",
]


def prepare(cfg: CodeEraserConfig, stage: Stage) -> dict:
    """The unlearning loop's inputs: the corpus splits and the memorizing LM (trained once per out dir, then
    cached; positions beyond ``block`` are only reached by batched EL generation past a row's own budget)."""
    snippets = code_snippets(lines=cfg.snippet_lines)
    tokenizer = load_tokenizer(cached_tokenizer(stage.storage, train_bpe_tokenizer, snippets[::3], cfg.vocab_size))
    corpus = build_code_corpus(tokenizer, snippets, n_secret=cfg.n_secret, n_retain=cfg.n_retain,
                               n_background=cfg.n_background, n_heldout=cfg.n_heldout, block=cfg.block,
                               seed=cfg.seed)
    model_dir = pretrained_lm(corpus.pretraining_rows(cfg.repeats), tokenizer, cfg.lm_spec(2 * cfg.block), cfg,
                              stage.storage, "code_lm", stage.log)
    return {"data": {"secret_pool": corpus.secret_pool, "retain": corpus.retain, "heldout": corpus.heldout},
            "model_dir": str(model_dir)}


def secret_items(rows: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(secret prefix c, secret s) per row: the tokens before the first s_t = 1, and the s_t = 1 tokens."""
    return [(ids[: secret.nonzero()[0, 0]].tolist(), ids[secret].tolist())
            for ids, secret in zip(rows["input_ids"], rows["secret_mask"])]


def file_items(rows: dict[str, torch.Tensor], window: int) -> list[tuple[list[int], list[int]]]:
    """Whole-file form (c = x_1, s = x_2..x_w) over the first ``window`` tokens of each file."""
    return [(ids[:1].tolist(), ids[1:window][mask[1:window].bool()].tolist())
            for ids, mask in zip(rows["input_ids"], rows["attention_mask"])]


@torch.no_grad()
def token_stats(model, rows: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> tuple[float, float]:
    """(next-token accuracy, perplexity) over the shifted non-padding ``positions`` (default: all)."""
    model.eval()
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1].float()
    target = rows["input_ids"][:, 1:]
    mask = rows["attention_mask"][:, 1:].bool() if positions is None else positions
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")[mask]
    return float((logits.argmax(-1) == target)[mask].float().mean()), float(nll.mean().exp())


def memorization(model, items, with_el: bool = True) -> dict[str, float]:
    ma, el = memorization_scores(model, items, EL_NS, with_el=with_el)
    return {"ma": float(np.mean(ma)), **{f"el{n}": float(np.mean(v)) for n, v in el.items()}}


def thresholds(model, heldout: dict[str, torch.Tensor], window: int) -> dict[str, float]:
    """τ: the mean whole-file MA and EL_n of the original model on never-seen files."""
    ma, _ = memorization_scores(model, file_items(heldout, heldout["input_ids"].shape[1]), EL_NS, with_el=False)
    el = memorization(model, file_items(heldout, window))
    return {"ma": float(np.mean(ma)), **{k: v for k, v in el.items() if k != "ma"}}


def evaluate(model, forget: dict, retain: dict, heldout: dict, window: int) -> dict[str, float]:
    secret = memorization(model, secret_items(forget))
    context = ~forget["secret_mask"][:, 1:] & forget["attention_mask"][:, 1:].bool()
    kept = memorization(model, file_items(retain, window))
    retain_ma, _ = memorization_scores(model, file_items(retain, retain["input_ids"].shape[1]), with_el=False)
    acc, ppl = token_stats(model, heldout)
    return {**{f"secret_{k}": v for k, v in secret.items()}, "context_acc": token_stats(model, forget, context)[0],
            "retain_ma": float(np.mean(retain_ma)), **{f"retain_{k}": v for k, v in kept.items() if k != "ma"},
            "heldout_acc": acc, "heldout_ppl": ppl}


@dataclass(frozen=True)
class Run:
    """A unit of the plan at ``seed``: the original model's metrics (``method`` None) or an unlearning run."""

    seed: int
    method: Method | None = None

    @property
    def key(self) -> str:
        return unit_key(("original", self.seed) if self.method is None else ("unlearn", self.method, self.seed))


def plan(cfg: CodeEraserConfig, methods: list[str]) -> list[Run]:
    return [run for seed in cfg.seed_range() for run in [Run(seed), *(Run(seed, m) for m in methods)]]


class EarlyStopping:
    """The official rule on mean secret MA and EL10 (see module docstring); tracks the best epoch."""

    def __init__(self, tau_ma: float, tau_el10: float, margin: float, patience: int, state: dict | None = None):
        self.tau_ma, self.tau_el10, self.margin, self.patience = tau_ma, tau_el10, margin, patience
        self.state = state or {"el_flag": False, "best_ma": 1.0, "best_el": 1.0, "counter": 0, "best_epoch": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)

    def update(self, epoch: int, ma: float, el10: float | None) -> tuple[bool, bool]:
        """(stop, this epoch is the new best)."""
        s, improved = self.state, False
        if ma <= s["best_ma"]:
            if s["el_flag"]:
                if el10 <= s["best_el"]:
                    s.update(best_el=el10, counter=0, best_ma=ma, best_epoch=epoch)
                    improved = True
                else:
                    s["counter"] += 1
            else:
                s.update(best_ma=ma, best_epoch=epoch)
                improved = True
        stop = ma < self.tau_ma and s["el_flag"] and (el10 < self.tau_el10 or s["counter"] >= self.patience)
        if ma <= self.tau_ma + self.margin:
            s["el_flag"] = True
        return stop, improved


def unlearn_loop(config: dict) -> None:
    """Ray Train worker: τ, then per seed the original model's metrics and each method's unlearning run."""
    cfg = CodeEraserConfig(**config["cfg"])
    session = train.WorkerSession(config)
    data = config["data"]
    original = load_lm(config["model_dir"]).to(session.device).requires_grad_(False)

    def forget_set(seed: int) -> dict[str, torch.Tensor]:  # D_f: forget_size of the n_secret files
        order = torch.randperm(cfg.n_secret, generator=torch.Generator().manual_seed(seed))
        return subset(data["secret_pool"], order[: cfg.forget_size])

    def evaluated(model, seed: int) -> dict[str, float]:
        return evaluate(model, forget_set(seed), data["retain"], data["heldout"], cfg.el_window)

    def start(done: dict, seed: int) -> Work:
        torch.manual_seed(seed)
        model = copy.deepcopy(original).train().requires_grad_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        tau = done["thresholds"]
        return Work(saved=("model", "optimizer", "stopper", "best", "elapsed", "epochs_run", "stopped"),
                    model=model, optimizer=optimizer, ddp=train.prepare(model), forget=forget_set(seed),
                    stopper=EarlyStopping(tau["ma"], tau["el10"], cfg.ma_margin, cfg.el_patience),
                    best=None, elapsed=0.0, epochs_run=0, stopped=False)

    shard = lambda rows: {k: v[session.rank :: session.world_size] for k, v in rows.items()}  # noqa: E731

    def epoch(work: Work, index: int, method: str) -> dict:
        tic = time.perf_counter()
        unlearning_epoch(work.ddp, original, method, shard(work.forget), shard(data["retain"]), work.optimizer, cfg)
        secret_ma, el = memorization_scores(work.model, secret_items(work.forget), (10,),
                                            with_el=work.stopper.state["el_flag"])
        work.stopped, improved = work.stopper.update(index + 1, float(np.mean(secret_ma)),
                                                     float(np.mean(el[10])) if el else None)
        if improved:
            work.best = {k: v.detach().clone() for k, v in work.model.state_dict().items()}
        work.elapsed += time.perf_counter() - tic
        work.epochs_run = index + 1
        retain_ma, _ = memorization_scores(work.model, file_items(data["retain"], cfg.block), with_el=False)
        metrics = {"epoch": index + 1, "secret_ma": float(np.mean(secret_ma)), "retain_ma": float(np.mean(retain_ma))}
        return {**metrics, "objective": metrics["retain_ma"] - metrics["secret_ma"]}

    def unlearned(work: Work, seed: int) -> dict:
        if work.best is not None:  # else the last epoch is the best
            work.model.load_state_dict(work.best)
        return {**evaluated(work.model, seed), "epochs": work.stopper.state["best_epoch"],
                "epochs_run": work.epochs_run, "seconds": work.elapsed,
                "seconds_per_sample": work.elapsed / cfg.forget_size}

    def unit(run: Run) -> Unit:
        if run.method is None:
            return Unit(run.key, 0, lambda done: Work(), no_steps, lambda work, done: evaluated(original, run.seed))
        return Unit(run.key, cfg.max_epochs, lambda done: start(done, run.seed),
                    lambda work, i: epoch(work, i, run.method), lambda work, done: unlearned(work, run.seed),
                    stop=lambda work: work.stopped, step_name="epoch")

    run_units(session, [Unit("thresholds", 0, lambda done: Work(), no_steps,
                             lambda work, done: thresholds(original, data["heldout"], cfg.el_window)),
                        *(unit(run) for run in plan(cfg, config["methods"]))])


def unlearning_epoch(model, reference, method: str, forget: dict, retain: dict, optimizer,
                     cfg: CodeEraserConfig) -> None:
    """One step on the forget set, then (cu, code_eraser) one step on the retain set."""
    steps = [(forget, lambda lg, ref: forget_loss(method, lg, ref, forget, cfg.gamma, cfg.lam))]
    if USES_RETAIN[method]:
        steps.append((retain, lambda lg, ref: retain_loss(lg, ref, retain, cfg.lam, cfg.alpha)))
    model.train()
    for rows, objective in steps:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        with torch.no_grad():  # cu and code_eraser (the methods with a retain step) use the reference logits
            ref = (reference(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
                   if USES_RETAIN[method] else None)
        objective(logits, ref).backward()
        optimizer.step()


@dataclass(frozen=True)
class Results:
    """One row per (method, seed) (the original model's rows labelled "original") and the thresholds τ."""

    table: dict[str, np.ndarray]
    thresholds: dict[str, float]


def execute(cfg: CodeEraserConfig, stage: Stage) -> Results:
    """The plan on Ray Train with ``method``; a claim check runs all four methods on the same LM and forget sets."""
    methods = list(METHODS) if stage.claims else [cfg.method]
    inputs, runs = prepare(cfg, stage), plan(cfg, methods)
    stage.log(f"{len(runs)} units (original + unlearning per seed) on Ray Train")
    done = stage.fit(unlearn_loop, {"cfg": cfg.model_dump(), "methods": methods, **inputs}, cfg)["done"]
    table = columns([{"method": run.method or "original", "seed": run.seed, **done[run.key]} for run in runs])
    table["forgotten"] = table["secret_ma"] < done["thresholds"]["ma"]
    return Results(table, done["thresholds"])


def plot(table: dict, tau: dict):
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for ax, utility, label in zip(axes, ("heldout_ppl", "retain_ma"), ("held-out perplexity", "retain-set MA")):
        for method in dict.fromkeys(table["method"]):
            rows = table["method"] == method
            ax.scatter(table["secret_ma"][rows], table[utility][rows], label=method, s=40,
                       marker="*" if method == "original" else "o")
        ax.axvline(tau["ma"], color="k", ls="--", lw=1, label="forgotten threshold τ_MA")
        ax.set_xlabel("secret MA on the forget set (lower = forgotten)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("CodeEraser: forgetting vs utility per method")
    return fig


def outputs(cfg: CodeEraserConfig, results: Results) -> Outputs:
    """The results table, the forgetting-vs-utility plot, τ and the mean over seeds per method."""
    table = results.table
    by_method = group_means({**table, "forgotten": table["forgotten"].astype(float)}, "method")
    return Outputs(tables={"results": table}, figures={"forget_vs_utility.png": plot(table, results.thresholds)},
                   metrics={"thresholds": results.thresholds, "by_method": by_method})


def claims(cfg: CodeEraserConfig, results: Results, outputs: Outputs) -> list:
    """Utility kept (retain MA, held-out perplexity, context accuracy) vs GA / CU, and each method vs τ_MA,
    paired by seed (the same LM and forget set)."""
    table, tau = results.table, results.thresholds

    def change(method: str, name: str, log: bool = False) -> dict:  # |change| from the original model, per seed
        before, after = per_seed(table, name, method="original"), per_seed(table, name, method=method)
        return {s: abs(np.log(after[s] / before[s])) if log else abs(before[s] - after[s]) for s in before}

    point = "one point of a token-level accuracy"
    found = [compare(f"CodeEraser keeps retain-set memorization closer to the original model than {b.upper()}",
                     "|ΔMA| on the retain set vs the original (lower is better; rule: ≥ 0.01 lower)",
                     change("code_eraser", "retain_ma"), change(b, "retain_ma"), higher_is_better=False,
                     margin=0.01, why=point) for b in ("ga", "cu")]
    found += [compare(f"CodeEraser keeps held-out perplexity closer to the original model than {b.upper()}",
                      "|Δ log perplexity| on held-out files (lower is better; rule: ≥ 0.05 lower)",
                      change("code_eraser", "heldout_ppl", log=True), change(b, "heldout_ppl", log=True),
                      higher_is_better=False, margin=0.05, why="a 5% perplexity change, the least that shows in "
                      "a code LM's utility") for b in ("ga", "cu")]
    found.append(compare("CodeEraser keeps the non-secret context of the forgotten files better than GA",
                         "|Δ next-token accuracy| on the non-secret tokens of D_f (lower is better; "
                         "rule: ≥ 0.01 lower)",
                         change("code_eraser", "context_acc"), change("ga", "context_acc"), higher_is_better=False,
                         margin=0.01, why=point))
    found += [compare(f"{method} pushes secret MA below the forgotten threshold τ_MA",
                      f"secret MA on D_f (baseline: τ_MA = held-out MA of the original = {tau['ma']:.3f})",
                      per_seed(table, "secret_ma", method=method), tau["ma"], higher_is_better=False, margin=0.0,
                      trials=cfg.forget_size, why="the paper's criterion: forgotten once MA < τ_MA, by any amount; "
                      "each file's MA lies in [0, 1], so p(1 − p)/|D_f| bounds its mean's variance")
              for method in METHODS]
    return found


PIPELINE = Pipeline(
    config=CodeEraserConfig,
    execute=execute,
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: f"{cfg.seeds} seeds, |D_f| = {cfg.forget_size}, lr {cfg.lr:g}, ≤ {cfg.max_epochs} epochs",
    # one Tune trial: unlearn one seed with ``method``; reports retain MA − secret MA every epoch
    trial=lambda cfg: cfg.model_copy(update={"seeds": 1}),
    sweep_metric="objective",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 2},
        "full": {"seeds": 5, "n_secret": 48, "forget_size": 32, "n_retain": 32, "n_background": 512,
                 "n_heldout": 64, "block": 128, "lm_layers": 4, "repeats": 20, "pretrain_epochs": 12,
                 "max_epochs": 100},
    },
)
