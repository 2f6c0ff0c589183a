"""Robust weight signatures (Cai, Zhang, Wang 2023): arithmetic on state dicts, layer by layer.

With θ_pre the shared initialisation, θ_std the clean fine-tune and θ_c the fine-tune on corruption c,
per weight tensor k: d = vec(θ_c[k] − θ_pre[k]), a = vec(θ_std[k] − θ_pre[k]) and

    RWS_c[k] = d − a·(a·d)/(a·a)      (d projected onto the orthogonal complement of the clean update)

Patching adds α·RWS_c[k] to a model's tensor k; unpatching subtracts it. The step α·RWS is rounded to
float32 and added in float64: the float64 sum of two float32 numbers is exact unless their binary
exponents differ by more than 28, so unpatching a signature gives the float32 weights back bit for
bit. 8-bit linear quantisation per tensor: q = round((s − lo)/Δ) ∈ {0..255}, Δ = (hi − lo)/255,
s ≈ lo + q·Δ (stored as q plus lo and Δ in float32).
"""
from __future__ import annotations

import torch
from torch import Tensor

Weights = dict[str, Tensor]
LEVELS = 255  # 8 bits


def layers(state: Weights) -> list[list[str]]:
    """Keys grouped by module (``"0.weight", "0.bias"`` → one layer), in state-dict order."""
    groups: dict[str, list[str]] = {}
    for key, value in state.items():
        if value.is_floating_point():
            groups.setdefault(key.rpartition(".")[0], []).append(key)
    return list(groups.values())


def first_layers(state: Weights, n: int) -> list[str]:
    """Keys of the first ``n`` layers: the ones a signature patches."""
    return [k for group in layers(state)[:n] for k in group]


def signature(pre: Weights, std: Weights, robust: Weights, keys: list[str]) -> Weights:
    out = {}
    for k in keys:
        d = (robust[k] - pre[k]).double().flatten()
        a = (std[k] - pre[k]).double().flatten()
        out[k] = (d - a * (a @ d) / (a @ a).clamp_min(1e-30)).view_as(pre[k]).float()
    return out


def _step(sig: Tensor, alpha: float) -> Tensor:
    return (alpha * sig.float()).double()


def patch(weights: Weights, sig: Weights, alpha: float = 1.0) -> Weights:
    """θ + α·RWS on the signature's keys, every tensor returned in float64."""
    return {k: w.double() + _step(sig[k], alpha) if k in sig else w.double() for k, w in weights.items()}


def unpatch(weights: Weights, sig: Weights, alpha: float = 1.0) -> Weights:
    """θ − α·RWS: undoes :func:`patch` with the same signature and α."""
    return {k: w.double() - _step(sig[k], alpha) if k in sig else w.double() for k, w in weights.items()}


def quantize(sig: Weights) -> dict[str, dict]:
    out = {}
    for k, s in sig.items():
        lo, hi = float(s.min()), float(s.max())
        step = (hi - lo) / LEVELS or 1.0
        out[k] = {"q": torch.round((s - lo) / step).to(torch.uint8), "lo": lo, "step": step}
    return out


def dequantize(quantized: dict[str, dict]) -> Weights:
    return {k: (v["lo"] + v["q"].float() * v["step"]).float() for k, v in quantized.items()}


def nbytes(weights: Weights) -> int:
    return sum(v.numel() * v.element_size() for v in weights.values())


def quantized_nbytes(quantized: dict[str, dict]) -> int:
    """Codes (1 byte each) plus lo and Δ as float32 per tensor."""
    return sum(v["q"].numel() + 8 for v in quantized.values())


def cosine(a: Weights, b: Weights) -> float:
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(a)])
    return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-30))


def layer_changes(pre: Weights, std: Weights, robust: Weights) -> list[dict]:
    """Per layer: ``ratio`` ‖θ_c − θ_std‖/‖θ_std − θ_pre‖ (the spec's), ``relative`` ‖θ_c − θ_std‖/‖θ_std‖."""
    rows = []
    for group in layers(std):
        def norm(f):
            return float(torch.cat([f(k).double().flatten() for k in group]).norm())
        diff = norm(lambda k: robust[k] - std[k])
        rows.append({"layer": group[0].rpartition(".")[0], "ratio": diff / max(norm(lambda k: std[k] - pre[k]), 1e-30),
                     "relative": diff / max(norm(lambda k: std[k]), 1e-30)})
    return rows
