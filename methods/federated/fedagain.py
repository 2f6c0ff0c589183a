"""FedAgain (Reyes-Amezcua et al., arXiv 2510.06230): dual-signal trust for federated anomaly detection.

Clients train a convolutional autoencoder on their (possibly persistently corrupted) images in a
Flower simulation on Ray; the server weights client i by tau_i = 1 / ((e_i + 1e-6)(d_i + 1e-6)),
e_i the received global model's MSE on the client's data and d_i = 1 - cos(theta_global, theta_i)
(``federated/``). The final global model scores test images by reconstruction MSE; each
(corruption, severity) gives ROC-AUC and precision / recall / F1 at the Youden threshold for clean
versus corrupted copies. Every simulation ("unit") is stored under ``units/``, so re-running a
command with the same ``--out`` resumes at the first missing unit.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from federated.apps import federation
from federated.autoencoder import reconstruction_error
from federated.clients import Attack
from federated.metrics import corruption_table
from federated.simulation import FedSettings, simulate
from federated.strategies import STRATEGIES, StrategyName
from methods.engines.corruptions import CORRUPTIONS, SEVERITIES, CorruptionNames
from pipelines.claims import ClaimReport, compare
from pipelines.config import MethodConfig
from pipelines.registry import Pipeline
from pipelines.results import RunDir

RENAMED = {"clients": "num_clients", "rounds": "num_rounds", "fraction_fit": "fraction_train",
           "min_fit_clients": "min_train_clients", "corrupted_ratio": "corrupted_fraction",
           "forgers": "num_forgers", "client_cpus": "num_cpus"}  # config key -> FedSettings field
SCORES = ("auc", "precision", "recall", "f1")


class FedAgainConfig(MethodConfig):
    strategy: StrategyName = Field("fedagain", description=f"aggregation: {', '.join(STRATEGIES)}")
    clients: int = Field(10, ge=2)
    rounds: int = Field(15, ge=1)
    fraction_fit: float = Field(0.5, gt=0, le=1, description="share of clients sampled per round")
    min_fit_clients: int = Field(2, ge=1, description="sampled per round: max(int(clients × fraction_fit), this)")
    fraction_evaluate: float = Field(0.0, ge=0, le=1, description="federated evaluation share (0: none)")
    corrupted_ratio: float = Field(0.3, ge=0, lt=1, description="clients with one corruption at severity 3-5")
    forgers: int = Field(0, ge=0, description="clients that send crafted updates")
    forger_attack: Attack = "signflip"
    forger_scale: float = Field(10.0, gt=0)
    corruptions: CorruptionNames = Field(sorted(CORRUPTIONS), min_length=1)
    severities: list[int] = Field(list(SEVERITIES), min_length=1, description="evaluated severities")
    dataset: Literal["digits", "sample_crops"] = "digits"
    normal_classes: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration")
    local_epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=2)
    latent_dim: int = Field(32, ge=1)
    width: int = Field(16, ge=1)
    trimmed_beta: float = Field(0.2, ge=0, lt=0.5, description="fedtrimmedavg")
    krum_malicious: int = Field(0, ge=0, description="krum's assumed number of malicious clients")
    client_cpus: float = Field(1.0, gt=0, description="CPUs per client actor")
    client_gpus: float | None = Field(None, ge=0, description="GPUs per client actor (default: use_gpu)")
    round_timeout: float = Field(120.0, gt=0, description="seconds a round waits for replies")
    crash_clients: list[int] = Field([], description="partitions whose ClientApp raises (fault test)")
    vanish_clients: list[int] = Field([], description="partitions whose process dies mid-round")
    seeds: int = Field(1, ge=1, description="reproduce: seeds seed, seed+1, …")

    @field_validator("severities")
    @classmethod
    def _severities(cls, values: list[int]) -> list[int]:
        if not set(values) <= set(SEVERITIES):
            raise ValueError(f"severities must be in {list(SEVERITIES)}")
        return values

    @field_validator("min_fit_clients", "forgers", "crash_clients", "vanish_clients")
    @classmethod
    def _fits_clients(cls, value, info: ValidationInfo):
        """Checks against ``clients`` (validated earlier), so errors name the user's keys."""
        k = info.data.get("clients")
        if k is None:
            return value
        if info.field_name == "min_fit_clients":
            if value > k:
                raise ValueError(f"{value} clients sampled per round but only clients={k} exist")
        elif info.field_name == "forgers":
            if int(info.data.get("corrupted_ratio", 0) * k) + value > k:
                raise ValueError(f"int(corrupted_ratio × clients) + forgers exceeds clients={k}")
        elif any(not 0 <= pid < k for pid in value):
            raise ValueError(f"partition ids must be in [0, clients={k})")
        return value


