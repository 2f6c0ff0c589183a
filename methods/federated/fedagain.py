"""FedAgain (Reyes-Amezcua et al., arXiv 2510.06230): dual-signal trust for federated anomaly detection.

Clients train a convolutional autoencoder on their (possibly persistently corrupted) images in a
Flower simulation on Ray; the server weights client i by tau_i = 1 / ((e_i + 1e-6)(d_i + 1e-6)),
e_i the received global model's MSE on the client's data and d_i = 1 - cos(theta_global, theta_i)
(``federated/``). The final global model scores test images by reconstruction MSE; each
(corruption, severity) gives ROC-AUC and precision / recall / F1 at the Youden threshold for clean
versus corrupted copies. Every finished simulation is cached under ``units/``, keyed by its
settings, so re-running a command with the same ``--out`` resumes at the first missing one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from federated.apps import federation
from federated.autoencoder import reconstruction_error
from federated.metrics import corruption_table
from federated.simulation import FedSettings, fitting_client_cpus, simulate
from federated.strategies import STRATEGIES
from methods.engines.corruptions import SEVERITIES
from pipelines.cache import CacheEntry
from pipelines.claims import compare
from pipelines.pipeline import Outputs, Pipeline, Stage
from pipelines.results import columns, group_means, jsonable, subplots

SCORES = ("auc", "precision", "recall", "f1")


class FedAgainConfig(FedSettings):
    """The federation's settings plus the severities the final global model is evaluated at."""

    severities: list[Literal[SEVERITIES]] = Field(list(SEVERITIES), min_length=1, description="evaluated severities")


@dataclass(frozen=True)
class Arm:
    """One simulation: its scenario (run, corrupted, forgers), strategy, seed and number of forgers."""

    scenario: str
    strategy: str
    seed: int
    forgers: int

    def settings(self, cfg: FedAgainConfig) -> FedAgainConfig:
        return cfg.model_copy(update={"strategy": self.strategy, "seed": self.seed, "forgers": self.forgers})


@dataclass(frozen=True)
class Simulation:
    """A finished arm: rows per corruption × severity, per FedAgain trust score and per round; the roles."""

    arm: Arm
    detection: list[dict]
    trust: list[dict]
    rounds: list[dict]
    roles: dict[str, str]


def arms(cfg: FedAgainConfig, claims: bool) -> list[Arm]:
    """A run: ``cfg.strategy``. The claim check: FedAgain and FedAvg with corrupted clients, then (with
    ``forgers``) every strategy with forgers as well."""
    if not claims:
        return [Arm("run", cfg.strategy, cfg.seed, cfg.forgers)]
    corrupted = [Arm("corrupted", s, seed, 0) for seed in cfg.seed_range() for s in ("fedagain", "fedavg")]
    forged = [Arm("forgers", s, seed, cfg.forgers) for seed in cfg.seed_range() for s in STRATEGIES]
    return corrupted + (forged if cfg.forgers else [])


def detection_rows(cfg: FedAgainConfig, model) -> list[dict]:
    """One row per (corruption, severity): clean vs corrupted test copies, scored by reconstruction MSE."""
    return corruption_table(lambda x: reconstruction_error(model, x), federation(cfg).test, cfg.corruptions,
                            cfg.severities, cfg.seed)


def simulation(cfg: FedAgainConfig, arm: Arm, stage: Stage) -> Simulation:
    """Arm ``arm`` from the run's cache of finished simulations (``<out>/units``), simulated if missing."""
    settings = arm.settings(cfg)
    entry = CacheEntry(Path(stage.storage).parent / "units", "simulation", settings.model_dump(mode="json"))
    if not entry.ready:
        stage.log(f"{arm.scenario}: {arm.strategy}, seed {arm.seed}")
        result = simulate(settings)
        record = {"detection": detection_rows(settings, result.model()), "trust": result.trust_rows(),
                  "rounds": result.round_rows(), "roles": {str(k): v for k, v in result.roles.items()}}
        if failed := sum(r["train_failures"] + r["evaluate_failures"] for r in record["rounds"]):
            stage.log(f"{failed} client failures (see rounds.parquet); their rounds aggregated the rest")
        if not np.isfinite(record["rounds"][-1]["test_mse"]):
            stage.log(f"{arm.strategy} diverged (non-finite test MSE): it scores as detecting nothing")
        entry.write(lambda folder: (folder / "simulation.json").write_text(json.dumps(jsonable(record))))
    return Simulation(arm, **json.loads((entry.path / "simulation.json").read_text()))


