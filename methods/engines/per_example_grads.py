"""Per-example gradients with ``torch.func``: g_i = ∇_θ ℓ(f(x_i; θ), y_i), one row per example.

``functional_call`` evaluates the module on a single example with explicit parameters and buffers;
``vmap(grad(...))`` maps that over the batch. Buffers are read, never updated: models with batch
norm must be in eval mode. Shared by GraNd (data_diet), influence scores, gradient coherence and
layer-wise gradients.

vmap turns each convolution's per-example weight gradient into one grouped convolution with large
temporary buffers, so the engine keeps freed memory mapped (:mod:`methods.engines.memory`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from methods.engines.memory import retain_freed_memory

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batch_norm_in_train_mode(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def per_example_grads(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                      chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor of shape (N, *param.shape)} with row i = ∂ℓ(f(x_i), y_i)/∂param.

    ``loss_fn(logits, target)`` is called on a batch of one example and must return a scalar.
    ``chunk_size`` bounds memory by vectorising over that many examples at a time.
    """
    if _batch_norm_in_train_mode(model):
        raise ValueError("per-example gradients need batch norm in eval mode (call model.eval())")
    retain_freed_memory()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss_one(p, b, xi, yi):
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, None, 0, 0), chunk_size=chunk_size)(params, buffers, x, y)


def flatten(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, P) matrix of per-example gradients over all parameters."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def per_example_grad_norms(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                           batch_size: int = 256) -> torch.Tensor:
    """‖∇_θ ℓ(f(x_i), y_i)‖₂ over all parameters, for every i (computed ``batch_size`` at a time)."""
    norms = []
    for start in range(0, len(x), batch_size):
        grads = per_example_grads(model, loss_fn, x[start:start + batch_size], y[start:start + batch_size])
        norms.append(torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())))
    return torch.cat(norms)
