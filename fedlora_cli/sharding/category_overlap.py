"""category_overlap: `category` plus a shared pool drawn from the whole data."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding import category
from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import add_overlap, codes_of, pool_size, stratified_pick


def split(rng: np.random.Generator, keys: PartitionKeys, k: int, *, overlap_ratio: float) -> ShardPlan:
    """category_overlap: a shared pool of ~ratio·N examples drawn from the whole data (stratified by
    category), the rest split by category as in `category`, then each client adds a sample of the pool
    so that ~ratio of its shard is pool data: mostly one category, plus a little of everything.

    The reference's exact semantics are not known to us; this is category + overlap composed the way
    `overlap` composes iid with the pool. ratio 0 is exactly `category`.
    """
    if keys.categories is None:
        raise ValueError("mode 'category_overlap' needs `categories`")
    items, categories, ratio = keys.items, keys.categories, overlap_ratio
    _, cat_codes = codes_of(categories)
    p = pool_size(len(items), k, ratio)
    pool = stratified_pick(rng, items, cat_codes, p)
    rest = np.setdiff1d(items, pool, assume_unique=True) if p else items
    base = category.split_items(rng, rest, categories, keys.strata, k)
    if p == 0:
        return ShardPlan(
            base.clients,
            base.notes,
            {**base.params, "overlap_ratio": ratio, "pool_size": 0},
            base.client_categories,
        )
    clients, notes, params = add_overlap(rng, base.clients, pool, cat_codes[pool], ratio)
    return ShardPlan(clients, base.notes + notes, {**base.params, **params}, base.client_categories)
