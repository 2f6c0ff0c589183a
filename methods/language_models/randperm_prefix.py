"""The first k entries of torch's CPU ``randperm`` without drawing the whole permutation.

A KGW green list is randperm(|V|)[:⌊γ|V|⌋] under a generator re-seeded at every position, and
torch draws all |V| − 1 swaps to return it. torch's CPU randperm (ATen ``randperm_cpu``, for
n < 2^32 / 20) is a forward Fisher–Yates shuffle on MT19937 seeded with the low 32 bits of the seed
(``init_genrand``):
    a ← (0, …, n − 1);   for i = 0, …, n − 2:   z = next32() mod (n − i);   swap(a[i], a[i + z])
Entry a[i] never changes after step i, so the first k entries need only the first k steps and k
MT19937 outputs. ``randperm_prefixes`` runs exactly those (compiled with numba), for up to 32 rows
side by side; the tests check it against ``torch.randperm`` itself.
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
_LANES = 32  # generators run side by side, one per row, so that seeding, twists and draws vectorize


@numba.njit(cache=True, nogil=True)
def _init_genrand(state: np.ndarray, seeds: np.ndarray) -> None:
    """MT19937 seeding of every lane (column) of state (N, L):
    s_0 = seed, s_j = 1812433253·(s_{j−1} ⊕ (s_{j−1} ≫ 30)) + j (mod 2^32)."""
    for lane in range(state.shape[1]):
        state[0, lane] = seeds[lane] & _WORD
    for j in range(1, _N):
        for lane in range(state.shape[1]):
            prev = state[j - 1, lane]
            state[j, lane] = (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(j)) & _WORD


@numba.njit(inline="always")
def _mix(word: np.uint64, following: np.uint64, far: np.uint64) -> np.uint64:
    y = (word & _UPPER) | (following & _LOWER)
    return far ^ (y >> np.uint64(1)) ^ (_MATRIX & (np.uint64(0) - (y & np.uint64(1))))


@numba.njit(cache=True, nogil=True)
def _twist(state: np.ndarray, row: np.ndarray) -> None:
    """The MT19937 state update of every lane; ``row`` (L,) is scratch, which lets the lanes vectorize."""
    for m in range(_N):
        following = m + 1 if m + 1 < _N else 0
        far = m + _M if m + _M < _N else m + _M - _N
        for lane in range(state.shape[1]):
            row[lane] = _mix(state[m, lane], state[following, lane], state[far, lane])
        for lane in range(state.shape[1]):
            state[m, lane] = row[lane]


@numba.njit(inline="always")
def _temper(y: np.uint64) -> np.uint64:
    y ^= y >> np.uint64(11)
    y ^= (y << np.uint64(7)) & np.uint64(0x9D2C5680)
    y ^= (y << np.uint64(15)) & np.uint64(0xEFC60000)
    return y ^ (y >> np.uint64(18))


@numba.njit(cache=True, nogil=True)
def _draws(seeds: np.ndarray, n: int, draws: np.ndarray) -> None:
    """draws (k, L): step i's swap partner i + next32() mod (n − i) of the generator of each lane."""
    lanes = seeds.shape[0]
    state = np.empty((_N, lanes), np.uint64)
    row = np.empty(lanes, np.uint64)
    _init_genrand(state, seeds)
    used = _N
    for i in range(draws.shape[0]):
        if used == _N:
            _twist(state, row)
            used = 0
        d = n - i
        inverse = 1.0 / d
        for lane in range(lanes):  # y mod d by a multiply: the quotient is off by at most one, then corrected
            y = np.int64(_temper(state[used, lane]))
            rest = y - np.int64(np.float64(y) * inverse) * d
            rest = rest - d if rest >= d else rest
            draws[i, lane] = i + (rest + d if rest < 0 else rest)
        used += 1


@numba.njit(cache=True, nogil=True)
def _prefixes(seeds: np.ndarray, n: int, out: np.ndarray) -> None:
    rows, k = out.shape
    perm = np.arange(n)
    for start in range(0, rows, _LANES):
        block = seeds[start : start + _LANES]
        draws = np.empty((k, block.shape[0]), np.int64)
        _draws(block, n, draws)
        for lane in range(block.shape[0]):
            for i in range(k):  # swap(a[i], a[z]) without writing a[i], which no later step reads
                z = draws[i, lane]
                out[start + lane, i] = perm[z]
                perm[z] = perm[i]
            for i in range(k):  # only the a[z] were written: perm is the identity again for the next row
                perm[draws[i, lane]] = draws[i, lane]


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
