"""The learned split's generation step on CPU as one compiled kernel: entropy gate, then bias, row by row.

For each row of the scores z (B, V) and the encoder output e (B, D):
    gate = always or H(softmax(z)) > α
    out_v = z_v · (1 + δ·g[m(v)])  where the gate is on, else z_v;      g = (sign(e) + 1) / 2
— ``bias_logits(z, to_vocabulary(bits(e)), δ, generation_gate(z, …))`` without the six torch operations
over (B, V) tensors that it takes; the bias matches torch's float32 rounding exactly.

The gate rarely needs H itself. With x_v = z_v − max z and S = Σ_v e^{x_v}, H ≥ −log max_v p_v = log S,
and the n logits within 1 of the maximum give S ≥ n/e; so n > e^{α+1} proves H > α (with a
1e-3 margin for rounding). Otherwise H = log S − Σ_v e^{x_v}·x_v / S, with x_v clamped at −87 (where
e^x < 2^−125) so that masked logits (−inf) count as p = 0, and exp as Cephes' ``expf`` (range
reduction by ln 2, degree-6 polynomial, ~1 ulp), written out so that LLVM vectorizes it: H agrees
with ``learned_split.entropy`` to ~1e-5.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_LANES = 16  # independent partial maxima, so that the max reduction vectorizes
_FLOOR = np.float32(-87.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO (Cody–Waite)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
             np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@intrinsic
def _float32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(inline="always")
def _exp(x: np.float32) -> np.float32:
    """e^x for x in [−87, 0]: 2^k · p(r), k = round(x / ln 2), r = x − k·ln 2."""
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    return (p * r * r + r + np.float32(1.0)) * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@numba.njit(cache=True, nogil=True)
def _row_max(z: np.ndarray, lanes: np.ndarray) -> np.float32:
    n = z.shape[0]
    end = n - n % _LANES
    lanes[:] = z[0]
    for i in range(0, end, _LANES):
        for j in range(_LANES):
            lanes[j] = z[i + j] if z[i + j] > lanes[j] else lanes[j]
    m = z[0]
    for j in range(_LANES):
        m = max(m, lanes[j])
    for i in range(end, n):
        m = max(m, z[i])
    return m


@numba.njit(cache=True, nogil=True)
def _near_max(z: np.ndarray, m: np.float32) -> int:
    """How many z_v ≥ m − 1."""
    low = m - np.float32(1.0)
    near = 0
    for v in range(z.shape[0]):
        near += 1 if z[v] >= low else 0
    return near


@numba.njit(cache=True, nogil=True, fastmath={"contract"})  # fused multiply-adds
def _shifted_exp(z: np.ndarray, m: np.float32, x: np.ndarray, w: np.ndarray) -> None:
    """x = max(z − m, −87), w = e^x."""
    for v in range(z.shape[0]):
        xv = z[v] - m
        xv = xv if xv > _FLOOR else _FLOOR
        x[v] = xv
        w[v] = _exp(xv)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})  # vectorized sums
def _entropy_sums(x: np.ndarray, w: np.ndarray) -> tuple[np.float32, np.float32]:
    s = np.float32(0.0)
    t = np.float32(0.0)
    for v in range(x.shape[0]):
        s += w[v]
        t += w[v] * x[v]
    return s, t


@numba.njit(cache=True, nogil=True)
def _row_entropy(z: np.ndarray, m: np.float32, x: np.ndarray, w: np.ndarray) -> np.float32:
    """H = log S − T / S with S = Σ e^x, T = Σ e^x·x, x = max(z − m, −87); x, w: row scratch."""
    _shifted_exp(z, m, x, w)
    s, t = _entropy_sums(x, w)
    return np.log(s) - t / s


@numba.njit(cache=True, nogil=True)
def _entropies(z: np.ndarray, out: np.ndarray) -> None:
    lanes, x, w = np.empty(_LANES, np.float32), np.empty(z.shape[1], np.float32), np.empty(z.shape[1], np.float32)
    for b in range(z.shape[0]):
        out[b] = _row_entropy(z[b], _row_max(z[b], lanes), x, w)


@numba.njit(cache=True, nogil=True)
def _gated_bias(z: np.ndarray, e: np.ndarray, mapping: np.ndarray, delta: np.float32, alpha: np.float32,
                surely_above: float, always: bool, out: np.ndarray) -> None:
    lanes, x, w = np.empty(_LANES, np.float32), np.empty(z.shape[1], np.float32), np.empty(z.shape[1], np.float32)
    factor = np.empty(e.shape[1], np.float32)
    for b in range(z.shape[0]):
        if not always:
            m = _row_max(z[b], lanes)
            if _near_max(z[b], m) <= surely_above and _row_entropy(z[b], m, x, w) <= alpha:
                out[b] = z[b]
                continue
        for d in range(e.shape[1]):
            factor[d] = (np.sign(e[b, d]) + np.float32(1.0)) / np.float32(2.0) * delta + np.float32(1.0)
        for v in range(z.shape[1]):
            out[b, v] = z[b, v] * factor[mapping[v]]


def entropies(logits: torch.Tensor) -> torch.Tensor:
    """H of softmax over the last axis of float32 CPU ``logits`` (B, V), as the fused kernel computes it."""
    z = logits.detach().contiguous().numpy()
    out = np.empty(z.shape[0], np.float32)
    _entropies(z, out)
    return torch.from_numpy(out)


def gated_bias(scores: torch.Tensor, e: torch.Tensor, mapping: torch.Tensor, delta: float, alpha: float,
               always: bool) -> torch.Tensor:
    """New (B, V) scores: z·(1 + δ·g[m(v)]) on rows where ``always`` or H(z) > α, z elsewhere; float32 CPU
    ``scores`` (B, V), ``e`` (B, D), int ``mapping`` (V,) into 0..D−1."""
    z = scores.detach().contiguous().numpy()
    out = np.empty_like(z)
    _gated_bias(z, e.detach().contiguous().numpy(), mapping.numpy(), np.float32(delta), np.float32(alpha),
                math.exp(min(alpha + 1.001, 709.0)), always, out)  # e^709: beyond any vocabulary
    return torch.from_numpy(out)
