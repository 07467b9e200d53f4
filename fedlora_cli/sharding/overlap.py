"""overlap: a disjoint iid split plus a stratified pool of examples that clients share."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding import iid
from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import add_overlap, deal_round_robin, pool_size, stratified_pick


def split(rng: np.random.Generator, keys: PartitionKeys, k: int, *, overlap_ratio: float) -> ShardPlan:
    """overlap: a stratified shared pool of ~ratio·N examples; the rest split iid (disjoint); each client
    adds a stratified sample of the pool so that ~ratio of its shard comes from it.

    fedlora's semantics (the reference's differs): the unique parts are truly disjoint — the reference
    draws its "shared" part from the whole set, so unique parts leak into other clients — and there is
    no rejection sampling. Pool examples may be in several clients, or none. ratio 0 is exactly iid.
    """
    items, codes, ratio = keys.items, keys.strata, overlap_ratio
    p = pool_size(len(items), k, ratio)
    if p == 0:
        plan = iid.split(rng, keys, k)
        return ShardPlan(plan.clients, [], {**plan.params, "overlap_ratio": ratio, "pool_size": 0})
    pool = stratified_pick(rng, items, codes, p)
    rest = np.setdiff1d(items, pool, assume_unique=True)
    parts = deal_round_robin(rng, rest, codes[rest], k)
    clients, notes, params = add_overlap(rng, parts, pool, codes[pool], ratio)
    return ShardPlan(clients, notes, {"strata": int(codes.max()) + 1, **params})
