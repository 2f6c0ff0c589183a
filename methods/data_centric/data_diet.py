"""Deep Learning on a Data Diet (Paul, Ganguli, Dziugaite, NeurIPS 2021): EL2N and GraNd pruning.

Scores: EL2N = ‖softmax(f(x)) − onehot(y)‖₂ after ``score_epochs`` of training, GraNd = ‖∇_w ℓ‖₂ at
initialisation (or at the score epoch), each averaged over ``inits`` independent initialisations.
Pruning keeps the highest-score fraction (optionally after dropping the ``offset`` highest) and
retrains from scratch; a random subset of the same size is the baseline. The whole plan (scoring
runs, then one retrain per arm × kept fraction, for each seed) runs in one Ray Train job with a
checkpoint every epoch, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.classifiers import accuracy, build_classifier, train_epoch
from methods.data_centric.scores import el2n_scores, grand_scores, keep_indices
from pipelines import train
from pipelines.claims import ClaimReport, compare
from pipelines.config import MethodConfig
from pipelines.data import build_splits, load_shard
from pipelines.registry import Pipeline
from pipelines.results import RunDir
from pipelines.sweep import trial_run
from pipelines.units import Unit, run_units, unit_key, unit_seed

Arm = Literal["el2n", "grand", "random", "el2n_lowest"]


class DataDietConfig(MethodConfig):
    dataset: Literal["digits", "synthetic"] = "digits"
    arch: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field([256, 256], min_length=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    inits: int = Field(5, ge=1, description="K independent initialisations averaged per score")
    score_epochs: int = Field(3, ge=1, description="epochs before EL2N is read")
    grand_at: Literal["init", "score_epoch"] = "init"
    retrain_epochs: int = Field(40, ge=1)
    keep_fractions: list[float] = Field([0.7, 0.5, 0.3], description="fractions of the train set kept")
    arms: list[Arm] = Field(["el2n", "grand", "random"], min_length=1)
    offset: float = Field(0.0, ge=0, lt=1, description="fraction of highest scores dropped first")
    full_reference: bool = True
    label_noise: float = Field(0.0, ge=0, le=0.9)
    seeds: int = Field(1, ge=1, description="replicates: seeds seed, seed+1, …")
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


def plan(cfg: DataDietConfig) -> list[tuple]:
    """Run order: ("score", seed, k), ("full", seed), ("prune", seed, arm, fraction).

    With ``grand_at="init"`` each scoring run is preceded by a zero-epoch unit reading GraNd of
    the same initialisation (key ``grand0/<seed>/<k>``).
    """
    units: list[tuple] = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        units += [("score", seed, k) for k in range(cfg.inits)]
        units += [("full", seed)] if cfg.full_reference else []
        units += [("prune", seed, arm, f) for f in cfg.keep_fractions for arm in cfg.arms]
    return units


def mean_scores(cfg: DataDietConfig, done: dict, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, score averaged over the K scoring runs of ``seed``), sorted by example idx."""
    prefix = "grand0" if name == "grand" and cfg.grand_at == "init" else "score"
    runs = [done[f"{prefix}/{seed}/{k}"] for k in range(cfg.inits)]
    idx = torch.sort(runs[0]["idx"]).values
    stacked = torch.stack([r[name][torch.argsort(r["idx"])] for r in runs])
    return idx, stacked.mean(0)


