"""Example-difficulty scores of "Deep Learning on a Data Diet" (Paul et al., 2021).

EL2N(x, y) = ‖softmax(f(x)) − onehot(y)‖₂;  GraNd(x, y) = ‖∇_w ℓ(f(x), y)‖₂ over all parameters.
Each is averaged over independent initialisations by the caller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.classifiers import predict_proba
from methods.engines.per_example_grads import per_example_grad_norms


def el2n(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖p − onehot(y)‖₂ per row of class probabilities ``probs``."""
    return torch.linalg.vector_norm(probs - F.one_hot(y, probs.shape[1]).to(probs.dtype), dim=1)


def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return el2n(predict_proba(model, x), y)


def grand_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GraNd with the model in eval mode and cross-entropy loss."""
    model.eval()
    return per_example_grad_norms(model, F.cross_entropy, x, y)


def keep_indices(scores: torch.Tensor, keep: int, *, offset: int = 0, generator: torch.Generator | None = None,
                 mode: str = "highest") -> torch.Tensor:
    """Positions kept when pruning to ``keep`` examples.

    ``highest``: ``argsort(scores)[-(keep+offset):len-offset]`` (drop the ``offset`` highest first, as the
    official ``offset`` mode); ``lowest``: the ``keep`` lowest; ``random``: a uniform subset.
    """
    n = len(scores)
    if mode == "random":
        return torch.randperm(n, generator=generator)[:keep]
    order = torch.argsort(scores)
    if mode == "lowest":
        return order[:keep]
    return order[n - offset - keep:n - offset]
