"""Classifier training for the adversarial pipelines: standard or PGD adversarial training, run as a
plan of checkpointed units inside one Ray Train job.

``training_mode`` ``standard`` minimises E CE(f(x), y); ``pgd`` minimises E max_{‖δ‖∞≤ε} CE(f(x+δ), y)
(Madry et al. 2018), the inner max by ``pgd_steps`` PGD steps of size ``pgd_alpha`` from a random
start (``methods.engines.attacks.adversarial_batch``). Plans of models run as
:mod:`pipelines.units` units inside one Ray Train job.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from methods.classifiers import Perturb, accuracy, train_epoch
from methods.engines.attacks import PGDConfig, adversarial_batch
from pipelines import train
from pipelines.config import MethodConfig
from pipelines.data import build_splits, load_shard
from pipelines.sweep import trial_run
from pipelines.units import Epoch, Optimizer, Unit, run_units



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
    # attack the bare module: a DDP forward outside the training step would desynchronise its reducer
    return lambda model, x, y: adversarial_batch(train.unwrap(model), x, y, attack, generator=generator)


def classifier_epoch(cfg: TrainingConfig) -> Epoch:
    """One epoch of :func:`methods.classifiers.train_epoch` in the config's training mode."""
    def epoch(model, opt, x, y, generator):
        return train_epoch(model, opt, x, y, batch_size=cfg.batch_size, generator=generator,
                           perturb=perturbation(cfg, generator))
    return epoch


def load_splits(device) -> dict[str, dict[str, Tensor]]:
    """Worker side: the train shard and the val/test sets as tensors, rows sorted by example idx."""
    out = {}
    for name in ("train", "val", "test"):
        shard = load_shard(name, device)
        order = torch.argsort(shard["idx"])
        out[name] = {k: v[order] for k, v in shard.items()}
    return out


def sgd(cfg: TrainingConfig) -> Optimizer:
    """SGD with Nesterov momentum; a unit's ``loss_scale`` s is applied as lr·s and weight decay/s."""
    return lambda params, unit: torch.optim.SGD(
        params, lr=cfg.lr * unit.loss_scale, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay / unit.loss_scale)


def run_plan(session: train.WorkerSession, cfg: TrainingConfig, units: list[Unit], val: dict[str, Tensor],
             **kwargs) -> dict:
    """:func:`pipelines.units.run_units` with the config's training mode, SGD and validation accuracy."""
    return run_units(session, units, epoch=classifier_epoch(cfg), optimizer=sgd(cfg),
                     evaluate=lambda model: accuracy(model, val["x"], val["y"]), **kwargs)["done"]


def fit_units(loop: Callable[[dict], None], cfg: TrainingConfig, *, storage: str | None, name: str,
              callbacks: list | None = None) -> dict:
    """Driver side: digits scaled to [0, 1] as Ray datasets, ``loop`` on Ray Train; the final ``done``."""
    splits = build_splits("digits", seed=cfg.seed, normalize="unit")
    result = train.fit(loop, {"cfg": cfg.model_dump(), "num_classes": splits.num_classes}, cfg, name=name,
                       storage=storage, datasets=splits.as_dict(), callbacks=callbacks)
    return train.read_state(result.checkpoint)["done"]


def unit_trial(loop: Callable[[dict], None], config_model: type[TrainingConfig]
               ) -> Callable[[dict, str], None]:
    """Ray Tune driver of a training plan: one :func:`fit_units` job per sampled config, whose reports
    (each epoch's, and the final summary with the sweep metric) Tune receives."""
    def trial(config: dict, storage: str) -> None:
        fit_units(loop, config_model(**config), storage=storage, **trial_run())

    return trial
