"""Deep Learning on a Data Diet (Paul, Ganguli, Dziugaite, NeurIPS 2021): EL2N and GraNd pruning.

Scores (``scores.py``), each averaged over ``inits`` independent initialisations k::

    EL2N(x, y) = mean_k ‖softmax(f_k(x)) − onehot(y)‖₂    after ``score_epochs`` of training
    GraNd(x, y) = mean_k ‖∇_w ℓ(f_k(x), y)‖₂             at initialisation (or at the score epoch)

Pruning keeps the highest-score fraction (optionally after dropping the ``offset`` highest) and
retrains from scratch; a random subset of the same size is the baseline. The whole plan (scoring
runs, then one retrain per arm × kept fraction, for each seed) runs in one Ray Train job as
resumable units, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.classifiers import Arch, ClassifierConfig, Training, accuracy, build_classifier, train_epoch
from methods.data_centric.scores import el2n_scores, grand_scores, keep_indices
from pipelines import train
from pipelines.claims import compare, per_seed
from pipelines.data import build_splits, load_shard
from pipelines.errors import UserError
from pipelines.pipeline import Outputs, Pipeline, Stage
from pipelines.results import columns, subplots
from pipelines.units import Unit, run_units, unit_key, unit_seed

Arm = Literal["el2n", "grand", "random", "el2n_lowest"]


class DataDietConfig(ClassifierConfig):
    dataset: Literal["digits", "synthetic"] = "digits"
    arch: Arch = "mlp"
    hidden: list[int] = Field([256, 256], min_length=1, description="MLP widths")
    inits: int = Field(5, ge=1, description="K independent initialisations averaged per score")
    score_epochs: int = Field(3, ge=1, description="epochs before EL2N is read")
    grand_at: Literal["init", "score_epoch"] = "init"
    retrain_epochs: int = Field(40, ge=1)
    keep_fractions: list[float] = Field([0.7, 0.5, 0.3], description="fractions of the train set kept")
    arms: list[Arm] = Field(["el2n", "grand", "random"], min_length=1)
    offset: float = Field(0.0, ge=0, lt=1, description="fraction of highest scores dropped first")
    full_reference: bool = True
    label_noise: float = Field(0.0, ge=0, le=0.9)
    test_fraction: float = Field(0.33, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _fractions(self):
        for f in self.keep_fractions:
            if not 0 < f <= 1 - self.offset:
                raise ValueError(f"keep fraction {f} must be in (0, 1 - offset = {1 - self.offset:g}]")
        return self


DEVIATIONS = [
    "data: sklearn digits (8×8, 10 classes) or a synthetic set instead of CIFAR-10/100 and CINIC-10",
    "model: small MLP/CNN instead of ResNet-18; few epochs instead of 200; no augmentation",
    "scores averaged over `inits` initialisations (paper: 10); forgetting scores not computed",
    "a validation split is carved from the training data for sweeps",
]


@dataclass(frozen=True)
class Run:
    """One training run of the plan: a GraNd-at-init reading or a scoring run (``init``), the full-data
    reference, or a retrain on the kept ``fraction`` of ``arm``; ``key`` names its unit (and seeds its
    data order)."""

    kind: Literal["grand0", "score", "full", "prune"]
    seed: int
    init: int = 0
    arm: str = ""
    fraction: float = 1.0

    @property
    def key(self) -> str:
        parts = {"full": (), "prune": (self.arm, self.fraction)}.get(self.kind, (self.init,))
        return unit_key((self.kind, self.seed, *parts))

    @property
    def init_key(self) -> str:
        """The key seeding its initialisation: a GraNd-at-init reading shares its scoring run's."""
        return Run("score", self.seed, self.init).key if self.kind == "grand0" else self.key


def plan(cfg: DataDietConfig) -> list[Run]:
    """Per seed: the K scoring runs (each after a zero-epoch GraNd reading of its initialisation with
    ``grand_at="init"``), the full-data reference, a retrain per (kept fraction, arm)."""
    readings = ("grand0", "score") if cfg.grand_at == "init" else ("score",)
    runs: list[Run] = []
    for seed in cfg.seed_range():
        runs += [Run(kind, seed, init=k) for k in range(cfg.inits) for kind in readings]
        runs += [Run("full", seed)] if cfg.full_reference else []
        runs += [Run("prune", seed, arm=arm, fraction=f) for f in cfg.keep_fractions for arm in cfg.arms]
    return runs


