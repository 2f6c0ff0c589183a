"""Endoscopy-style image corruptions at five severities.

Re-implementation, from their descriptions, of the 16 corruptions of FedAgain's
``endoscopycorruptions`` (ImageNet-C style). Every corruption works on a float batch
``x`` of shape (N, C, H, W) with values in [0, 1], any C (colour-only effects fall back
to a luminance effect when C != 3). Randomness comes only from the ``numpy.random.Generator``
passed in. Spatial parameters are given in pixels for images up to 32 px and scale with
``min(H, W) / 32`` above that. Severity 1..5; for a fixed seed the strength (mean absolute
change) grows with severity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import AfterValidator
from scipy import ndimage

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
SEVERITIES = (1, 2, 3, 4, 5)


def _scale(x: np.ndarray) -> float:
    return max(1.0, min(x.shape[-2:]) / 32.0)


def _planes(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a 2-D function to each (n, c) plane."""
    flat = x.reshape(-1, *x.shape[-2:])
    return np.stack([fn(p) for p in flat]).reshape(x.shape)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return ndimage.convolve(x, kernel[None, None], mode="reflect")


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect")


# --- photometric ------------------------------------------------------------------------


def brightness(x, severity, rng):
    """x' = x + c."""
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


def darkness(x, severity, rng):
    """x' = (1 - c) x."""
    return x * (1.0 - (0.2, 0.35, 0.5, 0.65, 0.8)[severity - 1])


def contrast(x, severity, rng):
    """x' = m + c (x - m), m the per-image mean."""
    c = (0.6, 0.45, 0.3, 0.2, 0.1)[severity - 1]
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return m + c * (x - m)


def fog(x, severity, rng):
    """Haze: x' = (1 - a) x + a L, L = 0.6 + 0.4 f with f a smooth random field in [0, 1]."""
    a = (0.15, 0.3, 0.45, 0.6, 0.75)[severity - 1]
    n, _, h, w = x.shape
    f = _blur(rng.random((n, 1, h, w)), max(h, w) / 4)
    lo, hi = f.min(axis=(2, 3), keepdims=True), f.max(axis=(2, 3), keepdims=True)
    airlight = 0.6 + 0.4 * (f - lo) / (hi - lo + 1e-12)
    return (1 - a) * x + a * airlight


def color_changes(x, severity, rng):
    """Hue rotation by +-theta about the grey axis (C = 3); gamma x^g otherwise."""
    theta = np.deg2rad((15, 30, 45, 60, 90)[severity - 1])
    sign = rng.choice((-1.0, 1.0), size=len(x))
    if x.shape[1] != 3:
        return x ** (1.2, 1.4, 1.7, 2.0, 2.5)[severity - 1]
    u = np.full(3, 1 / np.sqrt(3))
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    out = np.empty_like(x)
    for i, s in enumerate(sign):  # Rodrigues: R = I + sin(t) K + (1 - cos(t)) K^2
        r = np.eye(3) + np.sin(s * theta) * k + (1 - np.cos(theta)) * k @ k
        out[i] = np.einsum("ij,jhw->ihw", r, x[i])
    return out


# --- blur -------------------------------------------------------------------------------


def _disk(radius: float, supersample: int = 8) -> np.ndarray:
    """Anti-aliased disk: each weight is the pixel's area fraction inside the radius."""
    r = int(np.ceil(radius))
    t = (np.arange(supersample) + 0.5) / supersample - 0.5
    axis = (np.arange(-r, r + 1)[:, None] + t[None, :]).ravel()
    inside = (axis[:, None] ** 2 + axis[None, :] ** 2) <= radius**2
    kernel = inside.reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean(axis=(1, 3))
    return kernel / kernel.sum()


def defocus_blur(x, severity, rng):
    """Convolution with an anti-aliased disk of radius r."""
    r = (0.75, 1.0, 1.5, 2.0, 3.0)[severity - 1] * _scale(x)
    return _convolve(x, _disk(r))


def glass_blur(x, severity, rng):
    """Gaussian blur, local pixel shuffling within +-delta px (repeated), Gaussian blur."""
    sigma, delta, iters = ((0.4, 1, 1), (0.5, 1, 2), (0.6, 2, 2), (0.7, 2, 3), (0.9, 3, 3))[
        severity - 1
    ]
    k = _scale(x)
    delta = max(1, round(delta * k))
    n, c, h, w = x.shape
    out = _blur(x, sigma * k)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for _ in range(iters):
        dr, dc = rng.integers(-delta, delta + 1, size=(2, n, 1, h, w))
        src = np.clip(rows + dr, 0, h - 1) * w + np.clip(cols + dc, 0, w - 1)
        src = np.repeat(src.reshape(n, 1, h * w), c, axis=1)
        out = np.take_along_axis(out.reshape(n, c, h * w), src, axis=2).reshape(x.shape)
    return _blur(out, sigma * k)


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """Centred line of the given length and angle, bilinearly splatted onto a grid."""
    r = int(np.ceil(length / 2)) + 1
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    for t in np.linspace(-length / 2, length / 2, max(2, int(8 * length))):
        py, px = r + t * np.sin(angle), r + t * np.cos(angle)
        y0, x0 = int(np.floor(py)), int(np.floor(px))
        fy, fx = py - y0, px - x0
        kernel[y0, x0] += (1 - fy) * (1 - fx)
        kernel[y0 + 1, x0] += fy * (1 - fx)
        kernel[y0, x0 + 1] += (1 - fy) * fx
        kernel[y0 + 1, x0 + 1] += fy * fx
    return kernel / kernel.sum()


