"""Classifier training for the adversarial pipelines: standard or PGD adversarial training, run as a
plan of checkpointed units inside one Ray Train job.

``training_mode`` ``standard`` minimises E CE(f(x), y); ``pgd`` minimises E max_{‖δ‖∞≤ε} CE(f(x+δ), y)
(Madry et al. 2018), the inner max by ``pgd_steps`` PGD steps of size ``pgd_alpha`` from a random
start (``methods.engines.attacks.adversarial_batch``). Plans of models run as
:mod:`pipelines.units` units inside one Ray Train job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from methods.classifiers import ClassifierConfig, Epoch, Perturb, Training, accuracy, build_classifier, train_epoch
from methods.engines.attacks import PGDConfig, adversarial_batch
from pipelines import train
from pipelines.data import build_splits, load_shard
from pipelines.pipeline import Stage
from pipelines.units import cpu_state


class TrainingConfig(ClassifierConfig):
    """How every classifier of a run is trained: the classifiers' SGD, on clean or PGD adversarial batches."""

    training_mode: Literal["standard", "pgd"] = Field("standard", description="standard or PGD adversarial training")
    pgd_eps: float = Field(0.1, gt=0, le=1, description="L∞ radius of PGD training (inputs in [0, 1])")
    pgd_alpha: float = Field(0.025, gt=0, description="PGD training step size")
    pgd_steps: int = Field(5, ge=1)


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


@dataclass(frozen=True)
class Worker:
    """A Ray Train worker of a plan: its config and session, the splits (rows sorted by example idx) and how
    the plan trains its classifiers (the config's mode and SGD, a unit's loss scale s applied as lr·s and
    weight decay/s, validation accuracy each epoch)."""

    cfg: TrainingConfig
    session: train.WorkerSession
    splits: dict[str, dict[str, Tensor]]
    training: Training
    num_classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"]["x"].shape[1:])

    def classifier(self, arch: str, state: dict | None = None) -> nn.Module:
        """A classifier ``arch`` (MLP widths ``cfg.hidden``) on the worker's device: fresh, or loaded from ``state``."""
        model = build_classifier(arch, self.shape, self.num_classes, hidden=tuple(self.cfg.hidden))
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.session.device)


def kept(model: nn.Module, done: dict) -> dict:
    """A unit's result that keeps the trained model (its CPU state dict)."""
    return {"model": cpu_state(model)}


def worker(loop_config: dict, config: type[TrainingConfig]) -> Worker:
    """Worker side: the session, the train shard and the val/test sets as tensors, the plan's training."""
    cfg, session = config(**loop_config["cfg"]), train.WorkerSession(loop_config)
    splits = {}
    for name in ("train", "val", "test"):
        shard = load_shard(name, session.device)
        order = torch.argsort(shard["idx"])
        splits[name] = {k: v[order] for k, v in shard.items()}
    val = splits["val"]
    training = Training(epoch=classifier_epoch(cfg), optimizer=cfg.sgd, device=session.device,
                        evaluate=lambda model: accuracy(model, val["x"], val["y"]))
    return Worker(cfg, session, splits, training, int(loop_config["num_classes"]))


def fit_plan(loop: Callable[[dict], None], cfg: TrainingConfig, stage: Stage, what: str) -> dict:
    """Driver side: digits scaled to [0, 1] as Ray datasets, ``loop`` on Ray Train (``what`` it trains, for
    the log); the final ``done``."""
    stage.log(f"{what} on {cfg.num_workers} Ray Train worker(s)")
    splits = build_splits("digits", seed=cfg.seed, normalize="unit")
    return stage.fit(loop, {"cfg": cfg.model_dump(), "num_classes": splits.num_classes}, cfg,
                     datasets=splits.as_dict())["done"]