DEVIATIONS = [
    "data: sklearn digits 0-4 (8×8) or 32×32 crops of sklearn's sample photos, not kidney-stone images",
    "model: 3 conv + 3 deconv autoencoder (BN), latent 32, instead of the 256×256 five-layer model",
    "corruptions: NumPy re-implementations of the 16 endoscopy corruptions (methods/engines/corruptions.py)",
    "divergence leaves out the integer BN counters num_batches_tracked (see federated/aggregation.py)",
    "Flower samples clients by random node id, so the per-round client sample is not set by the seed",
    "Ray Train fields (num_workers, cpus_per_worker, max_failures, checkpoint_every) do not apply; "
    "clients run as Flower actors with client_cpus / client_gpus",
]


def fed_settings(cfg: FedAgainConfig, **update) -> FedSettings:
    """The core's settings from the user-facing config; ``update`` uses FedSettings names."""
    raw = {RENAMED.get(k, k): v for k, v in cfg.model_dump().items()}
    raw["num_gpus"] = cfg.client_gpus if cfg.client_gpus is not None else float(cfg.use_gpu)
    raw = {k: v for k, v in raw.items() if k in FedSettings.model_fields}
    return FedSettings(**{**raw, **update})


def detection_rows(cfg: FedAgainConfig, model, test: np.ndarray, seed: int) -> list[dict]:
    """One row per (corruption, severity): clean vs corrupted test copies, scored by recon MSE."""
    return corruption_table(lambda x: reconstruction_error(model, x), test, cfg.corruptions,
                            cfg.severities, seed)


def run_unit(cfg: FedAgainConfig, run_dir: RunDir, scenario: str, strategy: str, seed: int,
             forgers: int) -> dict:
    """One simulation and its evaluation; stored as ``units/<scenario>-<strategy>-<seed>.json``."""
    name = f"units/{scenario}-{strategy}-{seed}.json"
    if (run_dir.path / name).exists():
        return json.loads((run_dir.path / name).read_text())
    run_dir.log(f"{scenario}: {strategy}, seed {seed}")
    result = simulate(fed_settings(cfg, strategy=strategy, seed=seed, num_forgers=forgers))
    test = federation(result.settings).test
    per_round = Counter(row["round"] for row in result.trust)
    trust = [{**row, "role": result.roles[row["partition_id"]],
              "kind": result.roles[row["partition_id"]].split(":")[0],
              "relative_weight": row["weight"] * per_round[row["round"]]} for row in result.trust]
    rounds = [{"round": r, "test_mse": m["test_mse"], "seconds": m["seconds"],
               "train_failures": result.failures.get(r, {}).get("train", 0),
               "evaluate_failures": result.failures.get(r, {}).get("evaluate", 0)}
              for r, m in sorted(result.server_metrics.items())]
    failed = sum(r["train_failures"] + r["evaluate_failures"] for r in rounds)
    if failed:
        run_dir.log(f"{failed} client failures (see rounds.parquet); their rounds aggregated the rest")
    if not np.isfinite(rounds[-1]["test_mse"]):
        run_dir.log(f"{strategy} diverged (non-finite test MSE): it scores as detecting nothing")
    unit = {"scenario": scenario, "strategy": strategy, "seed": seed,
            "detection": detection_rows(cfg, result.model(), test, seed), "trust": trust,
            "rounds": rounds, "roles": {str(k): v for k, v in result.roles.items()}}
    run_dir.write_json(name, unit)
    return unit


def frames(units: list[dict]) -> dict:
    """pandas frames "detection", "trust" and "rounds" over units, keyed by scenario, strategy, seed."""
    import pandas as pd

    return {table: pd.DataFrame([{"scenario": u["scenario"], "strategy": u["strategy"], "seed": u["seed"],
                                  **row} for u in units for row in u[table]])
            for table in ("detection", "trust", "rounds")}


def write_tables(run_dir: RunDir, tables: dict) -> None:
    for table, file in (("detection", "results.parquet"), ("trust", "trust.parquet"),
                        ("rounds", "rounds.parquet")):
        if len(tables[table]):
            run_dir.write_table(file, {c: tables[table][c].to_numpy() for c in tables[table]})


def per_seed(detection, scenario: str, strategy: str):
    """Mean scores over corruptions × severities, one row per seed (sorted)."""
    rows = detection[(detection.scenario == scenario) & (detection.strategy == strategy)]
    return rows.groupby("seed")[list(SCORES)].mean()


