"""Small image classifiers and their plain training loop, shared by the methods that train one."""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Arch = Literal["mlp", "cnn"]


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
