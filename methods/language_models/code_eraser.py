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
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.language_models.corpus import CodeCorpus, build_code_corpus, code_snippets, subset
from methods.language_models.lm_pretrain import LMSpec, cache_dir, cached_tokenizer, load_lm, pretrained_lm
from methods.language_models.memorization import memorization_scores
from methods.language_models.tokenizer import train_bpe_tokenizer
from methods.language_models.unlearning_losses import METHODS, USES_RETAIN, Method, forget_loss, retain_loss
from pipelines import train
from pipelines.claims import ClaimReport, compare
from pipelines.config import MethodConfig
from pipelines.registry import Pipeline
from pipelines.results import RunDir
from pipelines.sweep import trial_run
from pipelines.units import unit_key

EL_NS = (3, 5, 10)


class CodeEraserConfig(MethodConfig):
    method: Method = Field("code_eraser", description="unlearning method of `run` (reproduce runs all four)")
    seeds: int = Field(1, ge=1, description="replicates: forget sets drawn with seeds seed, seed+1, …")
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
    # language model
    lm_family: Literal["gpt2", "llama"] = "gpt2"
    lm_layers: int = Field(2, ge=1)
    lm_dim: int = Field(128, ge=16)
    lm_heads: int = Field(4, ge=1)
    pretrain_epochs: int = Field(12, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)
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
        if self.lm_dim % self.lm_heads:
            raise ValueError("lm_dim must be divisible by lm_heads")
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


def lm_spec(cfg: CodeEraserConfig) -> LMSpec:
    """Positions beyond ``block`` are only reached by batched EL generation past a row's own budget."""
    return LMSpec(family=cfg.lm_family, n_layer=cfg.lm_layers, d_model=cfg.lm_dim, n_head=cfg.lm_heads,
                  max_positions=2 * cfg.block, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
                  batch_size=cfg.pretrain_batch, seed=cfg.seed)


def prepare(cfg: CodeEraserConfig, storage: str, log=print) -> tuple[CodeCorpus, Path]:
    """Tokenizer, corpus and the memorizing LM (trained once per out dir, then cached)."""
    snippets = code_snippets(lines=cfg.snippet_lines)
    tokenizer = cached_tokenizer(storage, "code_lm", lambda: train_bpe_tokenizer(snippets[::3], cfg.vocab_size))
    corpus = build_code_corpus(tokenizer, snippets, n_secret=cfg.n_secret, n_retain=cfg.n_retain,
                               n_background=cfg.n_background, n_heldout=cfg.n_heldout, block=cfg.block,
                               seed=cfg.seed)
    pretrained_lm(corpus.pretraining_rows(cfg.repeats), tokenizer, lm_spec(cfg), cfg, storage, "code_lm", log)
    return corpus, cache_dir(storage, "code_lm") / "model"


# --- metrics -------------------------------------------------------------------------------------


