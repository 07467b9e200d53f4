"""sharding/category.py: whole categories per client; more clients than categories never leaves one empty."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from partitioning import PROPS, assert_partition, problems, split

from fedlora_cli.sharding import make_client_splits


def test_category_split_depends_on_the_seed():
    labels = np.zeros(60, dtype=np.int64)
    cats = np.asarray(list("abcdef") * 10, dtype=object)
    plans = [make_client_splits(labels, 4, "category", s, categories=cats) for s in range(6)]
    assert len({tuple(map(tuple, p.clients)) for p in plans}) > 1


@PROPS
@given(problems())
def test_category_whole_categories_or_one_category_per_client(problem):
    labels, cats, k, seed = problem
    plan = split(labels, cats, k, seed, "category")
    assert_partition(plan, len(labels))
    n_cats = len(np.unique(cats))
    held = [set(cats[c]) for c in plan.clients]
    assert [sorted(h) for h in held] == plan.client_categories
    if k <= n_cats:
        # no category is split: categories' clients are disjoint
        for a in range(k):
            for b in range(a + 1, k):
                assert not held[a] & held[b]
    else:
        assert all(len(h) == 1 for h in held)
        assert "each client still sees one category" in plan.notes[0]


def test_category_more_clients_than_categories_splits_proportionally():
    labels = np.asarray([0] * 70 + [1] * 30)
    plan = make_client_splits(labels, 5, "category", 0, categories=np.asarray(["pos"] * 70 + ["neg"] * 30))
    # quotas 3.5 and 1.5: floors 3 + 1, the fifth client to the larger remainder (a tie: by name)
    assert plan.params["clients_per_category"] == {"neg": 2, "pos": 3}
    assert sorted(plan.sizes) == [15, 15, 23, 23, 24]
    assert any("'pos' (70 examples) split across clients" in note for note in plan.notes)


def test_category_balances_whole_categories_largest_first():
    cats = np.asarray(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10, dtype=object)
    plan = make_client_splits(np.zeros(110, dtype=np.int64), 2, "category", 0, categories=cats)
    # LPT: a -> 1st, b -> 2nd, c -> 2nd (30 < 50), d -> 1st (50 = 50, tie) or 2nd: 60/50 either way
    assert sorted(plan.sizes) == [50, 60]
