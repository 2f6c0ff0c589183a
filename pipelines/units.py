"""The resumable unit runner: a plan of units run one after another inside one Ray Train job.

A :class:`Unit` is a named record: ``build(done)`` makes its working state (a :class:`Work`),
``step(work, i)`` advances it by step ``i`` of ``budget`` and returns that step's metrics, and
``finish(work, done)`` gives the result kept as ``done[key]`` for the units after it (scores feed a
pruning unit, a teacher feeds its student, …). :func:`run_units` owns everything else: skipping
finished units, checkpoints (mid-unit ones every ``session.checkpoint_every`` steps but at most
every ``session.checkpoint_seconds``, and one after every unit), resume inside the unit a run stopped in,
progress lines, and the final state. It reports to Ray Train sparingly, since in Train V2 each
``ray.train.report`` blocks until the controller's next poll: when a checkpoint is due, when a unit
ends, and otherwise at most every ``REPORT_SECONDS``.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pipelines.train import WorkerSession

REPORT_SECONDS = 5.0  # wall time between metric-only reports
PROGRESS_SECONDS = 2.0  # wall time between progress lines of one unit (its last step always prints)


class Work(SimpleNamespace):
    """A unit's working state as attributes; those named in ``saved`` go into checkpoints.

    A saved attribute is checkpointed by its ``state_dict()`` (modules, optimizers, anything with
    ``load_state_dict``), a generator by ``get_state()``, and any other value (numbers, lists,
    tensors) as it is; the others (data, DDP wrappers, frozen references) are rebuilt by ``build``.
    """

    def __init__(self, saved: tuple[str, ...] = (), **attributes: Any):
        super().__init__(**attributes)
        self.saved = saved

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for name in self.saved:
            value = getattr(self, name)
            if isinstance(value, torch.Generator):
                out[name] = value.get_state()
            elif hasattr(value, "state_dict"):
                out[name] = value.state_dict()
            else:
                out[name] = value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.saved:
            value = getattr(self, name)
            if isinstance(value, torch.Generator):
                value.set_state(state[name])
            elif hasattr(value, "load_state_dict"):
                value.load_state_dict(state[name])
            else:
                setattr(self, name, state[name])


@dataclass(frozen=True)
class Unit:
    """One piece of a plan. ``budget`` steps (0: ``finish`` only); ``stop(work)``, checked after each
    step, ends the unit early; ``step_name`` names a step in progress lines (epoch, iteration, …)."""

    key: str
    budget: int
    build: Callable[[dict], Work]
    step: Callable[[Work, int], dict[str, Any]]
    finish: Callable[[Work, dict], dict]
    stop: Callable[[Work], bool] | None = None
    step_name: str = "step"


def unit_key(parts: tuple) -> str:
    """A unit's key from its parts: ("prune", 0, "el2n", 0.5) → "prune/0/el2n/0.5"."""
    return "/".join(map(str, parts))


def unit_seed(key: str) -> int:
    """A stable seed per unit key (model init, data order), the same on every worker and run."""
    return zlib.crc32(key.encode())


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state dict (what a unit's result keeps)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def no_steps(work: Work, index: int) -> dict:
    """The step of a unit whose budget is 0 (its work is all in ``finish``)."""
    raise AssertionError("a unit with budget 0 takes no step")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Reporter:
    """When to report, checkpoint and print; the time-based decisions are rank 0's, shared by all ranks."""

    def __init__(self, session: WorkerSession, pending: dict):
        self.session = session
        self.latest = dict(pending)  # every report carries every metric seen so far (Tune needs its metric in each)
        self.steps_since_checkpoint = 0
        self.last_checkpoint = self.last_report = self.last_print = time.monotonic()

    def step(self, metrics: dict, state: Callable[[], dict]) -> None:
        self.latest.update(scalars(metrics))
        self.steps_since_checkpoint += 1
        now = time.monotonic()
        checkpoint = (self.steps_since_checkpoint >= self.session.checkpoint_every
                      and now - self.last_checkpoint >= self.session.checkpoint_seconds)
        report = checkpoint or now - self.last_report >= REPORT_SECONDS
        checkpoint, report = self.session.agree((checkpoint, report))
        if checkpoint:
            self.send(state())
        elif report:
            self.send(None)

    def send(self, state: dict | None) -> None:
        self.session.report(dict(self.latest), state)
        self.last_report = time.monotonic()
        if state is not None:
            self.last_checkpoint, self.steps_since_checkpoint = self.last_report, 0

    def progress(self, line: str, last: bool) -> None:
        if self.session.rank == 0 and (last or time.monotonic() - self.last_print >= PROGRESS_SECONDS):
            print(line, flush=True)
            self.last_print = time.monotonic()


def run_units(session: WorkerSession, units: list[Unit], *, summarize: Callable[[dict], dict] | None = None,
              summary_keys: tuple[str, ...] = ()) -> dict:
    """Run every unit not yet done (a finished plan reports nothing); return the final state ``{"done", "starts"}``.

    Every report carries ``unit``/``units``, the latest value of each scalar step metric and
    ``summary_keys`` (NaN until ``summarize(done)``, stored as ``done["summary"]``, gives their
    values in the final report: Tune needs a sweep metric in every result). ``starts`` records where
    each (re)start of the plan began: a resumed run starts after the units and steps its checkpoint
    holds.
    """
    state = session.state or {"done": {}, "starts": []}
    done, current = state["done"], state.get("current")
    starts = state["starts"] + [{"units_done": sum(u.key in done for u in units),
                                 "unit": current["key"] if current else "",
                                 "step": current["step"] + 1 if current else 0}]
    reporter = _Reporter(session, dict.fromkeys(summary_keys, float("nan")))
    for number, unit in enumerate(units, 1):
        if unit.key in done:
            continue
        reporter.latest.update(unit=number, units=len(units))
        work = unit.build(done)
        index = 0
        if current is not None and current["key"] == unit.key:
            work.load_state_dict(current["work"])
            index = current["step"] + 1
        stopped = index > 0 and unit.stop is not None and unit.stop(work)
        while not stopped and index < unit.budget:
            metrics = unit.step(work, index)
            stopped = unit.stop is not None and unit.stop(work)
            reporter.step(metrics, lambda i=index: {"done": done, "starts": starts,
                                                    "current": {"key": unit.key, "step": i, "work": work.state_dict()}})
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in scalars(metrics).items() if k != unit.step_name)
            index += 1
            reporter.progress(f"[{number}/{len(units)}] {unit.key} {unit.step_name} {index}/{unit.budget}"
                              + (f": {numbers}" if numbers else ""), last=stopped or index == unit.budget)
        done[unit.key] = unit.finish(work, done)
        current = None
        reporter.latest.update(scalars(done[unit.key]))
        reporter.send({"done": done, "starts": starts})
        if session.rank == 0:
            print(f"[{number}/{len(units)}] {unit.key} done", flush=True)
    if summarize is not None and "summary" not in done:
        done["summary"] = summarize(done)
        reporter.latest.update(scalars(done["summary"]))
        reporter.send({"done": done, "starts": starts})
    return {"done": done, "starts": starts}