def mean_scores(cfg: DataDietConfig, done: dict, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, score averaged over the K scoring runs of ``seed``), sorted by example idx."""
    prefix = "grand0" if name == "grand" and cfg.grand_at == "init" else "score"
    runs = [done[Run(prefix, seed, init=k).key] for k in range(cfg.inits)]
    idx = torch.sort(runs[0]["idx"]).values
    stacked = torch.stack([r[name][torch.argsort(r["idx"])] for r in runs])
    return idx, stacked.mean(0)


def kept_idx(cfg: DataDietConfig, done: dict, run: Run) -> torch.Tensor:
    """The example idx a retrain keeps: the top (bottom, random) ``fraction`` by the arm's mean score."""
    score_name = {"el2n": "el2n", "el2n_lowest": "el2n", "grand": "grand", "random": "el2n"}[run.arm]
    idx, scores = mean_scores(cfg, done, run.seed, score_name)
    keep = int(round(run.fraction * len(idx)))
    mode = {"random": "random", "el2n_lowest": "lowest"}.get(run.arm, "highest")
    gen = torch.Generator().manual_seed(unit_seed(run.key))
    return idx[keep_indices(scores, keep, offset=int(round(cfg.offset * len(idx))), generator=gen, mode=mode)]


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: the plan as units (GraNd at init, scoring runs, retrains)."""
    cfg = DataDietConfig(**loop_config["cfg"])
    session = train.WorkerSession(loop_config)
    tr, val, test = (load_shard(name, session.device) for name in ("train", "val", "test"))
    shape, classes = tuple(tr["x"].shape[1:]), int(loop_config["num_classes"])
    training = Training(
        epoch=lambda m, opt, x, y, gen: train_epoch(m, opt, x, y, batch_size=cfg.batch_size, generator=gen),
        optimizer=cfg.sgd, evaluate=lambda m: accuracy(m, val["x"], val["y"]), device=session.device)

    def fresh(key: str) -> torch.nn.Module:
        """The initialisation seeded by ``key``."""
        torch.manual_seed(unit_seed(key))
        return build_classifier(cfg.arch, shape, classes, hidden=tuple(cfg.hidden))

    def scores(model: torch.nn.Module, with_el2n: bool) -> dict:
        out = {k: tr[k].cpu() for k in ("idx", "y", "y_clean", "flipped")}
        out["grand"] = grand_scores(model, tr["x"], tr["y"]).cpu()
        if with_el2n:
            out["el2n"] = el2n_scores(model, tr["x"], tr["y"]).cpu()
        return session.gather(out)

    def subset(run: Run, done: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(len(tr["idx"])) if run.kind == "full" else \
            torch.isin(tr["idx"].cpu(), kept_idx(cfg, done, run)).nonzero().flatten()
        # each worker trains on the kept rows of its own shard; equal counts keep DDP ranks in step
        share = torch.randperm(len(rows), generator=torch.Generator().manual_seed(unit_seed(run.key)))
        rows = rows[share[:session.smallest(len(rows))]].to(session.device)
        return tr["x"][rows], tr["y"][rows]

    def retrained(model: torch.nn.Module, done: dict, run: Run) -> dict:
        kept = kept_idx(cfg, done, run) if run.kind == "prune" else done[Run("score", run.seed).key]["idx"]
        return {"test_acc": accuracy(model, test["x"], test["y"]), "kept": len(kept), "test_items": len(test["y"])}

    def unit(run: Run) -> Unit:
        """A reading of the scores (GraNd at init, or after the scoring epochs) or a retrain."""
        reading = run.kind in ("grand0", "score")
        return training.unit(
            run.key, {"grand0": 0, "score": cfg.score_epochs}.get(run.kind, cfg.retrain_epochs),
            lambda done: fresh(run.init_key), lambda done: (tr["x"], tr["y"]) if reading else subset(run, done),
            lambda m, done: scores(m, with_el2n=run.kind == "score") if reading else retrained(m, done, run),
            progress=lambda e: {"retrain_epoch": 0 if reading else e + 1})

    run_units(session, [unit(run) for run in plan(cfg)])


def fit(cfg: DataDietConfig, stage: Stage) -> dict:
    """The plan on Ray Train over Ray datasets of the splits; the final state (``done``, ``starts``)."""
    splits = build_splits(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction,
                          val_fraction=cfg.val_fraction, label_noise=cfg.label_noise)
    return stage.fit(train_loop, {"cfg": cfg.model_dump(), "num_classes": splits.num_classes}, cfg,
                     datasets=splits.as_dict())


@dataclass(frozen=True)
class Results:
    """The score table (one row per seed × example), the pruning table (one row per retrained
    model; None without retrains) and where each (re)start of the Train runs began."""

    scores: dict[str, np.ndarray]
    pruning: dict[str, np.ndarray] | None
    starts: list[dict]


def execute(cfg: DataDietConfig, stage: Stage) -> Results:
    """The plan; a claim check runs it twice: scores with 10 % of labels flipped, pruning on clean labels."""
    if not stage.claims:
        stage.log(f"{len(plan(cfg))} units on {cfg.num_workers} Ray Train worker(s)")
        state = fit(cfg, stage)
        pruning = pruning_table(cfg, state["done"]) if cfg.keep_fractions or cfg.full_reference else None
        return Results(score_table(cfg, state["done"]), pruning, state["starts"])
    noisy_cfg = cfg.model_copy(update={"label_noise": 0.1, "keep_fractions": [], "full_reference": False})
    clean_cfg = cfg.model_copy(update={"label_noise": 0.0})
    stage.log(f"noisy-label run: {len(plan(noisy_cfg))} units; pruning run: {len(plan(clean_cfg))} units")
    noisy, clean = fit(noisy_cfg, stage.named("noisy")), fit(clean_cfg, stage.named("clean"))
    return Results(score_table(noisy_cfg, noisy["done"]), pruning_table(clean_cfg, clean["done"]),
                   noisy["starts"] + clean["starts"])


def score_table(cfg: DataDietConfig, done: dict) -> dict[str, np.ndarray]:
    """One row per (seed, example): labels, flip flag, and K-averaged EL2N and GraNd."""
    parts = []
    for seed in cfg.seed_range():
        first = done[Run("score", seed).key]
        order = torch.argsort(first["idx"])
        idx, el2n = mean_scores(cfg, done, seed, "el2n")
        parts.append({"seed": np.full(len(idx), seed), "idx": idx.numpy(), "label": first["y"][order].numpy(),
                      "label_clean": first["y_clean"][order].numpy(), "flipped": first["flipped"][order].numpy(),
                      "el2n": el2n.numpy(), "grand": mean_scores(cfg, done, seed, "grand")[1].numpy()})
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def pruning_table(cfg: DataDietConfig, done: dict) -> dict[str, np.ndarray]:
    """One row per retrained model (and full-data reference): its arm, fraction pruned and accuracies."""
    return columns([{"seed": run.seed, "arm": run.arm or "full", "fraction_pruned": 1 - run.fraction,
                     **{k: done[run.key][k] for k in ("test_acc", "val_acc", "kept", "test_items")}}
                    for run in plan(cfg) if run.kind in ("full", "prune")])


def top_count(examples: int) -> int:
    """How many of a seed's highest scores count as its top 10 %."""
    return max(1, examples // 10)


def noise_detection(scores: dict[str, np.ndarray], name: str) -> tuple[dict[int, float], dict[int, float]]:
    """Per seed: AUROC of ``name`` for "is flipped", and the flipped share among the top 10 % scores."""
    from sklearn.metrics import roc_auc_score

    aurocs, top_shares = {}, {}
    for seed in np.unique(scores["seed"]).tolist():
        rows = scores["seed"] == seed
        flipped, s = scores["flipped"][rows], scores[name][rows]
        aurocs[seed] = float(roc_auc_score(flipped, s))
        top_shares[seed] = float(flipped[np.argsort(s)[-top_count(len(s)):]].mean())
    return aurocs, top_shares


def plot_scores(scores: dict[str, np.ndarray], grand_at: str):
    fig, axes = subplots(1, 2, figsize=(10, 3.5))
    flipped = scores["flipped"].astype(bool)
    for ax, key in zip(axes, ("el2n", "grand")):
        groups = [("clean labels", ~flipped), ("flipped labels", flipped)] if flipped.any() else [("all", ~flipped)]
        for label, mask in groups:
            ax.hist(scores[key][mask], bins=40, alpha=0.6, density=True, label=label)
        ax.set(xlabel="EL2N" if key == "el2n" else f"GraNd (at {grand_at.replace('_', ' ')})", ylabel="density")
        ax.legend()
    fig.suptitle("Data Diet scores, averaged over initialisations")
    return fig


def plot_pruning(table: dict[str, np.ndarray]):
    fig, ax = subplots(figsize=(5.5, 4))
    for arm in sorted(set(table["arm"]) - {"full"}):
        rows = table["arm"] == arm
        fractions = sorted(set(table["fraction_pruned"][rows]))
        acc = [table["test_acc"][rows & (table["fraction_pruned"] == f)] for f in fractions]
        ax.errorbar(fractions, [a.mean() for a in acc], yerr=[a.std() for a in acc], marker="o", capsize=3, label=arm)
    if "full" in set(table["arm"]):
        ax.axhline(table["test_acc"][table["arm"] == "full"].mean(), color="k", ls="--", label="full data")
    ax.set(xlabel="fraction of training data pruned", ylabel="test accuracy")
    ax.legend()
    return fig


def outputs(cfg: DataDietConfig, results: Results) -> Outputs:
    """The scores (results) and pruning tables and their plots; noise detection and accuracy by arm."""
    scores, pruning = results.scores, results.pruning
    metrics: dict = {"examples": int((scores["seed"] == cfg.seed).sum()), "train_starts": results.starts}
    if scores["flipped"].any():
        el2n = noise_detection(scores, "el2n")
        noise = {"el2n_auroc": el2n[0], "el2n_top10_flipped_share": el2n[1],
                 "grand_auroc": noise_detection(scores, "grand")[0]}
        metrics["noise"] = {name: float(np.mean(list(values.values()))) for name, values in noise.items()}
    tables, figures = {"results": scores}, {"scores.png": plot_scores(scores, cfg.grand_at)}
    if pruning is not None:
        tables["pruning"], figures["pruning.png"] = pruning, plot_pruning(pruning)
        metrics["test_acc"] = {}
        for arm, fraction in sorted(set(zip(pruning["arm"], pruning["fraction_pruned"]))):
            acc = pruning["test_acc"][(pruning["arm"] == arm) & (pruning["fraction_pruned"] == fraction)]
            metrics["test_acc"].setdefault(arm, {})[f"{fraction:.2f}"] = float(acc.mean())
    return Outputs(tables, figures, metrics)


def claims(cfg: DataDietConfig, results: Results, outputs: Outputs) -> list:
    """Pruning at 50 % / 30 % vs random, and noisy-label detection (10 % flipped), paired by seed."""
    table, noisy = results.pruning, results.scores
    test_items = int(table["test_items"][0])

    def accs(arm: str, pruned: float) -> dict[int, float]:
        return per_seed(table, "test_acc", arm=arm, fraction_pruned=pruned)

    at_least = "'at least as accurate' is non-inferiority: not worse by more than one accuracy point"
    found = [compare(f"training on the highest-EL2N {1 - p:.0%} of the data is at least as accurate as a "
                     f"random subset of the same size ({p:.0%} pruned)", "test accuracy", accs("el2n", p),
                     accs("random", p), margin=-0.01, why=at_least, trials=test_items)
             for p in (0.5, 0.3) if accs("el2n", p) and accs("random", p)]
    if not found:
        raise UserError("reproduce needs arms el2n and random at keep fractions 0.5 and/or 0.7")
    aurocs, shares = noise_detection(noisy, "el2n")
    found.append(compare("with 10% of labels flipped, EL2N ranks flipped examples well above chance",
                         "AUROC of EL2N for 'is flipped' (baseline: chance; rule: ≥ 0.1 above)", aurocs, 0.5,
                         margin=0.1, why="the stated rule: 'well above chance' is 0.1 AUROC above 0.5"))
    found.append(compare("flipped labels concentrate among the highest EL2N scores",
                         "share of flipped labels in the top 10% EL2N (baseline: the 10% base rate)", shares,
                         float(noisy["flipped"].mean()), trials=top_count(int(sum(noisy["seed"] == cfg.seed))),
                         margin=0.1, why="'concentrate': at least twice the 10% base rate, 10 points above it"))
    if accs("grand", 0.5):
        found.append(compare("GraNd at initialisation is weaker than EL2N (Kirsch 2023 reproduction)",
                             "test accuracy at 50% pruned: EL2N (method) vs GraNd@init (baseline)",
                             accs("el2n", 0.5), accs("grand", 0.5), margin=0.01, trials=test_items,
                             why="'weaker': at least one accuracy point below EL2N"))
    return found


PIPELINE = Pipeline(
    config=DataDietConfig,
    execute=execute,
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: (f"{cfg.seeds} seeds, {cfg.inits} inits, {cfg.score_epochs} score epochs, "
                        f"{cfg.retrain_epochs} retrain epochs"),
    # one Tune trial: score, then retrain on the highest-EL2N ``keep_fractions[0]``; reports val_acc
    trial=lambda cfg: cfg.model_copy(update={"arms": ["el2n"], "keep_fractions": cfg.keep_fractions[:1] or [0.5],
                                             "full_reference": False, "seeds": 1}),
    sweep_metric="val_acc",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 3, "inits": 2, "score_epochs": 2, "retrain_epochs": 6, "hidden": [64, 64],
                  "keep_fractions": [0.7, 0.5], "arms": ["el2n", "random"], "full_reference": False},
        "full": {"seeds": 5, "inits": 5, "score_epochs": 3, "retrain_epochs": 40,
                 "keep_fractions": [0.9, 0.7, 0.5, 0.3], "arms": ["el2n", "grand", "random", "el2n_lowest"]},
    },
)
