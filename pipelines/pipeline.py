"""The declarative pipeline: what a method module gives, and the commands the spine derives from it.

A method gives its config, ``execute(cfg, stage)`` (the method on Ray: a Train plan through
``stage.fit``, or, for methods that are not a Train plan, Flower or bare Ray tasks), ``outputs``
(tables, figures and headline metrics of the results), ``claims`` and its deviations from the paper.
The spine derives ``run`` (execute, write the outputs), ``reproduce`` (the same under the claim
check's stage, then the claims, with the deviations and the budget attached) and the Ray Tune
trial, and writes every output once.

Methods whose ``execute`` is a Train plan report to Tune through Train (``stage.callbacks``);
methods that are not report through ``stage.tune_report`` (per round, say) or, once at the end,
through ``tune_metrics(cfg, results)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

from pipelines import train
from pipelines.claims import Claim, ClaimReport
from pipelines.config import MethodConfig
from pipelines.errors import UserError
from pipelines.results import RunDir

Purpose = Literal["run", "reproduce", "trial"]


@dataclass(frozen=True)
class Stage:
    """Where one execution runs: its purpose, the Ray storage, the Train run name, the log and, in a
    Tune trial, Train's report callbacks and Tune's report function."""

    purpose: Purpose
    storage: str
    name: str
    log: Callable[[str], None] = print
    callbacks: list | None = None
    tune_report: Callable[[dict], None] | None = None

    @property
    def claims(self) -> bool:
        """A claim check runs every arm its claims compare."""
        return self.purpose == "reproduce"

    def named(self, suffix: str) -> "Stage":
        """The stage of one of several Train runs of an execution (``<name>-<suffix>``)."""
        return replace(self, name=f"{self.name}-{suffix}")

    def fit(self, loop: Callable[[dict], None], loop_config: dict, cfg, datasets: dict | None = None) -> dict:
        """``loop`` on Ray Train (resumed from this stage's checkpoints); the state of its last checkpoint."""
        result = train.fit(loop, loop_config, cfg, name=self.name, storage=self.storage, datasets=datasets,
                           callbacks=self.callbacks)
        return train.read_state(result.checkpoint)


@dataclass(frozen=True)
class Outputs:
    """What a run writes: parquet ``tables`` (name → columns; ``results`` is ``results.parquet``),
    PNG ``figures`` (file name → matplotlib figure) and headline ``metrics`` for ``metrics.json``."""

    tables: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """What a method module exposes as ``PIPELINE``.

    ``claims(cfg, results, outputs)`` gives the claim check's claims, the headline first;
    ``budget(cfg)`` the line of the claim check's budget added to the deviations. ``trial(cfg)`` is
    the config one Tune trial runs (None: the method has no sweep); ``sweep_metric`` is reported
    by every trial, at most ``max_concurrent_trials`` at once. ``profiles`` holds the config
    overrides named ``quick`` and ``full`` that ``reproduce`` starts from.
    """

    config: type[MethodConfig]
    execute: Callable[[Any, Stage], Any]
    outputs: Callable[[Any, Any], Outputs]
    deviations: tuple[str, ...] | list[str] = ()
    claims: Callable[[Any, Any, Outputs], list[Claim]] | None = None
    budget: Callable[[Any], str] | None = None
    trial: Callable[[Any], Any] | None = None
    tune_metrics: Callable[[Any, Any], dict] | None = None
    sweep_metric: str = ""
    sweep_mode: Literal["min", "max"] = "max"
    max_concurrent_trials: int = 2
    profiles: dict[str, dict] = field(default_factory=dict)


def write_outputs(run_dir: RunDir, outputs: Outputs) -> None:
    for name, columns in outputs.tables.items():
        run_dir.write_table(f"{name}.parquet", columns)
    for name, figure in outputs.figures.items():
        run_dir.save_figure(figure, name)


def run(pipeline: Pipeline, cfg, run_dir: RunDir) -> dict:
    """Execute the method, write its tables and figures; its metrics with the deviations."""
    results = pipeline.execute(cfg, Stage("run", run_dir.storage, run_dir.method_id, run_dir.log))
    outputs = pipeline.outputs(cfg, results)
    write_outputs(run_dir, outputs)
    return {**outputs.metrics, "deviations": list(pipeline.deviations)}


def reproduce(pipeline: Pipeline, cfg, run_dir: RunDir) -> ClaimReport:
    """Execute every arm the claims compare, write the outputs, and check the claims over the seeds."""
    if pipeline.claims is None:
        raise UserError(f"{run_dir.method_id} has no claim check yet")
    results = pipeline.execute(cfg, Stage("reproduce", run_dir.storage, "reproduce", run_dir.log))
    outputs = pipeline.outputs(cfg, results)
    write_outputs(run_dir, outputs)
    deviations = [*pipeline.deviations, *([pipeline.budget(cfg)] if pipeline.budget else [])]
    claims = [replace(claim, deviations=deviations) for claim in pipeline.claims(cfg, results, outputs)]
    return ClaimReport(headline=claims[0], more=claims[1:])


def trial(config: dict, pipeline: Pipeline, storage: str) -> None:
    """Ray Tune trainable: one execution of the method's trial config; reports through Train's callback,
    the stage's ``tune_report``, or ``tune_metrics`` at the end."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = pipeline.trial(pipeline.config(**config))
    # the name is fixed per trial, so a retried trial restores from its own checkpoints
    stage = Stage("trial", storage, f"trial-{tune.get_context().get_trial_id()}", callbacks=[TuneReportCallback()],
                  tune_report=tune.report)
    results = pipeline.execute(cfg, stage)
    if pipeline.tune_metrics is not None:
        tune.report(pipeline.tune_metrics(cfg, results))