def relative_trust(trust, scenario: str):
    """FedAgain's mean relative weight (weight × sampled clients; 1 = equal share), seed × kind."""
    rows = trust[(trust.scenario == scenario) & (trust.strategy == "fedagain")] if len(trust) else trust
    return rows.groupby(["seed", "kind"]).relative_weight.mean().unstack() if len(rows) else None


def plot_f1(run_dir: RunDir, detection, scenario: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = detection[detection.scenario == scenario]
    strategies = list(dict.fromkeys(rows.strategy))
    fig, axes = plt.subplots(1, len(strategies), figsize=(2.6 * len(strategies) + 1, 5.5), squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        grid = rows[rows.strategy == strategy].groupby(["corruption", "severity"]).f1.mean().unstack()
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns)
        ax.set_yticks(range(grid.shape[0]), grid.index if ax is axes[0][0] else [""] * grid.shape[0])
        ax.set_xlabel("severity")
        ax.set_title(f"{strategy}\nmean F1 {grid.to_numpy().mean():.3f}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="F1 at the Youden threshold")
    fig.suptitle(f"anomaly detection F1, corruption × severity ({scenario}; mean over seeds)")
    run_dir.save_figure(fig, name)


def plot_trust(run_dir: RunDir, trust, name: str = "trust.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(trust.scenario))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = trust[trust.scenario == scenario]
        for kind, group in rows.groupby("kind"):
            stats = group.groupby("round").relative_weight.agg(["mean", "min", "max"])
            clients = len(group.groupby(["seed", "partition_id"]))
            ax.plot(stats.index, stats["mean"], marker="o", label=f"{kind} ({clients} clients × seeds)")
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel("FedAgain weight × sampled clients")
        ax.set_title(scenario)
        ax.legend(fontsize=8)
    fig.suptitle("trust trajectories: mean (band: min-max) over clients and seeds")
    run_dir.save_figure(fig, name)


def run(cfg: FedAgainConfig, run_dir: RunDir) -> dict:
    """One simulation of ``cfg.strategy``: detection table, trust, rounds and failures, plots."""
    unit = run_unit(cfg, run_dir, "run", cfg.strategy, cfg.seed, cfg.forgers)
    tables = frames([unit])
    write_tables(run_dir, tables)
    det, trust = tables["detection"], tables["trust"]
    plot_f1(run_dir, det, "run", "f1_heatmap.png")
    if len(trust):
        plot_trust(run_dir, trust)
    failures = {r["round"]: {"train": r["train_failures"], "evaluate": r["evaluate_failures"]}
                for r in unit["rounds"] if r["train_failures"] or r["evaluate_failures"]}
    return {"strategy": cfg.strategy, "seed": cfg.seed, "roles": unit["roles"],
            **{k: float(det[k].mean()) for k in SCORES},
            "f1_by_severity": det.groupby("severity").f1.mean().to_dict(),
            "relative_trust_by_kind": trust.groupby("kind").relative_weight.mean().to_dict() if len(trust) else {},
            "final_test_mse": unit["rounds"][-1]["test_mse"], "failures": failures,
            "failed_clients": sum(f["train"] + f["evaluate"] for f in failures.values()),
            "deviations": DEVIATIONS}


def summary_table(detection):
    """Mean and std over seeds of the per-seed mean scores, per (scenario, strategy)."""
    seeds = detection.groupby(["scenario", "strategy", "seed"])[list(SCORES)].mean()
    stats = seeds.groupby(level=["scenario", "strategy"], sort=False).agg(["mean", "std"])
    stats.columns = [f"{score}_{stat}" for score, stat in stats.columns]
    return stats.reset_index()


def reproduce(cfg: FedAgainConfig, run_dir: RunDir) -> ClaimReport:
    """FedAgain vs FedAvg with corrupted clients; then all five strategies with ``forgers`` forgers."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    units = [run_unit(cfg, run_dir, "corrupted", s, seed, 0) for seed in seeds for s in ("fedagain", "fedavg")]
    if cfg.forgers:
        units += [run_unit(cfg, run_dir, "forgers", s, seed, cfg.forgers) for seed in seeds for s in STRATEGIES]
    tables = frames(units)
    write_tables(run_dir, tables)
    det, trust = tables["detection"], tables["trust"]
    summary = summary_table(det)
    run_dir.write_table("summary.parquet", {c: summary[c].to_numpy() for c in summary})
    for line in summary.round(4).to_string(index=False).splitlines():
        run_dir.log(line)
    plot_f1(run_dir, det, "corrupted", "f1_heatmap.png")
    if cfg.forgers:
        plot_f1(run_dir, det, "forgers", "f1_heatmap_forgers.png")
    plot_trust(run_dir, trust)

    share = f"{cfg.corrupted_ratio:.0%} corrupted clients"
    dev = DEVIATIONS + [f"{cfg.seeds} seeds, {cfg.clients} clients, {cfg.rounds} rounds, fraction_fit "
                        f"{cfg.fraction_fit}, {cfg.local_epochs} local epochs, {len(cfg.corruptions)} "
                        f"corruptions × severities {cfg.severities}"]
    again, avg = per_seed(det, "corrupted", "fedagain"), per_seed(det, "corrupted", "fedavg")
    claims = [compare(f"FedAgain's F1 is at least FedAvg's with {share}", "F1 at the Youden threshold, mean "
                      "over corruptions × severities", again.f1, avg.f1, deviations=dev),
              compare(f"FedAgain's precision is at least FedAvg's with {share}", "precision at the Youden "
                      "threshold, mean over corruptions × severities", again.precision, avg.precision,
                      deviations=dev)]
    weights = relative_trust(trust, "corrupted")
    if weights is not None and {"clean", "corrupted"} <= set(weights):
        claims.append(compare("FedAgain gives corrupted clients less weight than clean ones",
                              "FedAgain weight × sampled clients (1 = equal share): corrupted (method) "
                              "vs clean (baseline)", weights.corrupted, weights.clean,
                              higher_is_better=False, deviations=dev))
    lo, hi = min(cfg.severities), max(cfg.severities)
    if hi > lo:
        rows = det[det.scenario == "corrupted"].groupby(["strategy", "seed", "severity"]).f1.mean()
        gain = rows["fedagain"] - rows["fedavg"]
        claims.append(compare("FedAgain's F1 gain over FedAvg is largest at high severity",
                              f"F1 gain over FedAvg at severity {hi} (method) vs severity {lo} (baseline)",
                              gain.xs(hi, level="severity"), gain.xs(lo, level="severity"), deviations=dev))
    if cfg.forgers:
        claims.append(compare(f"with {cfg.forgers} forgers as well, FedAgain's F1 is at least FedAvg's",
                              "F1 at the Youden threshold, mean over corruptions × severities",
                              per_seed(det, "forgers", "fedagain").f1, per_seed(det, "forgers", "fedavg").f1,
                              deviations=dev))
        weights = relative_trust(trust, "forgers")
        if weights is not None and {"clean", "forger"} <= set(weights):
            claims.append(compare("FedAgain suppresses forger clients", "FedAgain weight × sampled clients: "
                                  "forger (method) vs clean (baseline)", weights.forger, weights.clean,
                                  higher_is_better=False, deviations=dev))
    return ClaimReport(headline=claims[0], more=claims[1:])


def fitting_client_cpus(wanted: float, wait_s: float = 60.0) -> float:
    """CPUs per client actor such that Flower's pool, int(total / c) actors, fits in the CPUs free
    now (Tune trials hold some): n actors of free / n CPUs, n <= free / wanted and
    n < free / (total - free). Waits up to ``wait_s`` for a previous simulation's actors to exit."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        total, free = ray.cluster_resources()["CPU"], ray.available_resources().get("CPU", 0.0)
        n = max(1, int(free // wanted))
        if total > free:
            n = min(n, math.ceil(free / (total - free)) - 1)
        if n >= 1:
            return free / n
        if time.monotonic() > deadline:
            raise RuntimeError(f"{free:g} of {total:g} CPUs free: too few for a Flower simulation")
        time.sleep(1.0)


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver: one simulation; after every round reports the global model's mean AUC,
    precision, recall and F1 (the sweep metric) over corruptions × severities."""
    from ray import tune

    cfg = FedAgainConfig(**config)
    settings = fed_settings(cfg)
    test = federation(settings).test

    def report(server_round: int, model) -> dict:
        if server_round == 0:
            return {}
        rows = detection_rows(cfg, model, test, cfg.seed)
        scores = {k: float(np.mean([r[k] for r in rows])) for k in SCORES}
        tune.report({"round": server_round, **scores})
        return scores

    simulate(settings.model_copy(update={"num_cpus": fitting_client_cpus(cfg.client_cpus)}), on_round=report)


PIPELINE = Pipeline(
    config=FedAgainConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="f1",
    sweep_mode="max",
    max_concurrent_trials=1,  # Flower sizes its actor pool by the whole cluster: one simulation at a time
    profiles={
        "quick": {"seeds": 3, "clients": 10, "rounds": 8, "fraction_fit": 0.5, "local_epochs": 2,
                  "corrupted_ratio": 0.3, "forgers": 2},
        "full": {"seeds": 5, "clients": 10, "rounds": 15, "fraction_fit": 0.5, "local_epochs": 3,
                 "corrupted_ratio": 0.3, "forgers": 2},
    },
)
