"""quantity: size skew; every client keeps the global label mix."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import (
    cut_sizes,
    deal_counts,
    grouped_order,
    redraw_note,
    redraw_sizes,
    stratified_counts,
)


def split(
    rng: np.random.Generator,
    keys: PartitionKeys,
    k: int,
    *,
    dirichlet_alpha: float,
    min_size: int,
    max_redraws: int,
) -> ShardPlan:
    """quantity (quantity skew): client sizes are Dir(alpha·1_K)·N (redrawn, bounded, until each is
    >= min_size); each client gets the floor or ceil of its size's share of every stratum, so label
    mixes stay the global one."""
    alpha, items, codes = dirichlet_alpha, keys.items, keys.strata
    n = len(items)

    def draw() -> np.ndarray:
        return cut_sizes(np.nan_to_num(rng.dirichlet(np.full(k, alpha))), n)

    sizes, redraws = redraw_sizes(draw, k, min_size, max_redraws, "quantity", alpha)
    n_g = np.bincount(codes)
    clients = deal_counts(items, grouped_order(rng, codes), stratified_counts(rng, n_g, sizes))
    params = {
        "dirichlet_alpha": alpha,
        "min_size": min_size,
        "max_redraws": max_redraws,
        "redraws": redraws,
        "strata": int(codes.max()) + 1,
    }
    return ShardPlan(clients, redraw_note(redraws, min_size), params)
