"""Seeded per-element shuffles: bijections of [0, n), deterministic, seed-dependent."""

import numpy as np
import pytest

from lorydata.shuffle import mix64, permute


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permute_is_a_bijection_of_the_range(n):
    out = permute(np.arange(n), n, seed=7)
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, seed=7), out[::-1])


def test_permute_depends_on_the_seed_and_looks_random():
    n = 10_000
    a, b = permute(np.arange(n), n, 0), permute(np.arange(n), n, 1)
    assert not np.array_equal(a, b)
    # Neighbours in the input land far apart: the correlation of input and output is ~0.
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    with pytest.raises(ValueError):
        permute(np.array([n]), n)


def test_mix64_is_seeded_and_spreads_bits():
    x = np.arange(100_000, dtype=np.uint64)
    h0, h1 = mix64(x, 0), mix64(x, 1)
    assert len(np.unique(h0)) == len(x) and not np.array_equal(h0, h1)
    top = (h0 >> np.uint64(60)).astype(int)
    assert np.bincount(top, minlength=16).min() > 0.9 * len(x) / 16
