"""Process-wide allocator setting shared by the gradient engines, and a per-call memory/CPU profiler.

Batched gradient work (vmap's grouped convolutions, attack loops over a CNN) allocates and frees
blocks of several MB on every call. glibc's default malloc hands such blocks back to the kernel on
free, so every call pays thousands of page faults: on the digits CNN that is about half the CPU
time of a per-example-gradient or attack step. Keeping freed memory mapped removes them; the cost
is that a process holds on to its peak heap.

`measure` gives one call's peak resident-memory growth and CPU time (Linux): freed heap is handed
back first (``malloc_trim``) and the kernel's peak-RSS mark reset (``/proc/self/clear_refs``), so
VmHWM − VmRSS after the call is the memory that call itself touched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h


@functools.cache
def retain_freed_memory() -> bool:
    """Ask glibc, once per process, to never trim the heap and to serve blocks up to 32 MB from it.

    Returns whether the allocator was tuned (False off glibc, e.g. on macOS).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@dataclass(frozen=True)
class Cost:
    peak_mb: float  # peak resident-memory growth during the call, MiB
    cpu_seconds: float  # CPU time of the calling thread (torch's intra-op threads not included)


def measure(fn: Callable[[], object]) -> Cost:
    """Peak RSS growth and thread CPU time of one call of `fn` (Linux only).

    Run `fn` once unmeasured beforehand, so one-time allocations (caches, lazy imports) are not
    counted; for the whole CPU cost, run with ``torch.set_num_threads(1)``.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current VmRSS
    base_kib = _proc_status_kib("VmRSS")
    start = time.thread_time()
    fn()
    cpu_seconds = time.thread_time() - start
    return Cost(peak_mb=(_proc_status_kib("VmHWM") - base_kib) / 1024, cpu_seconds=cpu_seconds)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _proc_status_kib(field: str) -> int:
    """A kB field (VmRSS, VmHWM, ...) of /proc/self/status."""
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1])
