"""sharding/overlap.py (and the shared pool category_overlap uses too): only the pool is shared."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from partitioning import OVERLAP_MODES, PROPS, assert_sound, problems, split

from fedlora_cli.sharding import make_client_splits


@PROPS
@given(problems(), st.sampled_from(OVERLAP_MODES), st.sampled_from([0.05, 0.2, 0.5, 0.9]))
def test_overlap_modes_share_only_the_pool(problem, mode, ratio):
    labels, cats, k, seed = problem
    plan = split(labels, cats, k, seed, mode, overlap_ratio=ratio)
    n = len(labels)
    assert_sound(plan, n, k)
    pool = plan.params["pool_size"]
    uses = np.bincount(np.concatenate(plan.clients), minlength=n)
    assert (uses >= 2).sum() <= pool  # only pool examples are shared
    assert (uses >= 1).sum() >= n - pool  # everything outside the pool is used, exactly once
    if pool:
        # each client's pool part is ~ratio of its shard: m = round(ratio * unique / (1 - ratio))
        for size, drawn in zip(plan.sizes, plan.params["pool_draws"], strict=True):
            assert drawn == min(pool, round(ratio * (size - drawn) / (1 - ratio)))


def test_overlap_ratio_zero_is_exactly_iid():
    labels = np.random.default_rng(0).integers(0, 3, 500)
    a = make_client_splits(labels, 7, "iid", 11)
    b = make_client_splits(labels, 7, "overlap", 11, overlap_ratio=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))


def test_overlap_pool_share_per_client():
    labels = np.random.default_rng(1).integers(0, 2, 10_000)
    plan = make_client_splits(labels, 5, "overlap", 3, overlap_ratio=0.2)
    assert plan.params["pool_size"] == 2000
    for size, drawn in zip(plan.sizes, plan.params["pool_draws"], strict=True):
        assert drawn / size == pytest.approx(0.2, abs=0.001)
    assert "shared pool of 2,000 examples" in plan.notes[0]
