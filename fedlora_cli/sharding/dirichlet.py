"""dirichlet: label skew, as in FL papers and Flower's DirichletPartitioner."""

from __future__ import annotations

import numpy as np

from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import (
    codes_of,
    cut_sizes,
    deal_counts,
    grouped_order,
    redraw_note,
    redraw_sizes,
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
    """dirichlet (label skew): for each label, the shares of the K clients are drawn from Dir(alpha·1_K)
    and that label's shuffled examples are cut accordingly. The whole draw is repeated until every client
    has >= min_size examples, at most `max_redraws` times. Smaller alpha: more skew (alpha -> inf
    approaches iid). For regression the score bins stand in for labels."""
    alpha = dirichlet_alpha
    _, groups = codes_of(keys.label_groups)
    n_g = np.bincount(groups)
    order = grouped_order(rng, groups)

    def draw() -> np.ndarray:
        p = np.nan_to_num(rng.dirichlet(np.full(k, alpha), size=len(n_g)))
        return cut_sizes(p, n_g)

    counts, redraws = redraw_sizes(draw, k, min_size, max_redraws, "dirichlet", alpha)
    clients = deal_counts(keys.items, order, counts)
    params = {
        "dirichlet_alpha": alpha,
        "min_size": min_size,
        "max_redraws": max_redraws,
        "redraws": redraws,
        "labels": len(n_g),
    }
    return ShardPlan(clients, redraw_note(redraws, min_size), params)
