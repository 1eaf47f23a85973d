"""The training order: a seeded bijection over global sample positions, independent of world size.

Position j (0, 1, 2, ...) maps to (shard set, packed sample index, epoch). Step k consumes positions
[k*G, (k+1)*G) for global batch G; rank r takes a fixed contiguous slice. The data state in a
checkpoint is therefore one integer: the next position.
Nothing here materialises a permutation: a Feistel network with cycle-walking permutes [0, N) in
O(1) memory, and mixtures use fixed-composition blocks whose slots are shuffled per block.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_array(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 over uint64 arrays (wrap-around arithmetic intended)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection on [0, n)."""

    def __init__(self, n: int, key: int, rounds: int = 4):
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix(key * 31 + r) for r in range(rounds)]

    def _enc(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._enc(i)
        while x >= self.n:  # cycle-walking stays inside [0, n)
            x = self._enc(x)
        return x


def _block_counts(weights: list[float], block: int) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    raw = w * block
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class GlobalOrder:
    """Global position -> (set, sample index, epoch of that set) for one or more sample sets."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, block: int = 1000):
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every shard set needs at least one packed sample, got sizes {sizes}")
        self.sizes, self.seed = sizes, seed
        self.block = 1 if len(sizes) == 1 else block
        self.counts = [1] if len(sizes) == 1 else _block_counts(weights, self.block)
        if len(sizes) > 1 and min(self.counts) == 0:
            raise ValueError(f"mixture weights {weights} give a set no slot in a block of {self.block}")
        self.starts = np.cumsum([0] + self.counts[:-1]).tolist()
        self._perm = lru_cache(maxsize=8)(self._perm_uncached)
        self._block_perm = lru_cache(maxsize=4)(self._block_perm_uncached)

    def _perm_uncached(self, s: int, epoch: int) -> FeistelPermutation:
        return FeistelPermutation(self.sizes[s], _mix(self.seed * 1_000_003 + s * 7919 + epoch))

    def _block_perm_uncached(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 17, b])
        return rng.permutation(self.block)

    def __call__(self, j: int) -> tuple[int, int, int]:
        if self.block == 1:
            s, local = 0, j
        else:
            b, r = divmod(j, self.block)
            slot = int(self._block_perm(b)[r])
            s = int(np.searchsorted(self.starts, slot, side="right") - 1)
            local = b * self.counts[s] + slot - self.starts[s]
        epoch, k = divmod(local, self.sizes[s])
        return s, self._perm(s, epoch)(k), epoch


def rank_positions(step: int, micro: int, global_batch: int, rank: int, world: int) -> list[list[int]]:
    """The global positions rank `rank` consumes at optimizer step `step`, as micro batches."""
    per_rank = global_batch // world
    base = step * global_batch + rank * per_rank
    return [list(range(base + m, base + m + micro)) for m in range(0, per_rank, micro)]
