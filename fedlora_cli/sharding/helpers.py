"""The pieces the partitioners share: stratified dealing, size cutting, the shared pool, bounded redraws.

All vectorised numpy; the ones that take an `rng` consume it in a fixed order (the plans depend on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedlora_cli.errors import InputError


def codes_of(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes 0..G-1 for arbitrary keys, and the key of each code (sorted)."""
    uniques, codes = np.unique(np.asarray(keys), return_inverse=True)
    return uniques, codes.reshape(-1).astype(np.int64)


def grouped_order(rng: np.random.Generator, codes: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 grouped by code (ascending), in random order within each group."""
    perm = rng.permutation(len(codes))
    return perm[np.argsort(codes[perm], kind="stable")]


def split_by_owner(items: np.ndarray, owner: np.ndarray, k: int) -> list[np.ndarray]:
    """Group `items` by their owner 0..k-1; each part sorted."""
    order = np.argsort(owner, kind="stable")
    parts = np.split(items[order], np.cumsum(np.bincount(owner, minlength=k))[:-1])
    return [np.sort(p).astype(np.int64) for p in parts]


def deal_round_robin(
    rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, k: int
) -> list[np.ndarray]:
    """iid core: deal the stratum-grouped, shuffled items to clients 0..k-1, 0..k-1, … from a random start.

    Dealing continues across strata (the offset rotates), so each client gets the floor or ceil of
    every stratum's share and client sizes differ by at most one overall.
    """
    order = grouped_order(rng, codes)
    owner = (np.arange(len(items)) + int(rng.integers(k))) % k
    return split_by_owner(items[order], owner, k)


def stratified_counts(rng: np.random.Generator, n_g: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Counts c[g, k] with row sums n_g, column sums `sizes`, each the floor or ceil of n_g·s_k/N.

    Start from the floors (exact integer arithmetic). What is left is a 0/1 matrix with known row and
    column sums that may hold a 1 only where the share has a fractional part; the fractional parts
    themselves are a fractional solution, so an integral one exists and a maximum flow finds it
    (rows -> allowed cells -> columns). Columns are visited in a random order, so which clients get
    the extra examples is drawn by the seed, not by their numbers.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    n = int(n_g.sum())
    groups, k = len(n_g), len(sizes)
    exact = np.outer(n_g, sizes)
    counts, remainder = exact // n, exact % n
    row_left = n_g - counts.sum(axis=1)
    col_left = sizes - counts.sum(axis=0)
    if row_left.any():
        perm = rng.permutation(k)
        rows, cols = np.nonzero(remainder[:, perm] > 0)
        sink = groups + k + 1  # nodes: 0 source, 1..G strata, G+1..G+K clients (permuted), sink
        src = np.concatenate([np.zeros(groups, dtype=np.int64), 1 + rows, groups + 1 + np.arange(k)])
        dst = np.concatenate([1 + np.arange(groups), groups + 1 + cols, np.full(k, sink)])
        cap = np.concatenate([row_left, np.ones(len(rows), dtype=np.int64), col_left[perm]]).astype(np.int32)
        graph = csr_matrix((cap, (src, dst)), shape=(sink + 1, sink + 1))
        flow = maximum_flow(graph, 0, sink).flow
        extra = flow[1 : groups + 1, groups + 1 : groups + k + 1].toarray() > 0
        counts[:, perm] += extra
    if (counts.sum(axis=0) != sizes).any() or (counts.sum(axis=1) != n_g).any():  # a bug, not bad input
        raise AssertionError("stratified allocation failed")
    return counts


def deal_counts(items: np.ndarray, order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Hand each group's items (contiguous in `order`) to clients 0, 1, … by the G x K `counts`."""
    k = counts.shape[1]
    owner = np.repeat(np.tile(np.arange(k), counts.shape[0]), counts.ravel())
    return split_by_owner(items[order], owner, k)


def stratified_pick(rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, m: int) -> np.ndarray:
    """m distinct items, each stratum getting the floor or ceil of its share (systematic sampling)."""
    n = len(items)
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    if m >= n:
        return np.sort(items)
    order = grouped_order(rng, codes)
    positions = np.floor((np.arange(m) + rng.random()) * (n / m)).astype(np.int64)
    return np.sort(items[order[np.minimum(positions, n - 1)]])


def cut_sizes(p: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Integer sizes summing to n from proportions p (last axis), by flooring the cumulative sums.

    `n` is one total, or one per row of a 2-d `p`.
    """
    n = np.asarray(n, dtype=np.int64)
    cuts = np.floor(np.cumsum(p, axis=-1) * n[..., None]).astype(np.int64)
    cuts[..., -1] = n  # the float sum may end at 0.9999…: the last cut is always the total
    cuts = np.minimum(cuts, n[..., None])
    return np.diff(cuts, prepend=0, axis=-1)


def client_list(ids: Sequence[int]) -> str:
    """'clients 3, 4, 5' or 'clients 3-52' (1-based)."""
    ids = [i + 1 for i in ids]
    if len(ids) > 4 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"clients {ids[0]}-{ids[-1]}"
    return "clients " + ", ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------------
# the shared pool of the overlap modes


def pool_size(n: int, k: int, ratio: float) -> int:
    # The disjoint part must still give every client at least one example of its own.
    return max(0, min(round(ratio * n), n - k))


def add_overlap(
    rng: np.random.Generator, parts: list[np.ndarray], pool: np.ndarray, pool_codes: np.ndarray, ratio: float
) -> tuple[list[np.ndarray], list[str], dict[str, Any]]:
    """Each client adds a stratified sample of the shared pool so that ~ratio of its shard is pool data."""
    clients, draws = [], []
    for part in parts:
        m = min(len(pool), round(ratio * len(part) / (1.0 - ratio)))
        pick = stratified_pick(rng, pool, pool_codes, m)
        draws.append(pick)
        clients.append(np.sort(np.concatenate([part, pick])))
    drawn = np.concatenate(draws) if draws else np.empty(0, dtype=np.int64)
    uses = np.bincount(np.searchsorted(pool, drawn), minlength=len(pool)) if len(pool) else np.zeros(0)
    shared, unused = int((uses >= 2).sum()), int((uses == 0).sum())
    per_client = [len(d) for d in draws]
    lo, hi = min(per_client), max(per_client)
    each = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    note = (
        f"shared pool of {len(pool):,} examples; each client draws {each} from it; "
        f"{shared:,} pool examples are in 2+ clients, {unused:,} in none"
    )
    params = {"overlap_ratio": ratio, "pool_size": len(pool), "pool_draws": per_client}
    return clients, [note], params


# ---------------------------------------------------------------------------------------------------
# bounded redraws of the Dirichlet modes


def redraw_sizes(
    draw: Callable[[], np.ndarray], k: int, min_size: int, max_redraws: int, mode: str, alpha: float
) -> tuple[np.ndarray, int]:
    """Call `draw()` (-> counts, G x K or K) until every client has >= min_size; bounded, then InputError."""
    for attempt in range(max_redraws + 1):
        counts = draw()
        sizes = counts.sum(axis=0) if counts.ndim == 2 else counts
        if sizes.min() >= min_size:
            return counts, attempt
    raise InputError(
        f"{mode} split with --dirichlet-alpha {alpha:g} left a client with fewer than {min_size} example(s) "
        f"in {max_redraws + 1} draws: raise --dirichlet-alpha, lower --min-size or use fewer clients "
        f"(--clients {k})"
    )


def redraw_note(redraws: int, min_size: int) -> list[str]:
    return [f"{redraws} redraw(s) needed to give every client >= {min_size} example(s)"] if redraws else []
