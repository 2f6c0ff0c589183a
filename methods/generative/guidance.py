"""Guided predictions for the DDIM sampler: CFG, autoguidance (ATG) and gradient-free classifier guidance (GFCG).

With D(x; c) the network output (ε̂) for label c:
    CFG:  D = D(x; ∅) + w·(D(x; c) − D(x; ∅))
    ATG:  D = D_weak(x; c) + w·(D(x; c) − D_weak(x; c))        (Karras et al. 2024, a separately trained weak model)
    GFCG: D = D_base + s_t·(D(x; c) − D(x; c_ref,t))             (D_base = D(x; c), CFG or ATG)
GFCG's reference class and scale come from a classifier C in inference mode only (no gradients),
applied to the conditional denoised estimate x̂₀ = (x_t − √(1 − ᾱ_t)·D(x; c))/√ᾱ_t:
    p = softmax(C(x̂₀)),  c_ref,t = argmax_{k≠c} p_k,
    s_t = s_max·min(1, (p_ref/p_c)^γ)   ("ratio")   or   s_t = s_max·(1 − p_c)   ("confusion").
The reference-class rule and the scale functions are a reconstruction (the paper's equations were
not available); CFG and ATG use diffusers' ``ClassifierFreeGuidance`` combination, GFCG is a
diffusers guider with the same start/stop step window.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput
from torch import Tensor, nn

from methods.generative.samplers import Predictor

logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)  # "guiders are experimental"

ScaleRule = Literal["ratio", "confusion"]


class GradientFreeClassifierGuidance(BaseGuidance):
    """GFCG as a diffusers guider: ``reference`` picks (c_ref, s_t), ``forward`` adds s_t·(D(c) − D(c_ref))."""

    _input_predictions = ["pred_base", "pred_cond", "pred_ref"]

    @register_to_config
    def __init__(self, guidance_scale: float = 1.0, scale_rule: ScaleRule = "ratio", gamma: float = 1.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.scale_rule = scale_rule
        self.gamma = gamma

    def reference(self, probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: the most probable class other than the target, and the scale s_t (B,)."""
        p_target = probs.gather(1, labels[:, None]).squeeze(1)
        others = probs.scatter(1, labels[:, None], -1.0)
        p_ref, ref = others.max(dim=1)
        if self.scale_rule == "ratio":
            confusion = (p_ref / p_target.clamp_min(1e-12)).pow(self.gamma).clamp(max=1.0)
        else:
            confusion = 1.0 - p_target
        return ref, self.guidance_scale * confusion

    def forward(self, pred_base: Tensor, pred_cond: Tensor, pred_ref: Tensor, scale: Tensor) -> GuiderOutput:
        shape = (-1,) + (1,) * (pred_cond.ndim - 1)
        return GuiderOutput(pred=pred_base + scale.view(shape) * (pred_cond - pred_ref), pred_cond=pred_cond,
                            pred_uncond=None)

    def is_active(self) -> bool:
        """Enabled, s_max ≠ 0 and the current step inside [start, stop) of the steps."""
        if not self._enabled or self.guidance_scale == 0:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    @property
    def is_conditional(self) -> bool:
        return True

    @property
    def num_conditions(self) -> int:
        return 3 if self.is_active() else 1


def denoised(scheduler: DDIMScheduler, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂₀ = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t for per-sample timesteps t (B,)."""
    alpha = scheduler.alphas_cumprod.to(x)[t.long()].view(-1, *([1] * (x.ndim - 1)))
    return (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def guided_predictor(model: nn.Module, labels: Tensor, scheduler: DDIMScheduler, *,
                     base: Literal["cond", "cfg", "atg"] = "cond", scale: float = 1.0, weak: nn.Module | None = None,
                     gfcg: GradientFreeClassifierGuidance | None = None, classifier: nn.Module | None = None,
                     trace: list | None = None) -> Predictor:
    """predict(x, t) for the samplers: the base guidance, plus GFCG when ``gfcg`` is given.

    ``trace`` (optional) receives per step (reference labels, scales) of GFCG, for tests and logs.
    """
    combine = ClassifierFreeGuidance(guidance_scale=scale)
    null = torch.full_like(labels, model.null_label)
    steps = [int(t) for t in scheduler.timesteps]

    def predict(x: Tensor, t: Tensor) -> Tensor:
        if base == "cfg" and scale != 1.0:
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
            out = combine.forward(cond, uncond).pred
        else:
            cond = model(x, t, labels)
            out = combine.forward(cond, weak(x, t, labels)).pred if base == "atg" else cond
        if gfcg is None:
            return out
        gfcg.set_state(steps.index(int(t[0])), len(steps), t)
        if not gfcg.is_active():
            return out
        with torch.no_grad():
            probs = F.softmax(classifier(denoised(scheduler, x, t, cond)), dim=-1)
        ref, s = gfcg.reference(probs, labels)
        if trace is not None:
            trace.append((ref, s))
        return gfcg.forward(out, cond, model(x, t, ref), s).pred

    return predict
