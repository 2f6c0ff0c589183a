"""Corruption library: strength monotone in severity, determinism, range and shape."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.datasets import load_digits

from methods.engines.corruptions import CORRUPTIONS, SEVERITIES, corrupt


def _digits() -> np.ndarray:
    return (load_digits().images[:32, None] / 16.0).astype(np.float32)


def _rgb(size: int = 16) -> np.ndarray:
    z = np.random.default_rng(0).random((8, 3, size, size))
    z = ndimage.gaussian_filter(z, (0, 0, size / 8, size / 8))
    lo, hi = z.min(axis=(1, 2, 3), keepdims=True), z.max(axis=(1, 2, 3), keepdims=True)
    return (0.1 + 0.8 * (z - lo) / (hi - lo)).astype(np.float32)


BATCHES = {"digits_c1": _digits(), "rgb_c3": _rgb()}


def test_registry_covers_paper_set():
    assert len(CORRUPTIONS) == 16


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_strength_strictly_increases_with_severity(name, batch):
    x = BATCHES[batch]
    mad = [np.abs(corrupt(x, name, s, seed=3) - x).mean() for s in SEVERITIES]
    assert mad[0] > 0
    assert all(b > a for a, b in zip(mad, mad[1:])), mad


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_deterministic_range_and_shape(name, batch):
    x = BATCHES[batch]
    a = corrupt(x, name, 4, seed=7)
    b = corrupt(x, name, 4, seed=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_seed_changes_random_corruptions():
    x = BATCHES["rgb_c3"]
    a, b = corrupt(x, "gaussian_noise", 3, 0), corrupt(x, "gaussian_noise", 3, 1)
    assert not np.array_equal(a, b)


def test_input_untouched_and_validation():
    x = BATCHES["digits_c1"].copy()
    corrupt(x, "impulse_noise", 5, 0)
    np.testing.assert_array_equal(x, BATCHES["digits_c1"])
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6, 0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        corrupt(x[0], "fog", 1, 0)
