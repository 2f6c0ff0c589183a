"""Classifier training for the adversarial pipelines: standard or PGD adversarial training, run as a
plan of checkpointed units inside one Ray Train job.

``training_mode`` ``standard`` minimises E CE(f(x), y); ``pgd`` minimises E max_{‖δ‖∞≤ε} CE(f(x+δ), y)
(Madry et al. 2018), the inner max by ``pgd_steps`` PGD steps of size ``pgd_alpha`` from a random
start (``methods.engines.attacks.adversarial_batch``). A :class:`Unit` is one model trained for some
epochs; :func:`run_units` trains the units of a plan in order on a Train worker with a checkpoint
every epoch, so an interrupted run resumes inside the unit it stopped in, and stores each unit's
result (its weights, its evaluation) for the units after it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from methods.classifiers import Perturb, accuracy, train_epoch
from methods.engines.attacks import PGDConfig, adversarial_batch
from pipelines import train
from pipelines.config import MethodConfig
from pipelines.data import build_splits, load_shard

Epoch = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.Generator], float]


class TrainingConfig(MethodConfig):
    """How every classifier of a run is trained (SGD with Nesterov momentum, mini-batches)."""

    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    training_mode: Literal["standard", "pgd"] = Field("standard", description="standard or PGD adversarial training")
    pgd_eps: float = Field(0.1, gt=0, le=1, description="L∞ radius of PGD training (inputs in [0, 1])")
    pgd_alpha: float = Field(0.025, gt=0, description="PGD training step size")
    pgd_steps: int = Field(5, ge=1)
    seeds: int = Field(1, ge=1, description="replicates: seeds seed, seed+1, …")


def perturbation(cfg: TrainingConfig, generator: torch.Generator) -> Perturb | None:
    """The per-batch input replacement of ``cfg.training_mode`` (None: train on the clean batch)."""
    if cfg.training_mode == "standard":
        return None
    attack = PGDConfig(eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=cfg.pgd_steps, norm="linf")
    return lambda model, x, y: adversarial_batch(model, x, y, attack, generator=generator)


def classifier_epoch(cfg: TrainingConfig) -> Epoch:
    """One epoch of :func:`methods.classifiers.train_epoch` in the config's training mode."""
    def epoch(model, opt, x, y, generator):
        return train_epoch(model, opt, x, y, batch_size=cfg.batch_size, generator=generator,
                           perturb=perturbation(cfg, generator))
    return epoch


@dataclass(frozen=True)
class Unit:
    """One model of a plan. Callables receive ``done``: the results of the units before it.

    ``build(done)`` returns the model to train (parameters with ``requires_grad=False`` stay
    frozen); ``data(done)`` its inputs and targets (class ids, or class probabilities); ``finish``
    maps the trained model to the result kept as ``done[key]``. ``epoch`` replaces the config's
    training epoch; ``optimizer`` (trainable parameters -> optimizer) replaces the config's SGD;
    ``loss_scale`` s multiplies the loss of that SGD, applied as lr·s and weight decay/s.
    """

    key: str
    epochs: int
    build: Callable[[dict], nn.Module]
    data: Callable[[dict], tuple[Tensor, Tensor]]
    finish: Callable[[nn.Module, dict], dict]
    epoch: Epoch | None = None
    optimizer: Callable[[list], torch.optim.Optimizer] | None = None
    loss_scale: float = 1.0


def unit_seed(key: str) -> int:
    """A stable seed per unit key (model init, data order, PGD starts)."""
    return zlib.crc32(key.encode())


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state dict (what a unit's result keeps)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_splits(device) -> dict[str, dict[str, Tensor]]:
    """Worker side: the train shard and the val/test sets as tensors, rows sorted by example idx."""
    out = {}
    for name in ("train", "val", "test"):
        shard = load_shard(name, device)
        order = torch.argsort(shard["idx"])
        out[name] = {k: v[order] for k, v in shard.items()}
    return out


def run_units(session: train.WorkerSession, cfg: TrainingConfig, units: list[Unit], val: dict[str, Tensor],
              summarize: Callable[[dict], dict] | None = None, summary_keys: tuple[str, ...] = ()) -> dict:
    """Train every unit not yet in the restored state; ``summarize(done)`` is stored as done["summary"]
    and its numbers join the final report. Every epoch reports ``summary_keys`` as NaN until then
    (Tune requires a sweep metric in every result; the final value is the one compared)."""
    state = session.state or {"done": {}}
    done, current = state["done"], state.get("current")
    pending = dict.fromkeys(summary_keys, float("nan"))
    for number, unit in enumerate(units, 1):
        if unit.key in done:
            continue
        seed = unit_seed(unit.key)
        torch.manual_seed(seed)
        model = unit.build(done).to(session.device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = unit.optimizer(params) if unit.optimizer else torch.optim.SGD(
            params, lr=cfg.lr * unit.loss_scale, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay / unit.loss_scale)
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = unit.data(done)
        start = 0
        if current is not None and current["key"] == unit.key:
            model.load_state_dict(current["model"])
            opt.load_state_dict(current["opt"])
            gen.set_state(current["gen"])
            start = current["epoch"] + 1
        ddp = train.prepare(model)
        epoch_fn = unit.epoch or classifier_epoch(cfg)
        for epoch in range(start, unit.epochs):
            loss = epoch_fn(ddp, opt, x, y, gen)
            current = {"key": unit.key, "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                       "gen": gen.get_state()}
            session.report({"unit": number, "units": len(units), "epoch": epoch + 1, "loss": loss,
                            "val_acc": accuracy(model, val["x"], val["y"]), **pending},
                           {"done": done, "current": current})
        done[unit.key] = {**unit.finish(model, done), "val_acc": accuracy(model, val["x"], val["y"])}
        current = None
        if session.rank == 0:
            print(f"[{type(cfg).__name__}] {number}/{len(units)} {unit.key} done", flush=True)
    if summarize is not None and "summary" not in done:
        done["summary"] = summarize(done)
    scalars = {k: v for k, v in done.get("summary", {}).items() if isinstance(v, (int, float))}
    final = done[units[-1].key]["val_acc"] if units else 0.0
    session.report({"unit": len(units), "units": len(units), "epoch": 0, "loss": 0.0, "val_acc": final, **scalars},
                   {"done": done}, force=True)
    return done


def fit_units(loop: Callable[[dict], None], cfg: TrainingConfig, *, storage: str | None, name: str,
              callbacks: list | None = None) -> dict:
    """Driver side: digits scaled to [0, 1] as Ray datasets, ``loop`` on Ray Train; the final ``done``."""
    splits = build_splits("digits", seed=cfg.seed, normalize="unit")
    result = train.fit(loop, {"cfg": cfg.model_dump(), "num_classes": splits.num_classes}, cfg, name=name,
                       storage=storage, datasets=splits.as_dict(), callbacks=callbacks)
    return train.read_state(result.checkpoint)["done"]