def motion_blur(x, severity, rng):
    """Convolution with a line kernel of length L at a random angle per image."""
    length = (1.5, 2.5, 3.5, 5.0, 7.0)[severity - 1] * _scale(x)
    angles = rng.uniform(-np.pi / 4, np.pi / 4, size=len(x))
    return np.stack([_convolve(xi[None], _line_kernel(length, a))[0] for xi, a in zip(x, angles)])


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Centre zoom by ``factor`` (output pixel p samples centre + (p - centre) / factor)."""
    flat = x.reshape(-1, *x.shape[-2:])
    centre = (np.array(flat.shape) - 1) / 2
    matrix = np.array([1.0, 1 / factor, 1 / factor])
    offset = centre - matrix * centre
    offset[0] = 0
    return ndimage.affine_transform(flat, matrix, offset, order=1, mode="nearest").reshape(x.shape)


def zoom_blur(x, severity, rng):
    """Mean of x and centre zooms of x by factors 1 + 0.02 k up to z_max."""
    z_max = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    zooms = np.arange(1.02, z_max + 1e-9, 0.02)
    return (x + sum(_zoom(x, z) for z in zooms)) / (len(zooms) + 1)


# --- noise ------------------------------------------------------------------------------


def gaussian_noise(x, severity, rng):
    """x' = x + sigma e, e ~ N(0, 1)."""
    return x + (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1] * rng.standard_normal(x.shape)


def impulse_noise(x, severity, rng):
    """Salt and pepper: a fraction p of values set to 0 or 1 (nested across severities)."""
    p = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    hit, salt = rng.random(x.shape) < p, rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def shot_noise(x, severity, rng):
    """Poisson photon noise: x' = Poisson(lambda x) / lambda."""
    lam = (60, 25, 12, 5, 3)[severity - 1]
    return rng.poisson(x * lam) / lam


def iso_noise(x, severity, rng):
    """Sensor noise: x' = x + sigma (sqrt(x) e_lum + 0.5 e_chroma), e_lum shared by channels."""
    sigma = (0.05, 0.08, 0.12, 0.17, 0.24)[severity - 1]
    lum = rng.standard_normal((len(x), 1, *x.shape[2:]))
    chroma = rng.standard_normal(x.shape)
    return x + sigma * (np.sqrt(np.clip(x, 0, 1)) * lum + 0.5 * chroma)


# --- geometry and optics ----------------------------------------------------------------


def lens_distortion(x, severity, rng):
    """Barrel distortion: output radius r samples input radius r (1 + k r^2), r in [-1, 1]."""
    k = (0.1, 0.2, 0.3, 0.45, 0.6)[severity - 1]
    h, w = x.shape[-2:]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ry, rx = max(cy, 1.0), max(cx, 1.0)
    v, u = np.meshgrid((np.arange(h) - cy) / ry, (np.arange(w) - cx) / rx, indexing="ij")
    gain = 1 + k * (u**2 + v**2)
    coords = np.stack([cy + v * gain * ry, cx + u * gain * rx])
    return _planes(x, lambda p: ndimage.map_coordinates(p, coords, order=1, mode="constant"))


def resolution_change(x, severity, rng):
    """Bilinear downsampling by a factor f, then bilinear upsampling to the original size."""
    f = (1.25, 1.6, 2.0, 2.7, 4.0)[severity - 1]
    n, c, h, w = x.shape
    small = (max(1, round(h / f)), max(1, round(w / f)))
    kw = dict(order=1, grid_mode=True, mode="nearest")
    down = ndimage.zoom(x.reshape(n * c, h, w), (1, small[0] / h, small[1] / w), **kw)
    return ndimage.zoom(down, (1, h / small[0], w / small[1]), **kw).reshape(x.shape)


def specular_reflection(x, severity, rng):
    """Screen-blend s white Gaussian highlights: x' = 1 - (1 - x)(1 - g) (nested spots)."""
    n, _, h, w = x.shape
    centres = rng.uniform((0, 0), (h, w), size=(n, 5, 2))
    widths = rng.uniform(0.06, 0.12, size=(n, 5)) * min(h, w) + 0.3
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    g = np.zeros((n, 1, h, w))
    for j in range(severity):
        cy, cx, width = (v[:, None, None] for v in (*centres[:, j].T, widths[:, j]))
        g[:, 0] += np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * width**2))
    g = np.clip(g, 0, 1)
    return 1 - (1 - x) * (1 - g)


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f
    for f in (
        brightness, darkness, contrast, fog,
        defocus_blur, glass_blur, motion_blur, zoom_blur,
        gaussian_noise, impulse_noise, shot_noise, iso_noise,
        lens_distortion, resolution_change, specular_reflection, color_changes,
    )
}


def known_corruptions(names: list[str]) -> list[str]:
    """Config validator: distinct names of registered corruptions."""
    unknown = sorted(set(names) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(sorted(CORRUPTIONS))}")
    if len(set(names)) != len(names):
        raise ValueError("corruptions must be distinct")
    return names


CorruptionNames = Annotated[list[str], AfterValidator(known_corruptions)]


def corrupt(
    images: np.ndarray, name: str, severity: int, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Corrupt a float batch (N, C, H, W) in [0, 1]; returns float32 clipped to [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (N, C, H, W), got {x.shape}")
    out = CORRUPTIONS[name](x, severity, np.random.default_rng(seed))
    return np.clip(out, 0.0, 1.0).astype(np.float32)
