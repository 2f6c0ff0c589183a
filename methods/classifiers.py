"""Small image classifiers, their plain training loop, and a classifier trained as a unit of a plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import Field

from pipelines.config import TrainConfig
from pipelines.train import prepare
from pipelines.units import Unit, Work, unit_seed

Arch = Literal["mlp", "cnn"]


class ClassifierConfig(TrainConfig):
    """How the classifiers of a plan are trained: mini-batch SGD with Nesterov momentum."""

    hidden: list[int] = Field([64, 64], min_length=1, description="MLP widths")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1)

    def sgd(self, params: list, loss_scale: float = 1.0) -> torch.optim.SGD:
        """SGD for a loss multiplied by ``loss_scale`` s: lr·s and weight decay / s."""
        return torch.optim.SGD(params, lr=self.lr * loss_scale, momentum=self.momentum, nesterov=self.momentum > 0,
                               weight_decay=self.weight_decay / loss_scale)


def build_classifier(arch: Arch, input_shape: tuple[int, ...], num_classes: int, *,
                     hidden: tuple[int, ...] = (256, 256), batch_norm: bool = False) -> nn.Module:
    """``mlp``: flatten → [Linear → ReLU] per hidden width → Linear. ``cnn``: two 3×3 conv blocks → Linear."""
    if arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(input_shape).prod())
        for h in hidden:
            layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h)] if batch_norm else []), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    channels = input_shape[0]
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, num_classes),
    )


Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                batch_size: int, generator: torch.Generator, perturb: Perturb | None = None) -> float:
    """One pass of mini-batch SGD on cross-entropy in a seeded random order; returns the mean loss.

    ``perturb(model, x, y)`` replaces each batch before the step, e.g. by PGD examples for
    adversarial training: min_θ E max_{‖δ‖≤ε} CE(f(x + δ), y).
    """
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = 0.0
    for start in range(0, len(x), batch_size):
        batch = order[start:start + batch_size]
        inputs = x[batch] if perturb is None else perturb(model, x[batch], y[batch])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), y[batch])
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
    return total / max(1, len(x))


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([F.softmax(model(x[s:s + batch_size]), dim=1) for s in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_proba(model, x).argmax(1) == y).float().mean())


Epoch = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.Generator], float]


@dataclass(frozen=True)
class Training:
    """How a plan trains its classifiers: an epoch ``epoch(model, opt, x, y, generator)``, the
    optimizer of a unit's trainable parameters ``optimizer(params, loss_scale)``, the validation
    accuracy reported each epoch, and the worker's device."""

    epoch: Epoch
    optimizer: Callable[[list, float], torch.optim.Optimizer]
    evaluate: Callable[[nn.Module], float]
    device: torch.device

    def unit(self, key: str, epochs: int, build: Callable[[dict], nn.Module],
             data: Callable[[dict], tuple[Tensor, Tensor]], finish: Callable[[nn.Module, dict], dict], *,
             epoch: Epoch | None = None, optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
             loss_scale: float = 1.0, progress: Callable[[int], dict] | None = None) -> Unit:
        """A model trained for ``epochs`` epochs; callables receive ``done``, the results before it.

        ``build(done)`` returns the model, initialised under the unit's seed (parameters with
        ``requires_grad=False`` stay frozen); ``data(done)`` its inputs and targets; ``finish(model,
        done)`` its result, kept with the final ``val_acc``. ``epoch`` and ``optimizer`` replace the
        plan's; ``loss_scale`` s goes to the plan's optimizer (a loss multiplied by s);
        ``progress(epoch)`` adds metrics to each epoch's report (e.g. a time attribute for Tune).
        """
        def start(done: dict) -> Work:
            seed = unit_seed(key)
            torch.manual_seed(seed)
            model = build(done).to(self.device)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = optimizer(params) if optimizer else self.optimizer(params, loss_scale)
            generator = torch.Generator().manual_seed(seed + 1)
            x, y = data(done)
            return Work(saved=("model", "optimizer", "generator"), model=model, optimizer=opt, generator=generator,
                        ddp=prepare(model), x=x, y=y)

        def step(work: Work, index: int) -> dict:
            loss = (epoch or self.epoch)(work.ddp, work.optimizer, work.x, work.y, work.generator)
            return {"epoch": index + 1, "loss": loss, "val_acc": self.evaluate(work.model),
                    **(progress(index) if progress else {})}

        def result(work: Work, done: dict) -> dict:
            return {**finish(work.model, done), "val_acc": self.evaluate(work.model)}

        return Unit(key, epochs, start, step, result, step_name="epoch")
