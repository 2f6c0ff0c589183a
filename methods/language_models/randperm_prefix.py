"""The first k entries of torch's CPU ``randperm`` without drawing the whole permutation.

A KGW green list is randperm(|V|)[:⌊γ|V|⌋] under a generator re-seeded at every position, and
torch draws all |V| − 1 swaps to return it. torch's CPU randperm (ATen ``randperm_cpu``, for
n < 2^32 / 20) is a forward Fisher–Yates shuffle on MT19937 seeded with the low 32 bits of the seed
(``init_genrand``):
    a ← (0, …, n − 1);   for i = 0, …, n − 2:   z = next32() mod (n − i);   swap(a[i], a[i + z])
Entry a[i] never changes after step i, so the first k entries need only the first k steps and k
MT19937 outputs. ``randperm_prefixes`` runs exactly those (compiled with numba); the tests check it
against ``torch.randperm`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch

_N = 624  # MT19937 state words
_M = 397
_MATRIX = np.uint64(0x9908B0DF)
_UPPER = np.uint64(0x80000000)
_LOWER = np.uint64(0x7FFFFFFF)
_WORD = np.uint64(0xFFFFFFFF)
_SMALL_N = 0xFFFFFFFF // 20  # randperm_cpu's bound for the 32-bit shuffle


@numba.njit(cache=True, nogil=True)
def _init_genrand(state: np.ndarray, seed: np.uint64) -> None:
    """MT19937 seeding: s_0 = seed, s_j = 1812433253·(s_{j−1} ⊕ (s_{j−1} ≫ 30)) + j (mod 2^32)."""
    state[0] = seed & _WORD
    for j in range(1, _N):
        prev = state[j - 1]
        state[j] = (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(j)) & _WORD


@numba.njit(cache=True, nogil=True)
def _twist(state: np.ndarray) -> None:
    for m in range(_N):
        y = (state[m] & _UPPER) | (state[(m + 1) % _N] & _LOWER)
        value = state[(m + _M) % _N] ^ (y >> np.uint64(1))
        if y & np.uint64(1):
            value ^= _MATRIX
        state[m] = value


@numba.njit(cache=True, nogil=True)
def _temper(y: np.uint64) -> np.uint64:
    y ^= y >> np.uint64(11)
    y ^= (y << np.uint64(7)) & np.uint64(0x9D2C5680)
    y ^= (y << np.uint64(15)) & np.uint64(0xEFC60000)
    return y ^ (y >> np.uint64(18))


@numba.njit(cache=True, nogil=True)
def _prefixes(seeds: np.ndarray, n: int, out: np.ndarray) -> None:
    k = out.shape[1]
    state = np.empty(_N, np.uint64)
    perm = np.arange(n)
    swapped = np.empty(k, np.int64)
    for row in range(seeds.shape[0]):
        _init_genrand(state, seeds[row])
        used = _N
        for i in range(k):
            if used == _N:
                _twist(state)
                used = 0
            z = i + np.int64(_temper(state[used]) % np.uint64(n - i))
            used += 1
            perm[i], perm[z] = perm[z], perm[i]
            swapped[i] = z
            out[row, i] = perm[i]
        for i in range(k - 1, -1, -1):  # undo the swaps: perm is the identity again for the next row
            z = swapped[i]
            perm[i], perm[z] = perm[z], perm[i]


def randperm_prefixes(seeds: Sequence[int], n: int, k: int) -> torch.LongTensor:
    """(len(seeds), k): row r = torch.randperm(n, generator=torch.Generator().manual_seed(seeds[r]))[:k]."""
    if not 0 <= k < n:
        raise ValueError(f"prefix length k={k} must lie in [0, n) for n={n}")
    if n >= _SMALL_N:
        raise ValueError(f"n={n}: torch shuffles n ≥ {_SMALL_N} with 64-bit draws, which this kernel does not")
    low = np.fromiter((int(s) & 0xFFFFFFFF for s in seeds), dtype=np.uint64, count=len(seeds))
    out = np.empty((len(low), k), dtype=np.int64)
    _prefixes(low, n, out)
    return torch.from_numpy(out)