def execute(cfg: FedAgainConfig, stage: Stage) -> list[Simulation]:
    """The arms' simulations, or a Tune trial's one simulation reporting its mean scores after every round."""
    if stage.tune_report is None:
        return [simulation(cfg, arm, stage) for arm in arms(cfg, stage.claims)]

    def report(server_round: int, model) -> dict:
        if server_round == 0:
            return {}
        rows = detection_rows(cfg, model)
        scores = {k: float(np.mean([row[k] for row in rows])) for k in SCORES}
        stage.tune_report({"round": server_round, **scores})
        return scores

    simulate(cfg, on_round=report)
    return []


def summary_table(detection) -> dict:
    """Mean and std over seeds of the per-seed mean scores, per (scenario, strategy)."""
    seeds = detection.groupby(["scenario", "strategy", "seed"])[list(SCORES)].mean()
    stats = seeds.groupby(level=["scenario", "strategy"], sort=False).agg(["mean", "std"])
    stats.columns = [f"{score}_{stat}" for score, stat in stats.columns]
    return columns(stats.reset_index().to_dict("records"))


def plot_f1(detection, scenario: str):
    rows = detection[detection.scenario == scenario]
    strategies = list(dict.fromkeys(rows.strategy))
    fig, axes = subplots(1, len(strategies), figsize=(2.6 * len(strategies) + 1, 5.5), squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        grid = rows[rows.strategy == strategy].groupby(["corruption", "severity"]).f1.mean().unstack()
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(xticks=range(grid.shape[1]), xticklabels=grid.columns, xlabel="severity", yticks=range(grid.shape[0]),
               yticklabels=grid.index if ax is axes[0][0] else [""] * grid.shape[0])
        ax.set_title(f"{strategy}\nmean F1 {grid.to_numpy().mean():.3f}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="F1 at the Youden threshold")
    fig.suptitle(f"anomaly detection F1, corruption × severity ({scenario}; mean over seeds)")
    return fig


def plot_trust(trust):
    scenarios = list(dict.fromkeys(trust.scenario))
    fig, axes = subplots(1, len(scenarios), figsize=(5 * len(scenarios), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for kind, group in trust[trust.scenario == scenario].groupby("kind"):
            stats = group.groupby("round").relative_weight.agg(["mean", "min", "max"])
            clients = len(group.groupby(["seed", "partition_id"]))
            ax.plot(stats.index, stats["mean"], marker="o", label=f"{kind} ({clients} clients × seeds)")
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(xlabel="round", ylabel="FedAgain weight × sampled clients", title=scenario)
        ax.legend(fontsize=8)
    fig.suptitle("trust trajectories: mean (band: min-max) over clients and seeds")
    return fig


def run_metrics(run: Simulation, detection: dict, trust: dict) -> dict:
    """A run's headline: scores, F1 by severity, trust by kind, final test MSE and failed replies by round."""
    failures = {r["round"]: {"train": r["train_failures"], "evaluate": r["evaluate_failures"]}
                for r in run.rounds if r["train_failures"] or r["evaluate_failures"]}
    by_kind = group_means(trust, "kind") if trust else {}
    return {"strategy": run.arm.strategy, "seed": run.arm.seed, "roles": run.roles,
            **{k: float(np.mean(detection[k])) for k in SCORES},
            "f1_by_severity": {severity: means["f1"] for severity, means in group_means(detection, "severity").items()},
            "relative_trust_by_kind": {kind: means["relative_weight"] for kind, means in by_kind.items()},
            "final_test_mse": run.rounds[-1]["test_mse"], "failures": failures,
            "failed_clients": sum(f["train"] + f["evaluate"] for f in failures.values())}


def outputs(cfg: FedAgainConfig, sims: list[Simulation]) -> Outputs:
    """Detection (results), trust, rounds and summary tables, F1 heatmaps and trust trajectories; a run's metrics."""
    detection, trust, rounds = (columns([{**asdict(s.arm), **row} for s in sims for row in getattr(s, name)])
                                for name in ("detection", "trust", "rounds"))
    tables = {name: table for name, table in (("results", detection), ("trust", trust), ("rounds", rounds)) if table}
    tables["summary"] = summary_table(pd.DataFrame(detection))
    scenarios = list(dict.fromkeys(detection["scenario"]))
    figures = {f"f1_heatmap{'_' + scenario if number else ''}.png": plot_f1(pd.DataFrame(detection), scenario)
               for number, scenario in enumerate(scenarios)}
    if trust:
        figures["trust.png"] = plot_trust(pd.DataFrame(trust))
    return Outputs(tables, figures, run_metrics(sims[0], detection, trust) if scenarios == ["run"] else {})


def claims(cfg: FedAgainConfig, sims: list[Simulation], out: Outputs) -> list:
    """FedAgain vs FedAvg with corrupted clients (F1, precision, trust, gain by severity), then with forgers;
    every arm paired by seed."""
    det, trust = pd.DataFrame(out.tables["results"]), pd.DataFrame(out.tables.get("trust", {}))

    def scores(scenario: str, strategy: str) -> pd.DataFrame:
        """Mean scores over corruptions × severities, one row per seed."""
        return det[(det.scenario == scenario) & (det.strategy == strategy)].groupby("seed")[list(SCORES)].mean()

    def relative_trust(scenario: str) -> dict:
        """FedAgain's mean relative weight (weight × sampled clients; 1 = equal share): kind → seed → weight."""
        rows = trust[(trust.scenario == scenario) & (trust.strategy == "fedagain")] if len(trust) else trust
        return rows.groupby(["seed", "kind"]).relative_weight.mean().unstack().to_dict() if len(rows) else {}

    at_least = {"margin": -0.01, "why": "'at least FedAvg's' is non-inferiority: not worse by more than one point"}
    less_weight = {"margin": 0.1, "higher_is_better": False,
                   "why": "a tenth of an equal share; a smaller cut leaves the client's pull on the aggregate intact"}
    share, mean_over = f"{cfg.corrupted_ratio:.0%} corrupted clients", "mean over corruptions × severities"
    again, avg = scores("corrupted", "fedagain"), scores("corrupted", "fedavg")
    found = [compare(f"FedAgain's {name} is at least FedAvg's with {share}", f"{name} at the Youden threshold, "
                     f"{mean_over}", again[score].to_dict(), avg[score].to_dict(), **at_least)
             for name, score in (("F1", "f1"), ("precision", "precision"))]
    if {"clean", "corrupted"} <= set(weights := relative_trust("corrupted")):
        found.append(compare("FedAgain gives corrupted clients less weight than clean ones",
                             "FedAgain weight × sampled clients (1 = equal share): corrupted (method) "
                             "vs clean (baseline)", weights["corrupted"], weights["clean"], **less_weight))
    lo, hi = min(cfg.severities), max(cfg.severities)
    if hi > lo:
        rows = det[det.scenario == "corrupted"].groupby(["strategy", "seed", "severity"]).f1.mean()
        gain = rows["fedagain"] - rows["fedavg"]
        found.append(compare("FedAgain's F1 gain over FedAvg is largest at high severity",
                             f"F1 gain over FedAvg at severity {hi} (method) vs severity {lo} (baseline)",
                             gain.xs(hi, level="severity").to_dict(), gain.xs(lo, level="severity").to_dict(),
                             margin=0.01, why="one F1 point: the gain must grow with severity by more than that"))
    if cfg.forgers:
        found.append(compare(f"with {cfg.forgers} forgers as well, FedAgain's F1 is at least FedAvg's",
                             f"F1 at the Youden threshold, {mean_over}", scores("forgers", "fedagain").f1.to_dict(),
                             scores("forgers", "fedavg").f1.to_dict(), **at_least))
        if {"clean", "forger"} <= set(weights := relative_trust("forgers")):
            found.append(compare("FedAgain suppresses forger clients", "FedAgain weight × sampled clients: "
                                 "forger (method) vs clean (baseline)", weights["forger"], weights["clean"],
                                 **less_weight))
    return found


PIPELINE = Pipeline(
    config=FedAgainConfig,
    execute=execute,
    outputs=outputs,
    deviations=[
        "data: sklearn digits 0-4 (8×8) or 32×32 crops of sklearn's sample photos, not kidney-stone images",
        "model: 3 conv + 3 deconv autoencoder (BN), latent 32, instead of the 256×256 five-layer model",
        "corruptions: NumPy re-implementations of the 16 endoscopy corruptions (methods/engines/corruptions.py)",
        "divergence leaves out the integer BN counters num_batches_tracked (see federated/aggregation.py)",
        "Flower samples clients by random node id, so the per-round client sample is not set by the seed",
    ],
    claims=claims,
    budget=lambda cfg: (f"{cfg.seeds} seeds, {cfg.clients} clients, {cfg.rounds} rounds, fraction_fit "
                        f"{cfg.fraction_fit}, {cfg.local_epochs} local epochs, {len(cfg.corruptions)} "
                        f"corruptions × severities {cfg.severities}"),
    # one Tune trial: one simulation whose client actors fit in the CPUs the trial leaves free
    trial=lambda cfg: cfg.model_copy(update={"client_cpus": fitting_client_cpus(cfg.client_cpus)}),
    sweep_metric="f1",
    max_concurrent_trials=1,  # Flower sizes its actor pool by the whole cluster: one simulation at a time
    profiles={
        "quick": {"seeds": 3, "clients": 10, "rounds": 8, "fraction_fit": 0.5, "local_epochs": 2,
                  "corrupted_ratio": 0.3, "forgers": 2},
        "full": {"seeds": 5, "clients": 10, "rounds": 15, "fraction_fit": 0.5, "local_epochs": 3,
                 "corrupted_ratio": 0.3, "forgers": 2},
    },
)
