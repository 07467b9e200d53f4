"""sharding/dirichlet.py: label skew that grows as alpha shrinks; --min-size by bounded redraws."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_cli.errors import InputError
from fedlora_cli.sharding import ShardPlan, make_client_splits


def test_dirichlet_and_quantity_meet_min_size_or_say_what_to_change():
    labels = np.random.default_rng(2).integers(0, 4, 2000)
    for mode in ("dirichlet", "quantity"):
        plan = make_client_splits(labels, 10, mode, 0, dirichlet_alpha=0.5, min_size=20)
        assert min(plan.sizes) >= 20
        assert plan.params["min_size"] == 20 and plan.params["redraws"] >= 0
    with pytest.raises(InputError, match="raise --dirichlet-alpha, lower --min-size or use fewer clients"):
        make_client_splits(labels[:100], 50, "dirichlet", 0, dirichlet_alpha=0.01, min_size=2, max_redraws=5)


def mean_label_entropy(plan: ShardPlan, labels: np.ndarray, n_labels: int) -> float:
    """Mean over clients of the entropy of the client's label distribution, normalised by log(#labels)."""
    out = []
    for c in plan.clients:
        p = np.bincount(labels[c], minlength=n_labels) / len(c)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum() / np.log(n_labels)))
    return float(np.mean(out))


def test_smaller_alpha_gives_more_label_skew():
    labels = np.random.default_rng(3).integers(0, 5, 20_000)
    alphas = (0.1, 0.5, 1.0, 10.0)
    entropy = [
        np.mean([mean_label_entropy(make_client_splits(labels, 10, "dirichlet", s, dirichlet_alpha=a), labels, 5)
                 for s in range(3)])
        for a in alphas
    ]  # fmt: skip
    assert entropy == sorted(entropy), dict(zip(alphas, entropy, strict=True))
    assert entropy[0] < 0.5 < 0.95 < entropy[-1]
    iid = mean_label_entropy(make_client_splits(labels, 10, "iid", 0), labels, 5)
    assert iid > entropy[-1]
