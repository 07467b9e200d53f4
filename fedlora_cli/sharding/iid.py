"""iid: the reference's stratified split; every client's label mix is the global one."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import deal_round_robin


def split(rng: np.random.Generator, keys: PartitionKeys, k: int) -> ShardPlan:
    """iid (stratified, the reference's): every client gets floor or ceil of each stratum's share.

    Strata are shuffled internally and dealt round-robin from a rotating offset, so every client's
    label distribution is the global one to within one example per stratum, and sizes differ by <= 1.
    """
    clients = deal_round_robin(rng, keys.items, keys.strata, k)
    return ShardPlan(clients, [], {"strata": int(keys.strata.max(initial=-1)) + 1})
