"""Training plans: several models ("units") trained one after another inside one Ray Train job.

A :class:`Unit` is one model trained for some epochs; :func:`run_units` trains, on a Train worker,
every unit that the restored state does not hold yet, with a checkpoint every epoch, so an
interrupted run resumes inside the unit it stopped in. Each unit's result is kept in ``done`` for
the units after it (scores feed a pruning unit, a teacher feeds its student, …).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from pipelines.train import WorkerSession, prepare

Epoch = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.Generator], float]
Optimizer = Callable[[list, "Unit"], torch.optim.Optimizer]


@dataclass(frozen=True)
class Unit:
    """One model of a plan. Callables receive ``done``: the results of the units before it.

    ``build(done)`` returns the model (parameters with ``requires_grad=False`` stay frozen);
    ``data(done)`` its inputs and targets; ``finish(model, done)`` the result kept as
    ``done[key]``. ``epoch`` and ``optimizer`` replace the plan's defaults; ``loss_scale`` s is
    handed to the default optimizer (a loss multiplied by s); ``progress(epoch)`` adds metrics to
    each epoch's report (e.g. a time attribute for a Tune scheduler).
    """

    key: str
    epochs: int
    build: Callable[[dict], nn.Module]
    data: Callable[[dict], tuple[Tensor, Tensor]]
    finish: Callable[[nn.Module, dict], dict]
    epoch: Epoch | None = None
    optimizer: Callable[[list], torch.optim.Optimizer] | None = None
    loss_scale: float = 1.0
    progress: Callable[[int], dict] | None = None


def unit_key(parts: tuple) -> str:
    """A unit's key from its parts: ("prune", 0, "el2n", 0.5) → "prune/0/el2n/0.5"."""
    return "/".join(map(str, parts))


def unit_seed(key: str) -> int:
    """A stable seed per unit key (model init, data order), the same on every worker and run."""
    return zlib.crc32(key.encode())


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state dict (what a unit's result keeps)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def run_units(session: WorkerSession, units: list[Unit], *, epoch: Epoch, optimizer: Optimizer,
              evaluate: Callable[[nn.Module], float], summarize: Callable[[dict], dict] | None = None,
              summary_keys: tuple[str, ...] = ()) -> dict:
    """Train every unit not yet done; return the final state ``{"done", "starts"}``.

    Each epoch reports ``loss`` and ``val_acc = evaluate(model)``; ``summary_keys`` are reported as
    NaN until ``summarize(done)`` (stored as ``done["summary"]``) gives their values in the final
    report (Tune requires a sweep metric in every result). ``starts`` records where each (re)start
    of the plan began: a resumed run starts after the units and epochs its checkpoint holds.
    """
    state = session.state or {"done": {}, "starts": []}
    done, current = state["done"], state.get("current")
    starts = state["starts"] + [{"units_done": sum(u.key in done for u in units),
                                 "unit": current["key"] if current else "",
                                 "epoch": current["epoch"] + 1 if current else 0}]
    pending = dict.fromkeys(summary_keys, float("nan"))
    for number, unit in enumerate(units, 1):
        if unit.key in done:
            continue
        seed = unit_seed(unit.key)
        torch.manual_seed(seed)
        model = unit.build(done).to(session.device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = unit.optimizer(params) if unit.optimizer else optimizer(params, unit)
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = unit.data(done)
        start = 0
        if current is not None and current["key"] == unit.key:
            model.load_state_dict(current["model"])
            opt.load_state_dict(current["opt"])
            gen.set_state(current["gen"])
            start = current["epoch"] + 1
        ddp = prepare(model)
        for e in range(start, unit.epochs):
            loss = (unit.epoch or epoch)(ddp, opt, x, y, gen)
            current = {"key": unit.key, "epoch": e, "model": model.state_dict(), "opt": opt.state_dict(),
                       "gen": gen.get_state()}
            session.report({"unit": number, "units": len(units), "epoch": e + 1, "loss": loss,
                            "val_acc": evaluate(model), **pending, **(unit.progress(e) if unit.progress else {})},
                           {"done": done, "current": current, "starts": starts})
        done[unit.key] = {**unit.finish(model, done), "val_acc": evaluate(model)}
        current = None
        if session.rank == 0:
            print(f"[{number}/{len(units)}] {unit.key} done", flush=True)
    if summarize is not None and "summary" not in done:
        done["summary"] = summarize(done)
    scalars = {k: v for k, v in done.get("summary", {}).items() if isinstance(v, (int, float))}
    final = done[units[-1].key]["val_acc"] if units else 0.0
    last = units[-1] if units else None
    session.report({"unit": len(units), "units": len(units), "epoch": 0, "loss": 0.0, "val_acc": final,
                    **scalars, **(last.progress(last.epochs - 1) if last and last.progress else {})},
                   {"done": done, "starts": starts}, force=True)
    return {"done": done, "starts": starts}
