"""Seeded shuffles computed per element, with no table: what lets packing workers send each
sequence straight to its place in the shuffled output without a global permutation in memory.

- `permute(ids, n, seed)`: a bijection of [0, n) (a 4-round Feistel network on the next
  even power of two, with cycle walking back into range). Element i goes to `permute(i)`.
- `mix64(values, seed)`: a seeded 64-bit hash of integers (splitmix64's finaliser), for
  random sort keys.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
ROUNDS = 4


def mix64(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 of `values + seed·golden`: uniform, seeded uint64 hashes."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, dtype=np.uint64) + np.uint64(seed % 2**64) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
        left, right = right, left ^ (mix64(right ^ key) & mask)
    return (left << np.uint64(half)) | right


def permute(ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Where each of `ids` (in [0, n)) lands under a seeded random permutation of [0, n).

    Args:
        ids: positions to map (any shape), each in [0, n).
        n: size of the permuted range.
        seed: the permutation's seed.

    Returns:
        int64 array like `ids`; `permute(np.arange(n), n, seed)` is a permutation of 0..n-1.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if n < 1 or (ids.size and (ids.min() < 0 or ids.max() >= n)):
        raise ValueError(f"ids must lie in [0, {n})")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    keys = mix64(np.arange(ROUNDS, dtype=np.uint64), seed)
    out = ids.astype(np.uint64)
    todo = np.ones(out.shape, bool)
    while todo.any():  # cycle walking: values outside [0, n) are permuted again
        out[todo] = _feistel(out[todo], half, keys)
        todo = out >= np.uint64(n)
    return out.astype(np.int64)
