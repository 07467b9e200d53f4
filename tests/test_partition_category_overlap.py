"""sharding/category_overlap.py: mostly one category, plus a little of everything from the pool."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding import make_client_splits


def test_category_overlap_keeps_one_category_plus_pool():
    labels = np.asarray([0] * 600 + [1] * 400)
    cats = np.where(labels == 0, "neg", "pos").astype(object)
    plan = make_client_splits(labels, 2, "category_overlap", 5, categories=cats, overlap_ratio=0.15)
    assert plan.params["pool_size"] == 150
    for c, held in zip(plan.clients, plan.client_categories, strict=True):
        main = (cats[c] == held[0]).mean()
        assert 0.85 <= main < 1.0  # mostly its category, some of the other from the pool
