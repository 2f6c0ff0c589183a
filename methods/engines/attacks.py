"""Batched white-box evasion attacks: FGSM, PGD (L∞ / L2) and Carlini-Wagner L2.

Every attack takes any classifier ``model`` (inputs → logits), a batch ``x`` inside the box
``bounds = (lo, hi)`` and labels ``y``: the true classes, or the target classes when
``cfg.targeted``. Attacks run under :func:`attack_mode`: eval mode (batch-norm statistics and
dropout untouched), gradients enabled even inside ``torch.no_grad()``, and every submodule's
previous mode restored afterwards, with freed memory kept mapped (:mod:`methods.engines.memory`,
process-wide). Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so
the parameters' gradients are neither computed nor written to ``.grad``. The only randomness (the
PGD random start) comes from a ``torch.Generator``, never from the global RNG.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from methods.engines.memory import retain_freed_memory

Bounds = tuple[float, float]


class _AttackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    targeted: bool = Field(False, description="y holds classes to reach, not true classes to leave")


class FGSMConfig(_AttackConfig):
    eps: float = Field(8 / 255, ge=0, description="L∞ step size")


class PGDConfig(_AttackConfig):
    eps: float = Field(8 / 255, ge=0, description="radius of the perturbation ball")
    alpha: float = Field(2 / 255, gt=0, description="step size of each ascent step")
    steps: int = Field(10, ge=1)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = Field(True, description="start from a uniform random point of the ball")


class CWConfig(_AttackConfig):
    c_init: float = Field(1.0, gt=0, description="initial trade-off constant c of every example")
    binary_search_steps: int = Field(9, ge=1, description="outer rounds of the per-example search on c")
    steps: int = Field(50, ge=1, description="Adam steps per round")
    lr: float = Field(0.01, gt=0, description="Adam learning rate on w")
    kappa: float = Field(0.0, ge=0, description="confidence margin κ required for success")


class CWResult(NamedTuple):
    x_adv: Tensor  # smallest-L2 successful adversarial input per example; x itself where none was found
    success: Tensor  # bool (N,): an adversarial input was found
    l2: Tensor  # ‖x_adv − x‖₂ per example (0 where the attack failed)


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with gradients enabled; restores each submodule's ``training`` flag afterwards."""
    retain_freed_memory()
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        for m in training:
            m.training = True


def fgsm(model: nn.Module, x: Tensor, y: Tensor, cfg: FGSMConfig, *, bounds: Bounds = (0.0, 1.0)) -> Tensor:
    """x' = clip(x + ε·sign(∇ₓ CE(f(x), y)), lo, hi)  (Goodfellow et al. 2015).

    Targeted: x' = clip(x − ε·sign(∇ₓ CE(f(x), t)), lo, hi).
    """
    lo, hi = _check_bounds(bounds)
    with attack_mode(model):
        g = _ascent_grad(model, x, y, cfg.targeted)
    return torch.add(x.detach(), g.sign_(), alpha=cfg.eps).clamp_(lo, hi)


