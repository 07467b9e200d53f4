"""Shared by the partitioner tests (test_partition_*.py): synthetic problems and what every plan guarantees."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fedlora_cli.sharding import ShardPlan, make_client_splits

PARTITION_MODES = ("iid", "category", "dirichlet", "quantity")
OVERLAP_MODES = ("overlap", "category_overlap")
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, min_n: int = 1, max_n: int = 240, max_clients: int = 12):
    """Synthetic labels (1-5 classes), categories (1-6 values), K <= N and a seed."""
    n = draw(st.integers(min_n, max_n))
    n_labels = draw(st.integers(1, 5))
    n_cats = draw(st.integers(1, 6))
    labels = np.asarray(draw(st.lists(st.integers(0, n_labels - 1), min_size=n, max_size=n)), dtype=np.int64)
    cats = np.asarray(
        draw(st.lists(st.sampled_from("abcdef"[:n_cats]), min_size=n, max_size=n)), dtype=object
    )
    k = draw(st.integers(1, min(n, max_clients)))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, cats, k, seed


def split(labels, cats, k, seed, mode, **kw) -> ShardPlan:
    return make_client_splits(labels, k, mode, seed, categories=cats, **kw)


def assert_sound(plan: ShardPlan, n: int, k: int) -> None:
    """What every mode guarantees: K non-empty, sorted, duplicate-free int64 arrays into 0..N-1."""
    assert len(plan.clients) == k
    for c in plan.clients:
        assert c.dtype == np.int64 and c.size > 0
        assert np.all(np.diff(c) > 0)  # sorted, no duplicates within a client
        assert c.min() >= 0 and c.max() < n


def assert_partition(plan: ShardPlan, n: int) -> None:
    """Disjoint and covering: every example in exactly one client."""
    everything = np.concatenate(plan.clients)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))
