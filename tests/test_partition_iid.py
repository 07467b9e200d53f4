"""sharding/iid.py (and the keys it balances): every client's label mix is the global one."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from partitioning import PROPS, assert_partition, problems, split

from fedlora_cli.sharding import bin_scores, make_client_splits


@PROPS
@given(problems(), st.booleans())
def test_iid_matches_global_label_mix_within_one_example_per_stratum(problem, separate_strata):
    labels, cats, k, seed = problem
    # MNLI-style: strata label|genre, finer than the labels
    strata = labels * 10 + (np.arange(len(labels)) % 3) if separate_strata else None
    plan = split(labels, cats, k, seed, "iid", strata=strata)
    assert_partition(plan, len(labels))
    keys = labels if strata is None else strata
    for g in np.unique(keys):
        share = (keys == g).sum() / k
        for c in plan.clients:
            assert abs((keys[c] == g).sum() - share) < 1
    assert max(plan.sizes) - min(plan.sizes) <= 1


def test_regression_labels_stratify_by_score_bins():
    assert bin_scores(np.asarray([0.0, 0.15, 0.2, 0.6, 4.99, 5.0])).tolist() == [0, 0, 1, 3, 24, 25]
    scores = np.random.default_rng(4).uniform(0, 5, 1000)
    plan = make_client_splits(scores, 4, "iid", 0)
    bins = bin_scores(scores)
    for b in np.unique(bins):
        for c in plan.clients:
            assert abs((bins[c] == b).sum() - (bins == b).sum() / 4) < 1
    plan = make_client_splits(scores, 4, "dirichlet", 0, dirichlet_alpha=1.0)
    assert_partition(plan, 1000)