def kept_idx(cfg: DataDietConfig, done: dict, seed: int, arm: str, fraction: float) -> torch.Tensor:
    score_name = {"el2n": "el2n", "el2n_lowest": "el2n", "grand": "grand", "random": "el2n"}[arm]
    idx, scores = mean_scores(cfg, done, seed, score_name)
    keep = int(round(fraction * len(idx)))
    mode = {"random": "random", "el2n_lowest": "lowest"}.get(arm, "highest")
    gen = torch.Generator().manual_seed(unit_seed(unit_key(("prune", seed, arm, fraction))))
    return idx[keep_indices(scores, keep, offset=int(round(cfg.offset * len(idx))), generator=gen, mode=mode)]


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: the plan as units (GraNd at init, scoring runs, retrains), checkpointed each epoch."""
    cfg = DataDietConfig(**loop_config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    session = train.WorkerSession(cfg.checkpoint_every)
    tr, val, test = (load_shard(name, session.device) for name in ("train", "val", "test"))
    shape, classes = tuple(tr["x"].shape[1:]), int(loop_config["num_classes"])

    def fresh(key: str) -> torch.nn.Module:
        """The initialisation of scoring run ``key`` (its GraNd-at-init unit shares it)."""
        torch.manual_seed(unit_seed(key))
        return build_classifier(cfg.arch, shape, classes, hidden=tuple(cfg.hidden))

    def scores(model: torch.nn.Module, with_el2n: bool) -> dict:
        out = {k: tr[k].cpu() for k in ("idx", "y", "y_clean", "flipped")}
        out["grand"] = grand_scores(model, tr["x"], tr["y"]).cpu()
        if with_el2n:
            out["el2n"] = el2n_scores(model, tr["x"], tr["y"]).cpu()
        return session.gather(out)

    def subset(unit: tuple, done: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(len(tr["idx"])) if unit[0] == "full" else \
            torch.isin(tr["idx"].cpu(), kept_idx(cfg, done, *unit[1:])).nonzero().flatten()
        # each worker trains on the kept rows of its own shard; equal counts keep DDP ranks in step
        share = torch.randperm(len(rows), generator=torch.Generator().manual_seed(unit_seed(unit_key(unit))))
        rows = rows[share[:session.smallest(len(rows))]].to(session.device)
        return tr["x"][rows], tr["y"][rows]

    def retrained(model: torch.nn.Module, done: dict, unit: tuple) -> dict:
        kept = kept_idx(cfg, done, *unit[1:]) if unit[0] == "prune" else done[unit_key(("score", unit[1], 0))]["idx"]
        return {"test_acc": accuracy(model, test["x"], test["y"]), "kept": len(kept)}

    units = []
    for unit in plan(cfg):
        key = unit_key(unit)
        if unit[0] == "score":
            if cfg.grand_at == "init":
                units.append(Unit(f"grand0/{unit[1]}/{unit[2]}", 0, lambda done, k=key: fresh(k),
                                  lambda done: (tr["x"], tr["y"]), lambda m, done: scores(m, with_el2n=False)))
            units.append(Unit(key, cfg.score_epochs, lambda done, k=key: fresh(k), lambda done: (tr["x"], tr["y"]),
                              lambda m, done: scores(m, with_el2n=True), progress=lambda e: {"retrain_epoch": 0}))
        else:
            units.append(Unit(key, cfg.retrain_epochs, lambda done, k=key: fresh(k),
                              lambda done, u=unit: subset(u, done), lambda m, done, u=unit: retrained(m, done, u),
                              progress=lambda e: {"retrain_epoch": e + 1}))
    run_units(session, units, evaluate=lambda m: accuracy(m, val["x"], val["y"]),
              epoch=lambda m, opt, x, y, gen: train_epoch(m, opt, x, y, batch_size=cfg.batch_size, generator=gen),
              optimizer=lambda params, unit: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                             nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay))


def execute(cfg: DataDietConfig, storage: str | None, name: str, callbacks: list | None = None) -> dict:
    """Build the Ray datasets, fit the plan on Ray Train, return the final state.

    ``state["done"]`` holds each unit's results; ``state["starts"]`` where each (re)start of the
    loop began: a resumed run starts after the units and epochs its checkpoint already holds.
    """
    splits = build_splits(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction,
                          val_fraction=cfg.val_fraction, label_noise=cfg.label_noise)
    result = train.fit(train_loop, {"cfg": cfg.model_dump(), "num_classes": splits.num_classes}, cfg,
                       name=name, storage=storage, datasets=splits.as_dict(), callbacks=callbacks)
    return train.read_state(result.checkpoint)


def score_table(cfg: DataDietConfig, done: dict) -> dict[str, np.ndarray]:
    """One row per (seed, example): labels, flip flag, and K-averaged EL2N and GraNd."""
    cols: dict[str, list] = {k: [] for k in ("seed", "idx", "label", "label_clean", "flipped", "el2n", "grand")}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        first = done[unit_key(("score", seed, 0))]
        order = torch.argsort(first["idx"])
        idx, e = mean_scores(cfg, done, seed, "el2n")
        _, g = mean_scores(cfg, done, seed, "grand")
        cols["seed"].append(np.full(len(idx), seed))
        cols["idx"].append(idx.numpy())
        cols["label"].append(first["y"][order].numpy())
        cols["label_clean"].append(first["y_clean"][order].numpy())
        cols["flipped"].append(first["flipped"][order].numpy())
        cols["el2n"].append(e.numpy())
        cols["grand"].append(g.numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def pruning_table(cfg: DataDietConfig, done: dict) -> dict[str, np.ndarray]:
    rows = []
    for unit in plan(cfg):
        if unit[0] == "prune":
            rows.append((unit[1], unit[2], 1 - unit[3], done[unit_key(unit)]))
        elif unit[0] == "full":
            rows.append((unit[1], "full", 0.0, done[unit_key(unit)]))
    return {"seed": np.array([r[0] for r in rows]), "arm": np.array([r[1] for r in rows]),
            "fraction_pruned": np.array([r[2] for r in rows]),
            "test_acc": np.array([r[3]["test_acc"] for r in rows]),
            "val_acc": np.array([r[3]["val_acc"] for r in rows]),
            "kept": np.array([r[3]["kept"] for r in rows])}


def noise_detection(scores: dict[str, np.ndarray], name: str) -> tuple[list[float], list[float]]:
    """Per seed: AUROC of ``name`` for "is flipped", and the flipped share among the top 10 % scores."""
    from sklearn.metrics import roc_auc_score

    aurocs, top_shares = [], []
    for seed in np.unique(scores["seed"]):
        rows = scores["seed"] == seed
        flipped, s = scores["flipped"][rows], scores[name][rows]
        aurocs.append(float(roc_auc_score(flipped, s)))
        top = np.argsort(s)[-max(1, len(s) // 10):]
        top_shares.append(float(flipped[top].mean()))
    return aurocs, top_shares


def plot_scores(run_dir: RunDir, scores: dict[str, np.ndarray], grand_at: str, name: str = "scores.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    flipped = scores["flipped"].astype(bool)
    for ax, key in zip(axes, ("el2n", "grand")):
        groups = [("clean labels", ~flipped), ("flipped labels", flipped)] if flipped.any() else [("all", ~flipped)]
        for label, mask in groups:
            ax.hist(scores[key][mask], bins=40, alpha=0.6, density=True, label=label)
        ax.set_xlabel("EL2N" if key == "el2n" else f"GraNd (at {grand_at.replace('_', ' ')})")
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle("Data Diet scores, averaged over initialisations")
    run_dir.save_figure(fig, name)


def plot_pruning(run_dir: RunDir, table: dict[str, np.ndarray], name: str = "pruning.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm in sorted(set(table["arm"]) - {"full"}):
        rows = table["arm"] == arm
        fractions = sorted(set(table["fraction_pruned"][rows]))
        acc = [table["test_acc"][rows & (table["fraction_pruned"] == f)] for f in fractions]
        ax.errorbar(fractions, [a.mean() for a in acc], yerr=[a.std() for a in acc], marker="o", capsize=3, label=arm)
    if "full" in set(table["arm"]):
        ax.axhline(table["test_acc"][table["arm"] == "full"].mean(), color="k", ls="--", label="full data")
    ax.set_xlabel("fraction of training data pruned")
    ax.set_ylabel("test accuracy")
    ax.legend()
    run_dir.save_figure(fig, name)


def summarize(table: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for arm, f in sorted(set(zip(table["arm"], table["fraction_pruned"]))):
        acc = table["test_acc"][(table["arm"] == arm) & (table["fraction_pruned"] == f)]
        out.setdefault(arm, {})[f"{f:.2f}"] = float(acc.mean())
    return out


def run(cfg: DataDietConfig, run_dir: RunDir) -> dict:
    readings = cfg.seeds * cfg.inits if cfg.grand_at == "init" else 0
    run_dir.log(f"{len(plan(cfg))} training units" + (f" and {readings} GraNd-at-init readings" if readings else "")
                + f" on {cfg.num_workers} Ray Train worker(s)")
    state = execute(cfg, run_dir.storage, "data_diet")
    done = state["done"]
    scores = score_table(cfg, done)
    run_dir.write_table("results.parquet", scores)
    plot_scores(run_dir, scores, cfg.grand_at)
    metrics: dict = {"examples": int((scores["seed"] == cfg.seed).sum()), "deviations": DEVIATIONS,
                     "train_starts": state["starts"]}
    if scores["flipped"].any():
        aurocs, shares = noise_detection(scores, "el2n")
        metrics["noise"] = {"el2n_auroc": float(np.mean(aurocs)), "el2n_top10_flipped_share": float(np.mean(shares)),
                            "grand_auroc": float(np.mean(noise_detection(scores, "grand")[0]))}
    if cfg.keep_fractions or cfg.full_reference:
        table = pruning_table(cfg, done)
        run_dir.write_table("pruning.parquet", table)
        plot_pruning(run_dir, table)
        metrics["test_acc"] = summarize(table)
    return metrics


def reproduce(cfg: DataDietConfig, run_dir: RunDir) -> ClaimReport:
    """Noisy-label detection (10 % flipped) and pruning at 30 % / 50 % vs random, over ``seeds`` seeds."""
    noisy_cfg = cfg.model_copy(update={"label_noise": 0.1, "keep_fractions": [], "full_reference": False})
    clean_cfg = cfg.model_copy(update={"label_noise": 0.0})
    run_dir.log(f"noisy-label run: {len(plan(noisy_cfg))} units; pruning run: {len(plan(clean_cfg))} units")
    noisy = score_table(noisy_cfg, execute(noisy_cfg, run_dir.storage, "noisy")["done"])
    clean_done = execute(clean_cfg, run_dir.storage, "clean")["done"]
    table = pruning_table(clean_cfg, clean_done)
    run_dir.write_table("results.parquet", noisy)
    run_dir.write_table("pruning.parquet", table)
    plot_scores(run_dir, noisy, cfg.grand_at)
    plot_pruning(run_dir, table)

    def accs(arm: str, pruned: float) -> np.ndarray:
        rows = (table["arm"] == arm) & np.isclose(table["fraction_pruned"], pruned)
        return table["test_acc"][rows]

    dev = DEVIATIONS + [f"{cfg.seeds} seeds, {cfg.inits} inits, {cfg.score_epochs} score epochs, "
                        f"{cfg.retrain_epochs} retrain epochs"]
    claims = [compare(f"training on the highest-EL2N {1 - p:.0%} of the data is at least as accurate as a "
                      f"random subset of the same size ({p:.0%} pruned)", "test accuracy",
                      accs("el2n", p), accs("random", p), margin=0.0, deviations=dev)
              for p in (0.5, 0.3) if accs("el2n", p).size and accs("random", p).size]
    if not claims:
        from pipelines.errors import UserError

        raise UserError("reproduce needs arms el2n and random at keep fractions 0.5 and/or 0.7")
    aurocs, shares = noise_detection(noisy, "el2n")
    claims.append(compare("with 10% of labels flipped, EL2N ranks flipped examples well above chance",
                          "AUROC of EL2N for 'is flipped' (baseline: chance; rule: ≥ 0.1 above)",
                          aurocs, [0.5], margin=0.1, deviations=dev))
    claims.append(compare("flipped labels concentrate among the highest EL2N scores",
                          "share of flipped labels in the top 10% EL2N (baseline: the 10% base rate)",
                          shares, [float(noisy["flipped"].mean())], margin=0.0, deviations=dev))
    if accs("grand", 0.5).size:
        claims.append(compare("GraNd at initialisation is weaker than EL2N (Kirsch 2023 reproduction)",
                              "test accuracy at 50% pruned: EL2N (method) vs GraNd@init (baseline)",
                              accs("el2n", 0.5), accs("grand", 0.5), margin=0.0, deviations=dev))
    return ClaimReport(headline=claims[0], more=claims[1:])


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver: score, then retrain on the highest-EL2N ``keep_fractions[0]``; reports val_acc."""
    cfg = DataDietConfig(**config)
    cfg = cfg.model_copy(update={"arms": ["el2n"], "keep_fractions": cfg.keep_fractions[:1] or [0.5],
                                 "full_reference": False, "seeds": 1})
    execute(cfg, storage, **trial_run())


PIPELINE = Pipeline(
    config=DataDietConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="val_acc",
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 3, "inits": 2, "score_epochs": 2, "retrain_epochs": 6, "hidden": [64, 64],
                  "keep_fractions": [0.7, 0.5], "arms": ["el2n", "random"], "full_reference": False},
        "full": {"seeds": 3, "inits": 5, "score_epochs": 3, "retrain_epochs": 40,
                 "keep_fractions": [0.9, 0.7, 0.5, 0.3], "arms": ["el2n", "grand", "random", "el2n_lowest"]},
    },
)
