"""Process-wide allocator setting shared by the gradient engines.

Batched gradient work (vmap's grouped convolutions, attack loops over a CNN) allocates and frees
blocks of several MB on every call. glibc's default malloc hands such blocks back to the kernel on
free, so every call pays thousands of page faults: on the digits CNN that is about half the CPU
time of a per-example-gradient or attack step. Keeping freed memory mapped removes them; the cost
is that a process holds on to its peak heap.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h


@functools.cache
def retain_freed_memory() -> bool:
    """Ask glibc, once per process, to never trim the heap and to serve blocks up to 32 MB from it.

    Returns whether the allocator was tuned (False off glibc, e.g. on macOS).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
