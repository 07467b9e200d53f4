"""sharding/quantity.py: skewed sizes, every client keeping the global label mix."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from partitioning import PROPS, assert_partition, problems, split

from fedlora_cli.errors import InputError


@PROPS
@given(problems(min_n=50), st.sampled_from([0.5, 2.0, 50.0]))
def test_quantity_keeps_labels_balanced(problem, alpha):
    labels, cats, k, seed = problem
    try:
        plan = split(labels, cats, k, seed, "quantity", dirichlet_alpha=alpha)
    except InputError:
        return
    assert_partition(plan, len(labels))
    n = len(labels)
    for g in np.unique(labels):
        n_g = (labels == g).sum()
        for c in plan.clients:
            assert abs((labels[c] == g).sum() - len(c) * n_g / n) < 1