def secret_items(rows: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(secret prefix c, secret s) per row: the tokens before the first s_t = 1, and the s_t = 1 tokens."""
    items = []
    for ids, secret in zip(rows["input_ids"], rows["secret_mask"]):
        where = secret.nonzero().flatten()
        items.append((ids[: where[0]].tolist(), ids[where].tolist()))
    return items


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


# --- unlearning on Ray Train ---------------------------------------------------------------------


def plan(cfg: CodeEraserConfig, methods: list[str]) -> list[tuple]:
    units: list[tuple] = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        units += [("original", seed)] + [("unlearn", m, seed) for m in methods]
    return units


def forget_index(cfg: CodeEraserConfig, seed: int) -> torch.Tensor:
    return torch.randperm(cfg.n_secret, generator=torch.Generator().manual_seed(seed))[: cfg.forget_size]


class EarlyStopping:
    """The official rule on mean secret MA and EL10 (see module docstring); tracks the best epoch."""

    def __init__(self, tau_ma: float, tau_el10: float, margin: float, patience: int, state: dict | None = None):
        self.tau_ma, self.tau_el10, self.margin, self.patience = tau_ma, tau_el10, margin, patience
        self.state = state or {"el_flag": False, "best_ma": 1.0, "best_el": 1.0, "counter": 0, "best_epoch": 0}

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
    """Ray Train worker: every unit of the plan; a checkpoint after each unlearning epoch."""
    cfg = CodeEraserConfig(**config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    session = train.WorkerSession(cfg.checkpoint_every)
    data = config["data"]
    original = load_lm(config["model_dir"]).to(session.device)
    for p in original.parameters():
        p.requires_grad_(False)
    state = session.state or {"done": {}}
    done, current = state["done"], state.get("current")
    if "thresholds" not in done:
        done["thresholds"] = thresholds(original, data["heldout"], cfg.el_window)
    tau = done["thresholds"]
    units = plan(cfg, config["methods"])
    for number, unit in enumerate(units, 1):
        key = unit_key(unit)
        if key in done:
            continue
        forget = subset(data["secret_pool"], forget_index(cfg, unit[-1]))
        if unit[0] == "original":
            done[key] = evaluate(original, forget, data["retain"], data["heldout"], cfg.el_window)
            continue
        method = unit[1]
        torch.manual_seed(unit[-1])
        model = copy.deepcopy(original).train()
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        stopper = EarlyStopping(tau["ma"], tau["el10"], cfg.ma_margin, cfg.el_patience)
        start, elapsed, best = 0, 0.0, model.state_dict()
        if current is not None and current["key"] == key:
            model.load_state_dict(current["model"])
            optimizer.load_state_dict(current["optimizer"])
            stopper.state, best = current["stopper"], current["best"]
            start, elapsed = current["epoch"] + 1, current["elapsed"]
        ddp = train.prepare(model)
        shard = lambda rows: {k: v[session.rank :: session.world_size] for k, v in rows.items()}  # noqa: E731
        for epoch in range(start, cfg.max_epochs):
            tic = time.perf_counter()
            unlearning_epoch(ddp, original, method, shard(forget), shard(data["retain"]), optimizer, cfg)
            secret_ma, el = memorization_scores(model, secret_items(forget), (10,), with_el=stopper.state["el_flag"])
            stop, improved = stopper.update(epoch + 1, float(np.mean(secret_ma)), float(np.mean(el[10])) if el else None)
            if improved:
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elapsed += time.perf_counter() - tic
            retain_ma, _ = memorization_scores(model, file_items(data["retain"], cfg.block), with_el=False)
            current = {"key": key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "stopper": stopper.state, "best": best, "elapsed": elapsed}
            metrics = {"unit": number, "units": len(units), "epoch": epoch + 1,
                       "secret_ma": float(np.mean(secret_ma)), "retain_ma": float(np.mean(retain_ma))}
            session.report({**metrics, "objective": metrics["retain_ma"] - metrics["secret_ma"]},
                           {"done": done, "current": current}, force=stop)
            if stop:
                break
        model.load_state_dict(best)
        done[key] = {**evaluate(model, forget, data["retain"], data["heldout"], cfg.el_window),
                     "epochs": stopper.state["best_epoch"], "epochs_run": current["epoch"] + 1,
                     "seconds": current["elapsed"], "seconds_per_sample": current["elapsed"] / cfg.forget_size}
        current = None
        if session.rank == 0:
            print(f"[code_eraser] {number}/{len(units)} {key}: secret MA {done[key]['secret_ma']:.3f}", flush=True)
    last = done[unit_key(units[-1])]
    session.report({"unit": len(units), "units": len(units), "epoch": 0, "secret_ma": last["secret_ma"],
                    "retain_ma": last["retain_ma"], "objective": last["retain_ma"] - last["secret_ma"]},
                   {"done": done}, force=True)


def unlearning_epoch(model, reference, method: str, forget: dict, retain: dict, optimizer, cfg: CodeEraserConfig) -> None:
    """One step on the forget set, then (cu, code_eraser) one step on the retain set."""
    needs_ref = method in ("cu", "code_eraser")
    steps = [(forget, lambda lg, ref: forget_loss(method, lg, ref, forget, cfg.gamma, cfg.lam))]
    if USES_RETAIN[method]:
        steps.append((retain, lambda lg, ref: retain_loss(lg, ref, retain, cfg.lam, cfg.alpha)))
    model.train()
    for rows, objective in steps:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        with torch.no_grad():
            ref = reference(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits if needs_ref else None
        objective(logits, ref).backward()
        optimizer.step()


def execute(cfg: CodeEraserConfig, storage: str, name: str, methods: list[str], log=print,
            callbacks: list | None = None) -> dict:
    corpus, model_dir = prepare(cfg, storage, log)
    data = {"secret_pool": corpus.secret_pool, "retain": corpus.retain, "heldout": corpus.heldout}
    log(f"{len(plan(cfg, methods))} units (original + unlearning per seed) on Ray Train")
    result = train.fit(unlearn_loop, {"cfg": cfg.model_dump(), "data": data, "methods": methods, "model_dir": str(model_dir)},
                            cfg, name=name, storage=storage, callbacks=callbacks)
    return train.read_state(result.checkpoint)["done"]


def results_table(cfg: CodeEraserConfig, done: dict, methods: list[str]) -> dict[str, np.ndarray]:
    rows = []
    for unit in plan(cfg, methods):
        label = "original" if unit[0] == "original" else unit[1]
        rows.append({"method": label, "seed": unit[-1], **done[unit_key(unit)]})
    columns = sorted({k for r in rows for k in r} - {"method", "seed"})
    table = {"method": np.array([r["method"] for r in rows]), "seed": np.array([r["seed"] for r in rows])}
    table.update({c: np.array([r.get(c, np.nan) for r in rows], dtype=float) for c in columns})
    table["forgotten"] = table["secret_ma"] < done["thresholds"]["ma"]
    return table


def plot(run_dir: RunDir, table: dict, tau: dict, name: str = "forget_vs_utility.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
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
    run_dir.save_figure(fig, name)


def summarize(table: dict) -> dict[str, dict[str, float]]:
    """Mean over seeds per method of every metric the method has."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(table["method"]):
        rows = table["method"] == method
        out[method] = {k: float(np.mean(v[rows])) for k, v in table.items()
                       if k not in ("method", "seed") and not np.isnan(v[rows].astype(float)).all()}
    return out


def run(cfg: CodeEraserConfig, run_dir: RunDir) -> dict:
    done = execute(cfg, run_dir.storage, "unlearn", [cfg.method], run_dir.log)
    table = results_table(cfg, done, [cfg.method])
    run_dir.write_table("results.parquet", table)
    plot(run_dir, table, done["thresholds"])
    return {"thresholds": done["thresholds"], "by_method": summarize(table), "deviations": DEVIATIONS}


def reproduce(cfg: CodeEraserConfig, run_dir: RunDir) -> ClaimReport:
    """All four methods on the same memorizing LM and forget sets, over ``seeds`` seeds."""
    done = execute(cfg, run_dir.storage, "reproduce", list(METHODS), run_dir.log)
    table = results_table(cfg, done, list(METHODS))
    run_dir.write_table("results.parquet", table)
    plot(run_dir, table, done["thresholds"])
    tau = done["thresholds"]

    def col(method: str, name: str) -> np.ndarray:
        return table[name][table["method"] == method]

    def drop(method: str, name: str) -> np.ndarray:  # change relative to the original model, per seed
        return np.abs(col("original", name) - col(method, name))

    dev = DEVIATIONS + [f"{cfg.seeds} seeds, |D_f| = {cfg.forget_size}, lr {cfg.lr:g}, ≤ {cfg.max_epochs} epochs"]
    claims = [compare("CodeEraser keeps retain-set memorization closer to the original model than GA",
                      "|ΔMA| on the retain set vs the original (lower is better)",
                      drop("code_eraser", "retain_ma"), drop("ga", "retain_ma"), higher_is_better=False, deviations=dev)]
    claims.append(compare("CodeEraser keeps retain-set memorization closer to the original model than CU",
                          "|ΔMA| on the retain set vs the original (lower is better)",
                          drop("code_eraser", "retain_ma"), drop("cu", "retain_ma"), higher_is_better=False,
                          deviations=dev))
    for baseline in ("ga", "cu"):
        claims.append(compare(f"CodeEraser keeps held-out perplexity closer to the original model than "
                              f"{baseline.upper()}", "|Δ log perplexity| on held-out files (lower is better)",
                              np.abs(np.log(col("code_eraser", "heldout_ppl") / col("original", "heldout_ppl"))),
                              np.abs(np.log(col(baseline, "heldout_ppl") / col("original", "heldout_ppl"))),
                              higher_is_better=False, deviations=dev))
    claims.append(compare("CodeEraser keeps the non-secret context of the forgotten files better than GA",
                          "|Δ next-token accuracy| on the non-secret tokens of D_f (lower is better)",
                          drop("code_eraser", "context_acc"), drop("ga", "context_acc"), higher_is_better=False,
                          deviations=dev))
    for method in METHODS:
        claims.append(compare(f"{method} pushes secret MA below the forgotten threshold τ_MA",
                              f"secret MA on D_f (baseline: τ_MA = held-out MA of the original = {tau['ma']:.3f})",
                              col(method, "secret_ma"), [tau["ma"]], higher_is_better=False, deviations=dev))
    return ClaimReport(headline=claims[0], more=claims[1:])


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver: unlearn one seed with ``method``; reports retain MA − secret MA per epoch."""
    cfg = CodeEraserConfig(**config).model_copy(update={"seeds": 1})
    tuned = trial_run()
    execute(cfg, storage, tuned["name"], [cfg.method], callbacks=tuned["callbacks"])


PIPELINE = Pipeline(
    config=CodeEraserConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="objective",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 2},
        "full": {"seeds": 5, "n_secret": 48, "forget_size": 32, "n_retain": 32, "n_background": 512,
                 "n_heldout": 64, "block": 128, "lm_layers": 4, "repeats": 20, "pretrain_epochs": 12,
                 "max_epochs": 100},
    },
)