def pgd(model: nn.Module, x: Tensor, y: Tensor, cfg: PGDConfig, *, bounds: Bounds = (0.0, 1.0),
        rng: torch.Generator | int = 0) -> Tensor:
    """Projected gradient ascent on CE (Madry et al. 2018), ``steps`` times:

    x_{k+1} = clip(x + Π_ε(x_k + α·d_k − x), lo, hi), with g_k = ∇ₓ CE(f(x_k), y) and
    L∞: d = sign(g), Π_ε(δ) = clamp(δ, −ε, ε);  L2: d = g/‖g‖₂, Π_ε(δ) = δ·min(1, ε/‖δ‖₂).
    Targeted: g is replaced by −∇ₓ CE(f(x_k), t). x_0 = x, or with ``random_start`` x plus a point
    drawn uniformly from the ε-ball, clipped to the box. ``rng`` is a generator (advanced in place)
    or a seed for a fresh one; with a seed the output is a deterministic function of the inputs.
    """
    lo, hi = _check_bounds(bounds)
    x = x.detach()
    x_adv = x
    if cfg.random_start:
        if not isinstance(rng, torch.Generator):
            rng = torch.Generator(device=x.device).manual_seed(rng)
        x_adv = (x + _uniform_ball(x, cfg.eps, cfg.norm, rng)).clamp(lo, hi)
    with attack_mode(model):
        for _ in range(cfg.steps):
            g = _ascent_grad(model, x_adv, y, cfg.targeted)
            if cfg.norm == "linf":  # one new tensor per step, updated in place
                delta = torch.add(x_adv, g.sign_(), alpha=cfg.alpha).sub_(x).clamp_(-cfg.eps, cfg.eps)
            else:
                delta = x_adv + cfg.alpha * g / _norms(g).clamp_min(1e-12) - x
                delta = delta * (cfg.eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
            x_adv = delta.add_(x).clamp_(lo, hi)
    return x_adv


def adversarial_batch(model: nn.Module, x: Tensor, y: Tensor, cfg: PGDConfig, *, generator: torch.Generator,
                      bounds: Bounds = (0.0, 1.0)) -> Tensor:
    """Inner maximisation of PGD adversarial training, max_{‖δ‖≤ε} CE(f(x+δ), y), for a training loop.

    Callable with the model in train mode: the attack runs in eval mode and the caller's modes are
    restored, so the only forward pass that updates batch-norm statistics is the loop's own
    ``CE(model(x_adv), y)``; parameter gradients are left untouched. The loop owns ``generator``
    (and checkpoints its state), so each batch gets a fresh yet reproducible random start.
    """
    return pgd(model, x, y, cfg, bounds=bounds, rng=generator)


def cw_l2(model: nn.Module, x: Tensor, y: Tensor, cfg: CWConfig, *, bounds: Bounds = (0.0, 1.0)) -> CWResult:
    """Carlini-Wagner L2 (2017): per example, minimise over w with Adam

    ‖x' − x‖₂² + c·max(Z(x')_y − max_{i≠y} Z(x')_i, −κ),   x' = lo + (hi − lo)·(tanh(w) + 1)/2,

    on logits Z (targeted: max(max_{i≠t} Z_i − Z_t, −κ)), starting from x' = x. An iterate succeeds
    when its margin is below −κ; the smallest-L2 success is kept. After each round c is bisected per
    example between the largest failing and the smallest succeeding c so far (×10 while no success
    is known). Adam restarts from w(x) each round.
    """
    lo, hi = _check_bounds(bounds)
    x = x.detach()
    w0 = torch.atanh((2 * (x - lo) / (hi - lo) - 1) * (1 - 1e-6))  # the shrink keeps w finite at lo and hi
    c = torch.full((len(x),), cfg.c_init, dtype=x.dtype, device=x.device)
    c_lo, c_hi = torch.zeros_like(c), torch.full_like(c, math.inf)
    best_l2sq, best = torch.full_like(c, math.inf), x.clone()
    with attack_mode(model):
        for _ in range(cfg.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            found = torch.zeros_like(c, dtype=torch.bool)
            for _ in range(cfg.steps):
                x_adv = lo + (hi - lo) * (torch.tanh(w) + 1) / 2
                l2sq = (x_adv - x).flatten(1).square().sum(1)
                margin = _cw_margin(model(x_adv), y, cfg.targeted)
                (w.grad,) = torch.autograd.grad((l2sq + c * margin.clamp(min=-cfg.kappa)).sum(), w)
                opt.step()
                with torch.no_grad():
                    ok = margin < -cfg.kappa
                    better = ok & (l2sq < best_l2sq)
                    best_l2sq = torch.where(better, l2sq, best_l2sq)
                    best = torch.where(_per_example(better, x), x_adv, best)
                    found |= ok
            c_hi = torch.where(found, torch.minimum(c_hi, c), c_hi)
            c_lo = torch.where(found, c_lo, torch.maximum(c_lo, c))
            c = torch.where(c_hi.isfinite(), (c_lo + c_hi) / 2, 10 * c)
    return CWResult(best, best_l2sq.isfinite(), _norms(best - x).flatten())


def _check_bounds(bounds: Bounds) -> Bounds:
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"bounds must satisfy lo < hi, got {bounds}")
    return lo, hi


def _ascent_grad(model: nn.Module, x: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """∇ₓ Σᵢ CE(f(xᵢ), yᵢ), negated when targeted: the direction that increases the attack objective."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(-loss if targeted else loss, x)
    return g


def _cw_margin(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Z_y − max_{i≠y} Z_i (untargeted) or max_{i≠t} Z_i − Z_t (targeted); negative means success."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return other - own if targeted else own - other


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def _norms(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return _per_example(t.flatten(1).norm(dim=1), t)


def _uniform_ball(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """One point per example drawn uniformly from the L∞ or L2 ball of radius eps."""
    def draw(sample, shape):
        return sample(shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    if norm == "linf":
        return eps * (2 * draw(torch.rand, x.shape) - 1)
    direction = draw(torch.randn, x.shape)
    radius = eps * draw(torch.rand, (len(x),)).pow(1 / x[0].numel())  # r = ε·U^{1/d}
    return direction / _norms(direction).clamp_min(1e-12) * _per_example(radius, x)
