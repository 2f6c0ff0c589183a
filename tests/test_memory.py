import sys

import pytest
import torch

from methods.engines.memory import measure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def test_measure_sees_a_200_mb_tensor_and_not_a_trivial_call():
    allocate = lambda: torch.ones(50 * 2**20)  # noqa: E731  (200 MiB of float32, every page written)
    trivial = lambda: sum(range(1000))  # noqa: E731
    allocate(), trivial()  # warm-up, as the callers do
    big, small = measure(allocate), measure(trivial)
    assert big.peak_mb >= 150
    assert small.peak_mb < 20
    assert big.cpu_seconds >= 0 and small.cpu_seconds >= 0
