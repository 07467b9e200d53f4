"""Split a task's training set across K clients, and read/write the reference's shard manifests.

No torch, no typer: partitioners are pure functions of a label array and a seed. Every mode owns one
`np.random.default_rng(seed)` and consumes it in a fixed order, so a seed always gives the same plan.
The on-disk format is the reference's (`client_<i>.json` = {"dataset", "indices"}, i from 1, plus
`summary.json`); fedlora adds its own keys to summary.json beside the reference's.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_cli import __version__, ownership
from fedlora_cli.atomic import staged_dir, write_bytes
from fedlora_cli.config import SHARD_MODES, ShardConfig
from fedlora_cli.data import RawSplit, load_split
from fedlora_cli.errors import InputError
from fedlora_cli.ownership import CLIENT_FILE, SUMMARY_FILE
from fedlora_cli.tasks import get_task

STSB_BIN_WIDTH = 0.2  # the reference's score bin for STS-B stratification
MAX_INDEX = 2**62  # far beyond any dataset; larger "indices" are corrupt, and would overflow int64
OVERLAP_MODES = ("overlap", "category_overlap")
CATEGORY_MODES = ("category", "category_overlap")
MAX_LISTED_CATEGORIES = 100  # beyond this, summary.json does not list each client's categories


@dataclass(frozen=True)
class ShardPlan:
    """K index arrays into the train split (client 1..K), what happened, and the parameters used."""

    clients: list[np.ndarray]  # sorted int64 index arrays, client 1..K
    notes: list[str] = field(default_factory=list)  # e.g. "category 'positive' split across clients 3, 4, 5"
    params: dict[str, Any] = field(default_factory=dict)  # the mode's parameters actually used
    client_categories: list[list[str]] | None = None  # category modes: the categories each client holds

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


# ---------------------------------------------------------------------------------------------------
# keys: what to stratify by, what a category is


def bin_scores(scores: np.ndarray, width: float = STSB_BIN_WIDTH) -> np.ndarray:
    """The reference's STS-B bins: floor(score / width), so [0, 0.2) -> 0, [0.2, 0.4) -> 1, …

    Rounded before the floor: 0.6 / 0.2 is 2.9999999999999996 in floating point, and the reference's
    plain floor puts such scores one bin too low.
    """
    return np.floor(np.round(np.asarray(scores, dtype=np.float64) / width, 9)).astype(np.int64)


def stratification_keys(task: str, raw: RawSplit, bin_stsb: bool = True) -> np.ndarray:
    """Per-example stratum, as the reference's iid mode: the label; MNLI label|genre when the split has a
    genre column; STS-B 0.2-wide score bins (or the raw scores with `bin_stsb=False`)."""
    glue = get_task(task)
    labels = raw.labels
    if glue.is_regression:
        return bin_scores(labels) if bin_stsb else labels
    if glue.name == "mnli" and "genre" in raw.columns:
        _, genre = np.unique(np.asarray(raw.columns["genre"], dtype=object), return_inverse=True)
        return labels * (int(genre.max()) + 1) + genre.reshape(-1)
    return labels


def category_values(raw: RawSplit, key: str, *, bin_stsb: bool = True) -> np.ndarray:
    """The category of each example for the category modes, as strings (they name clients in notes).

    `label` gives label names (STS-B: score bins like "3.2-3.4", or raw scores without binning); any
    other column of the train split is taken as it is. `labels` is accepted, as the reference does.
    """
    glue = get_task(raw.task)
    if key in ("label", "labels"):
        if not glue.is_regression:
            return np.asarray(glue.label_names, dtype=object)[raw.labels]
        if not bin_stsb:
            return np.asarray([f"{s:g}" for s in raw.labels], dtype=object)
        bins = bin_scores(raw.labels)
        names = {
            b: f"{b * STSB_BIN_WIDTH:.1f}-{(b + 1) * STSB_BIN_WIDTH:.1f}" for b in np.unique(bins).tolist()
        }
        return np.asarray([names[b] for b in bins.tolist()], dtype=object)
    if key not in raw.columns:
        raise InputError(
            f"unknown --category-key {key!r} for {glue.name}: the train split has columns "
            f"{', '.join(raw.columns)}"
        )
    return np.asarray([str(v) for v in raw.columns[key]], dtype=object)


# ---------------------------------------------------------------------------------------------------
# small vectorised helpers


def _codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes 0..G-1 for arbitrary keys, and the key of each code (sorted)."""
    uniques, codes = np.unique(np.asarray(keys), return_inverse=True)
    return uniques, codes.reshape(-1).astype(np.int64)


def _grouped_order(rng: np.random.Generator, codes: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 grouped by code (ascending), in random order within each group."""
    perm = rng.permutation(len(codes))
    return perm[np.argsort(codes[perm], kind="stable")]


def _split_by_owner(items: np.ndarray, owner: np.ndarray, k: int) -> list[np.ndarray]:
    """Group `items` by their owner 0..k-1; each part sorted."""
    order = np.argsort(owner, kind="stable")
    parts = np.split(items[order], np.cumsum(np.bincount(owner, minlength=k))[:-1])
    return [np.sort(p).astype(np.int64) for p in parts]


def _deal_round_robin(
    rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, k: int
) -> list[np.ndarray]:
    """iid core: deal the stratum-grouped, shuffled items to clients 0..k-1, 0..k-1, … from a random start.

    Dealing continues across strata (the offset rotates), so each client gets the floor or ceil of
    every stratum's share and client sizes differ by at most one overall.
    """
    order = _grouped_order(rng, codes)
    owner = (np.arange(len(items)) + int(rng.integers(k))) % k
    return _split_by_owner(items[order], owner, k)


def _stratified_counts(rng: np.random.Generator, n_g: np.ndarray, sizes: np.ndarray) -> np.ndarray:
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


def _deal_counts(items: np.ndarray, order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Hand each group's items (contiguous in `order`) to clients 0, 1, … by the G x K `counts`."""
    k = counts.shape[1]
    owner = np.repeat(np.tile(np.arange(k), counts.shape[0]), counts.ravel())
    return _split_by_owner(items[order], owner, k)


def _stratified_pick(rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, m: int) -> np.ndarray:
    """m distinct items, each stratum getting the floor or ceil of its share (systematic sampling)."""
    n = len(items)
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    if m >= n:
        return np.sort(items)
    order = _grouped_order(rng, codes)
    positions = np.floor((np.arange(m) + rng.random()) * (n / m)).astype(np.int64)
    return np.sort(items[order[np.minimum(positions, n - 1)]])


def _cut_sizes(p: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Integer sizes summing to n from proportions p (last axis), by flooring the cumulative sums.

    `n` is one total, or one per row of a 2-d `p`.
    """
    n = np.asarray(n, dtype=np.int64)
    cuts = np.floor(np.cumsum(p, axis=-1) * n[..., None]).astype(np.int64)
    cuts[..., -1] = n  # the float sum may end at 0.9999…: the last cut is always the total
    cuts = np.minimum(cuts, n[..., None])
    return np.diff(cuts, prepend=0, axis=-1)


def _client_list(ids: Sequence[int]) -> str:
    """'clients 3, 4, 5' or 'clients 3-52' (1-based)."""
    ids = [i + 1 for i in ids]
    if len(ids) > 4 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"clients {ids[0]}-{ids[-1]}"
    return "clients " + ", ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------------
# the partitioners


def make_client_splits(
    labels: np.ndarray,
    clients: int,
    mode: str,
    seed: int,
    *,
    categories: np.ndarray | None = None,
    strata: np.ndarray | None = None,
    overlap_ratio: float = 0.1,
    dirichlet_alpha: float = 0.5,
    min_size: int = 1,
    max_redraws: int = 100,
) -> ShardPlan:
    """Split examples 0..N-1 across `clients` clients; see the `_mode_*` functions for each mode.

    `labels`: class ids, or scores for regression. `strata`: what iid-style splits balance (default:
    the labels; 0.2-wide bins of scores). `categories`: per-example category for the category modes.
    Raises InputError when the split cannot be made (more clients than examples, `min_size` unmet).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if mode not in SHARD_MODES:
        raise InputError(f"unknown sharding mode {mode!r}: choose one of {', '.join(SHARD_MODES)}")
    if clients < 1:
        raise InputError(f"--clients must be >= 1, got {clients}")
    if clients > n:
        raise InputError(
            f"--clients {clients} is more than the {n:,} training examples: every client needs at least "
            f"one; use at most {n:,} clients"
        )
    if clients * min_size > n:
        raise InputError(
            f"{clients} clients with --min-size {min_size} need {clients * min_size:,} examples but there "
            f"are {n:,}: lower --min-size or use fewer clients"
        )
    if not 0.0 <= overlap_ratio < 1.0:
        raise InputError(f"--overlap-ratio must be in [0, 1), got {overlap_ratio}")
    if dirichlet_alpha <= 0:
        raise InputError(f"--dirichlet-alpha must be > 0, got {dirichlet_alpha}")
    if strata is None:
        strata = labels if labels.dtype.kind in "iub" else bin_scores(labels)
    _, strata_codes = _codes(strata)
    if mode in CATEGORY_MODES and categories is None:
        raise ValueError(f"mode {mode!r} needs `categories`")

    rng = np.random.default_rng(seed)
    items = np.arange(n, dtype=np.int64)
    if mode == "iid":
        plan = _mode_iid(rng, items, strata_codes, clients)
    elif mode == "overlap":
        plan = _mode_overlap(rng, items, strata_codes, clients, overlap_ratio)
    elif mode == "category":
        plan = _mode_category(rng, items, np.asarray(categories), strata_codes, clients)
    elif mode == "category_overlap":
        plan = _mode_category_overlap(
            rng, items, np.asarray(categories), strata_codes, clients, overlap_ratio
        )
    else:
        # Label skew is skew over the labels; for regression the stratum (score bin) stands in for one.
        groups = labels if labels.dtype.kind in "iub" else strata
        _, group_codes = _codes(groups)
        if mode == "dirichlet":
            plan = _mode_dirichlet(rng, items, group_codes, clients, dirichlet_alpha, min_size, max_redraws)
        else:
            plan = _mode_quantity(rng, items, strata_codes, clients, dirichlet_alpha, min_size, max_redraws)

    sizes = plan.sizes
    small = int(np.argmin(sizes))
    if sizes[small] < min_size:
        raise InputError(
            f"{mode} split leaves client {small + 1} with {sizes[small]:,} example(s), fewer than "
            f"--min-size {min_size}: use fewer clients or lower --min-size"
        )
    return plan


def _mode_iid(rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, k: int) -> ShardPlan:
    """iid (stratified, the reference's): every client gets floor or ceil of each stratum's share.

    Strata are shuffled internally and dealt round-robin from a rotating offset, so every client's
    label distribution is the global one to within one example per stratum, and sizes differ by <= 1.
    """
    clients = _deal_round_robin(rng, items, codes, k)
    return ShardPlan(clients, [], {"strata": int(codes.max(initial=-1)) + 1})


def _pool_size(n: int, k: int, ratio: float) -> int:
    # The disjoint part must still give every client at least one example of its own.
    return max(0, min(round(ratio * n), n - k))


def _add_overlap(
    rng: np.random.Generator, parts: list[np.ndarray], pool: np.ndarray, pool_codes: np.ndarray, ratio: float
) -> tuple[list[np.ndarray], list[str], dict[str, Any]]:
    """Each client adds a stratified sample of the shared pool so that ~ratio of its shard is pool data."""
    clients, draws = [], []
    for part in parts:
        m = min(len(pool), round(ratio * len(part) / (1.0 - ratio)))
        pick = _stratified_pick(rng, pool, pool_codes, m)
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


def _mode_overlap(
    rng: np.random.Generator, items: np.ndarray, codes: np.ndarray, k: int, ratio: float
) -> ShardPlan:
    """overlap: a stratified shared pool of ~ratio·N examples; the rest split iid (disjoint); each client
    adds a stratified sample of the pool so that ~ratio of its shard comes from it.

    fedlora's semantics (the reference's differs): the unique parts are truly disjoint — the reference
    draws its "shared" part from the whole set, so unique parts leak into other clients — and there is
    no rejection sampling. Pool examples may be in several clients, or none. ratio 0 is exactly iid.
    """
    p = _pool_size(len(items), k, ratio)
    if p == 0:
        plan = _mode_iid(rng, items, codes, k)
        return ShardPlan(plan.clients, [], {**plan.params, "overlap_ratio": ratio, "pool_size": 0})
    pool = _stratified_pick(rng, items, codes, p)
    rest = np.setdiff1d(items, pool, assume_unique=True)
    parts = _deal_round_robin(rng, rest, codes[rest], k)
    clients, notes, params = _add_overlap(rng, parts, pool, codes[pool], ratio)
    return ShardPlan(clients, notes, {"strata": int(codes.max()) + 1, **params})


def _allocate_clients(sizes: np.ndarray, k: int) -> np.ndarray:
    """Clients per category: proportional to size, >= 1 each, <= the category's size; largest remainder."""
    quota = sizes * (k / sizes.sum())
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, sizes)
    while alloc.sum() < k:  # at most ~#categories rounds: floors lose < 1 each
        room = np.where(alloc < sizes, quota - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > k:  # the >= 1 floor over-allocated: take from the most over-served
        over = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    return alloc


def _mode_category(
    rng: np.random.Generator, items: np.ndarray, categories: np.ndarray, strata: np.ndarray, k: int
) -> ShardPlan:
    """category: whole categories per client.

    K <= #categories: categories go largest first to the client with the fewest examples so far (ties
    broken at random), then client numbers are shuffled — sizes as even as whole categories allow.
    K > #categories: the reference leaves K - #categories clients empty; fedlora gives each category a
    number of clients proportional to its size (>= 1 each, largest remainder) and splits it iid among
    them, so every client still sees exactly one category, and says so in the notes.
    """
    names, cat = _codes(categories[items])
    counts = np.bincount(cat, minlength=len(names))
    c = len(names)
    notes: list[str] = []
    if k <= c:
        order = np.lexsort((rng.random(c), -counts))  # largest first, random among equal sizes
        heap = [(0, j) for j in range(k)]
        owner_of_cat = np.empty(c, dtype=np.int64)
        for cat_id in order.tolist():
            load, j = heapq.heappop(heap)
            owner_of_cat[cat_id] = j
            heapq.heappush(heap, (load + int(counts[cat_id]), j))
        relabel = rng.permutation(k)  # which client number gets which bundle is up to the seed
        owner = relabel[owner_of_cat[cat]]
        clients = _split_by_owner(items, owner, k)
        params: dict[str, Any] = {"categories": c}
        if c > MAX_LISTED_CATEGORIES:
            # e.g. --category-key sentence: thousands of one-example categories; lists would swamp summary.json
            notes.append(f"{c:,} categories: which client holds which is not listed")
            return ShardPlan(clients, notes, params, None)
        held: list[list[str]] = [[] for _ in range(k)]
        for cat_id in range(c):
            held[int(relabel[owner_of_cat[cat_id]])].append(str(names[cat_id]))
        params["clients_per_category"] = dict.fromkeys(map(str, names), 1)
        return ShardPlan(clients, notes, params, held)

    alloc = _allocate_clients(counts, k)
    notes.append(
        f"{k} clients but {c} categories: categories are split across several clients "
        f"(each client still sees one category)"
    )
    clients = [np.empty(0, dtype=np.int64)] * k
    held = [[] for _ in range(k)]
    first = 0
    for cat_id in rng.permutation(c).tolist():  # which category gets the low client numbers: the seed's
        members = items[cat == cat_id]
        a = int(alloc[cat_id])
        ids = list(range(first, first + a))
        for j, part in zip(ids, _deal_round_robin(rng, members, strata[members], a), strict=True):
            clients[j] = part
            held[j] = [str(names[cat_id])]
        if a > 1:
            notes.append(
                f"category {str(names[cat_id])!r} ({len(members):,} examples) split across {_client_list(ids)}"
            )
        first += a
    params = {"categories": c, "clients_per_category": {str(names[i]): int(alloc[i]) for i in range(c)}}
    return ShardPlan(clients, notes, params, held)


def _mode_category_overlap(
    rng: np.random.Generator,
    items: np.ndarray,
    categories: np.ndarray,
    strata: np.ndarray,
    k: int,
    ratio: float,
) -> ShardPlan:
    """category_overlap: a shared pool of ~ratio·N examples drawn from the whole data (stratified by
    category), the rest split by category as in `category`, then each client adds a sample of the pool
    so that ~ratio of its shard is pool data: mostly one category, plus a little of everything.

    The reference's exact semantics are not known to us; this is category + overlap composed the way
    `overlap` composes iid with the pool. ratio 0 is exactly `category`.
    """
    _, cat_codes = _codes(categories)
    p = _pool_size(len(items), k, ratio)
    pool = _stratified_pick(rng, items, cat_codes, p)
    rest = np.setdiff1d(items, pool, assume_unique=True) if p else items
    base = _mode_category(rng, rest, categories, strata, k)
    if p == 0:
        return ShardPlan(
            base.clients,
            base.notes,
            {**base.params, "overlap_ratio": ratio, "pool_size": 0},
            base.client_categories,
        )
    clients, notes, params = _add_overlap(rng, base.clients, pool, cat_codes[pool], ratio)
    return ShardPlan(clients, base.notes + notes, {**base.params, **params}, base.client_categories)


def _redraw_sizes(
    draw: Any, k: int, min_size: int, max_redraws: int, mode: str, alpha: float
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


def _mode_dirichlet(
    rng: np.random.Generator,
    items: np.ndarray,
    groups: np.ndarray,
    k: int,
    alpha: float,
    min_size: int,
    max_redraws: int,
) -> ShardPlan:
    """dirichlet (label skew, as in FL papers and Flower's DirichletPartitioner): for each label, the
    shares of the K clients are drawn from Dir(alpha·1_K) and that label's shuffled examples are cut
    accordingly. The whole draw is repeated until every client has >= min_size examples, at most
    `max_redraws` times. Smaller alpha: more skew (alpha -> inf approaches iid)."""
    n_g = np.bincount(groups)
    order = _grouped_order(rng, groups)

    def draw() -> np.ndarray:
        p = np.nan_to_num(rng.dirichlet(np.full(k, alpha), size=len(n_g)))
        return _cut_sizes(p, n_g)

    counts, redraws = _redraw_sizes(draw, k, min_size, max_redraws, "dirichlet", alpha)
    clients = _deal_counts(items, order, counts)
    params = {"dirichlet_alpha": alpha, "min_size": min_size, "max_redraws": max_redraws, "redraws": redraws,
              "labels": len(n_g)}  # fmt: skip
    notes = [f"{redraws} redraw(s) needed to give every client >= {min_size} example(s)"] if redraws else []
    return ShardPlan(clients, notes, params)


def _mode_quantity(
    rng: np.random.Generator,
    items: np.ndarray,
    codes: np.ndarray,
    k: int,
    alpha: float,
    min_size: int,
    max_redraws: int,
) -> ShardPlan:
    """quantity (quantity skew): client sizes are Dir(alpha·1_K)·N (redrawn, bounded, until each is
    >= min_size); each client gets the floor or ceil of its size's share of every stratum, so label
    mixes stay the global one."""
    n = len(items)

    def draw() -> np.ndarray:
        return _cut_sizes(np.nan_to_num(rng.dirichlet(np.full(k, alpha))), n)

    sizes, redraws = _redraw_sizes(draw, k, min_size, max_redraws, "quantity", alpha)
    n_g = np.bincount(codes)
    clients = _deal_counts(items, _grouped_order(rng, codes), _stratified_counts(rng, n_g, sizes))
    params = {"dirichlet_alpha": alpha, "min_size": min_size, "max_redraws": max_redraws, "redraws": redraws,
              "strata": int(codes.max()) + 1}  # fmt: skip
    notes = [f"{redraws} redraw(s) needed to give every client >= {min_size} example(s)"] if redraws else []
    return ShardPlan(clients, notes, params)


# ---------------------------------------------------------------------------------------------------
# manifests: the reference's format, read and written


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as federation reads it: one index array per client file, by client number."""

    directory: Path
    clients: list[np.ndarray]  # index arrays into the train split, in file order, by client number
    client_ids: list[int]  # the i of client_<i>.json, ascending numerically (client_10 after client_9)
    task: str | None  # the manifests' "dataset"
    summary: dict | None  # summary.json, if present
    fingerprint: str  # sha256 over (client id, indices): recorded in run records

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def _regular_file(path: Path, where: str) -> None:
    """A manifest must be a regular file (or a link to one): a folder, device, FIFO or dangling link is an
    error, never a silently dropped client (and a FIFO would block the read forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(f"{where} is a dangling symbolic link (its target {os.readlink(path)} does not "
                             f"exist): fix or remove it") from None  # fmt: skip
        raise InputError(f"{where}: no such file") from None
    except OSError as e:
        raise InputError(f"cannot read {where}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{where} is a folder, not a manifest file: remove or rename it")
    if not stat.S_ISREG(mode):
        raise InputError(f"{where} is not a regular file (a device, FIFO or socket): remove or rename it")


def _load_json(path: Path, where: str | None = None) -> Any:
    where = where or str(path)
    _regular_file(path, where)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where} is not valid JSON ({e.msg}, line {e.lineno}): re-run `fedlora shard`"
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start}): is it a shard manifest?") from None
    except OSError as e:
        raise InputError(f"cannot read {where}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Manifest:
    """One client's manifest, `client_<i>.json` = {"dataset": task, "indices": [...]}, checked."""

    path: Path
    dataset: str | None
    indices: np.ndarray  # int64, distinct, >= 0, in file order


def read_manifest(path: str | os.PathLike, *, option: str = "") -> Manifest:
    """The one reader of a client manifest (read_shards, merge --shard-manifests): every field's type and
    range is checked, so a wrong-typed file is one InputError, never a traceback or a wrong client."""
    path = Path(path).expanduser()
    where = f"{option} {path}" if option else str(path)
    data = _load_json(path, where)
    if not isinstance(data, dict) or "indices" not in data:
        raise InputError(
            f'{where} has no "indices": a shard manifest is {{"dataset": task, "indices": [...]}}'
        )
    dataset = data.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise InputError(
            f'{where}: "dataset" must be a task name, got {type(dataset).__name__} {dataset!r:.40}'
        )
    values = data["indices"]
    # bool is an int subclass, and numpy would quietly turn floats or huge ints into something else.
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        raise InputError(f'{where}: "indices" must be a list of integers')
    bad = next((v for v in values if not 0 <= v < MAX_INDEX), None)
    if bad is not None:
        kind = "a negative index" if bad < 0 else "an index out of range"
        raise InputError(f'{where}: "indices" holds {kind} ({bad})')
    arr = np.asarray(values, dtype=np.int64) if values else np.empty(0, dtype=np.int64)
    unique, counts = np.unique(arr, return_counts=True)
    if unique.size != arr.size:
        raise InputError(f'{where}: index {int(unique[counts > 1][0])} appears {int(counts.max())} times in '
                         f'"indices"; a client holds each example once: re-run `fedlora shard`')  # fmt: skip
    return Manifest(path, dataset, arr)


def shard_fingerprint(client_ids: Sequence[int], clients: Sequence[np.ndarray]) -> str:
    """sha256 over each client's number and its indices (little-endian int64), in client order."""
    h = hashlib.sha256(b"fedlora-shards-v1\n")
    for cid, idx in zip(client_ids, clients, strict=True):
        h.update(f"{cid}:{len(idx)}\n".encode())
        h.update(np.asarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()


def read_shards(directory: str | os.PathLike) -> ShardSet:
    """Read a shard folder written by `fedlora shard` or by the reference's `save_shard_manifests`."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise InputError(
            f"shard folder {directory} does not exist: run `fedlora shard --out {directory}` first"
        )
    found: dict[int, Path] = {}
    for entry in directory.iterdir():
        m = CLIENT_FILE.match(entry.name)
        if m:  # whatever it is: read_manifest refuses what is not a regular file
            cid = int(m.group(1))
            if cid in found:
                raise InputError(f"{directory} holds both {found[cid].name} and {entry.name}: keep one")
            found[cid] = entry
    if not found:
        raise InputError(f"no client_*.json in {directory}: run `fedlora shard` first")
    client_ids = sorted(found)  # numerically: client_10 after client_9
    clients, datasets = [], set()
    for cid in client_ids:
        manifest = read_manifest(found[cid])
        clients.append(manifest.indices)
        datasets.add(manifest.dataset)
    if len(datasets) > 1:
        names = ", ".join(sorted(map(str, datasets)))
        raise InputError(
            f"the manifests in {directory} are for different datasets ({names}): keep one task per folder"
        )
    summary = None
    summary_path = directory / SUMMARY_FILE
    if summary_path.exists() or summary_path.is_symlink():
        summary = _load_json(summary_path)
        if not isinstance(summary, dict):
            raise InputError(f"{summary_path} is not a JSON object: re-run `fedlora shard`")
        for key, types in (("task", str), ("total_train", int), ("size_per_client", list)):
            value = summary.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                raise InputError(f'{summary_path}: "{key}" has the wrong type ({type(value).__name__} '
                                 f"{value!r:.40}): re-run `fedlora shard`")  # fmt: skip
        recorded = summary.get("size_per_client")
        sizes = [len(c) for c in clients]
        if isinstance(recorded, list) and recorded != sizes:
            # The reference writes into an existing folder without clearing it: a rerun with fewer
            # clients leaves the old client files behind, and summary.json is the only witness.
            raise InputError(
                f"{directory}: summary.json lists {len(recorded)} client(s) of sizes that differ from the "
                f"{len(sizes)} client_*.json files (stale files from an earlier run?): re-shard into an "
                f"empty folder"
            )
    task = datasets.pop()
    if task is None and summary is not None:
        task = summary.get("task")
    return ShardSet(directory, clients, client_ids, task, summary, shard_fingerprint(client_ids, clients))


def validate_shards(
    shards: ShardSet, task: str, n_train: int, *, train_fingerprint: str | None = None
) -> None:
    """Check that `shards` fit the training set about to be used; InputError saying what to change."""
    task = get_task(task).name
    if shards.task is not None:
        try:
            theirs = get_task(shards.task).name
        except ValueError:
            theirs = shards.task
        if theirs != task:
            raise InputError(
                f"{shards.directory} holds shards of {theirs}, not {task}: pass --task {theirs} or "
                f"run `fedlora shard --task {task}`"
            )
    summary = shards.summary or {}
    made_for = summary.get("total_train")
    hint = (
        f"shard with the same data as now (`fedlora shard --task {task}` with the same --data-dir and "
        f"--max-train-samples)"
    )
    if isinstance(made_for, int) and made_for != n_train:
        fix = f"pass --max-train-samples {made_for}" if made_for < n_train else "use the full training set"
        raise InputError(
            f"{shards.directory} was made for {made_for:,} training examples but {task} has {n_train:,} "
            f"here: {fix} or {hint}"
        )
    for cid, idx in zip(shards.client_ids, shards.clients, strict=True):
        if idx.size and idx.max() >= n_train:
            raise InputError(
                f"client {cid} of {shards.directory} uses index {int(idx.max()):,} but the {task} training "
                f"set has {n_train:,} examples (indices 0..{n_train - 1:,}): {hint}"
            )
    empty = [cid for cid, idx in zip(shards.client_ids, shards.clients, strict=True) if idx.size == 0]
    if empty:
        raise InputError(
            f"client(s) {', '.join(map(str, empty))} of {shards.directory} have no examples (the reference's "
            f"category mode leaves clients empty when there are more clients than categories): re-shard "
            f"with `fedlora shard`, which never does"
        )
    recorded = summary.get("train_fingerprint")
    if train_fingerprint and isinstance(recorded, str) and recorded != train_fingerprint:
        raise InputError(
            f"{shards.directory} was made from different {task} training data (fingerprint "
            f"{recorded[:12]} vs {train_fingerprint[:12]} now): {hint}"
        )


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file, a fedlora shard folder without `overwrite`, and anything that is not fedlora's."""
    return ownership.claim(
        Path(out).expanduser().resolve(), ownership.SHARDS, overwrite=overwrite, option="--out"
    )


def _summary_text(summary: dict[str, Any]) -> str:
    """Indented JSON like the reference's, but each client's index list on one line, at the end."""
    head = json.dumps({k: v for k, v in summary.items() if k != "client_indices"}, indent=2, allow_nan=False)
    lists = ",\n".join("    " + json.dumps(c) for c in summary["client_indices"])
    return head[: -len("\n}")] + f',\n  "client_indices": [\n{lists}\n  ]\n}}\n'


def write_shards(
    out: str | os.PathLike,
    task: str,
    plan: ShardPlan,
    *,
    mode: str,
    total_train: int,
    meta: dict[str, Any] | None = None,
    summary_extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `client_<i>.json` (exactly the reference's) and `summary.json` (its keys + fedlora's).

    The folder is staged beside `out` and renamed into place, so a failure leaves nothing behind and
    `--overwrite` never mixes old and new client files (the reference's stale-file hazard); it only
    ever replaces a fedlora shard folder (ownership.SHARDS).
    """
    out = check_out_dir(out, overwrite)
    client_indices = [c.tolist() for c in plan.clients]
    summary: dict[str, Any] = {
        # the reference's keys, with the reference's meaning
        "task": task,
        "mode": mode,
        "total_train": int(total_train),
        "size_per_client": [len(c) for c in client_indices],
        "meta": meta or {"seed": None, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True},
        # fedlora's, beside them
        "fedlora_version": __version__,
        "params": plan.params,
        "notes": plan.notes,
    }
    if plan.client_categories is not None:
        summary["client_categories"] = plan.client_categories
    for key, value in (summary_extra or {}).items():
        if key in summary or key == "client_indices":
            raise ValueError(f"summary_extra may not override {key!r}")
        summary[key] = value
    summary["client_indices"] = client_indices
    with staged_dir(out, may_replace=ownership.may_replace(ownership.SHARDS, "--out")) as tmp:
        for i, idx in enumerate(client_indices, start=1):
            # compact, exactly what the reference's save_shard_manifests writes
            write_bytes(tmp / f"client_{i}.json", json.dumps({"dataset": task, "indices": idx}).encode())
        write_bytes(tmp / SUMMARY_FILE, _summary_text(summary).encode())
    return out


# ---------------------------------------------------------------------------------------------------
# the one core call of `fedlora shard`


@dataclass(frozen=True)
class ShardResult:
    """What `run_shard` did: per-client sizes and label mixes, timing, and where it wrote."""

    out: Path
    task: str
    mode: str
    total_train: int
    sizes: list[int]
    label_counts: list[dict[str, Any]]  # per client {label: count}; STS-B {min, max, mean, histogram}
    notes: list[str]
    params: dict[str, Any]
    client_categories: list[list[str]] | None
    is_regression: bool
    train_fingerprint: str
    data_source: str
    seconds: float  # the partitioning itself
    load_seconds: float  # reading the train split
    write_seconds: float  # manifests (and plot)
    plot: Path | None = None

    @property
    def clients(self) -> int:
        return len(self.sizes)


def label_counts(task: str, labels: np.ndarray, clients: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Per client: {label name: count}; for regression the score range and a 1-point-wide histogram."""
    glue = get_task(task)
    out: list[dict[str, Any]] = []
    for idx in clients:
        values = labels[idx]
        if not glue.is_regression:
            counts = np.bincount(values, minlength=glue.num_labels)
            out.append({name: int(counts[i]) for i, name in enumerate(glue.label_names)})
            continue
        hist = np.bincount(np.clip(np.floor(values).astype(np.int64), 0, 4), minlength=5)
        out.append(
            {
                "min": round(float(values.min()), 4) if values.size else None,
                "max": round(float(values.max()), 4) if values.size else None,
                "mean": round(float(values.mean()), 4) if values.size else None,
                "histogram": {f"{i}-{i + 1}": int(hist[i]) for i in range(5)},
            }
        )
    return out


def run_shard(config: ShardConfig, progress: Any = None) -> ShardResult:
    """Load the train split's labels, split them, write the manifests (and the plot): `fedlora shard`."""
    from fedlora_cli.progress import NullProgress

    progress = progress or NullProgress()
    out = check_out_dir(config.out_dir, config.overwrite)  # fail before reading any data
    plot_path = None
    if config.plot:
        from fedlora_cli.plots import require_matplotlib

        require_matplotlib()
        plot_path = ownership.claim(
            Path(config.plot).expanduser().resolve(),
            ownership.PLOT,
            overwrite=config.overwrite,
            option="--plot",
        )
    glue = get_task(config.task)

    t0 = time.perf_counter()
    raw = load_split(
        glue,
        "train",
        data_dir=config.data_dir,
        cache_dir=config.cache_dir,
        max_samples=config.max_train_samples,
    )
    labels = raw.labels
    strata = stratification_keys(glue.name, raw, config.bin_stsb)
    categories = None
    if config.mode in CATEGORY_MODES:
        categories = category_values(raw, config.category_key, bin_stsb=config.bin_stsb)
    load_seconds = time.perf_counter() - t0
    progress.log(f"{glue.name}: {len(raw):,} training examples from {raw.source}")

    t1 = time.perf_counter()
    plan = make_client_splits(
        labels,
        config.clients,
        config.mode,
        config.seed,
        categories=categories,
        strata=strata,
        overlap_ratio=config.overlap_ratio,
        dirichlet_alpha=config.dirichlet_alpha,
        min_size=config.min_size,
    )
    seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    counts = label_counts(glue.name, labels, plan.clients)
    uses_overlap, uses_category = config.mode in OVERLAP_MODES, config.mode in CATEGORY_MODES
    meta = {
        "seed": config.seed,
        "overlap_ratio": config.overlap_ratio if uses_overlap else 0.0,
        "category_key": config.category_key if uses_category else None,
        "bin_stsb": config.bin_stsb,
    }
    params = {"seed": config.seed, "clients": config.clients, "bin_stsb": config.bin_stsb, **plan.params}
    if uses_category:
        params["category_key"] = config.category_key
    if config.max_train_samples is not None:
        params["max_train_samples"] = config.max_train_samples
    fingerprint = raw.fingerprint()
    plan = ShardPlan(plan.clients, plan.notes, params, plan.client_categories)
    write_shards(
        out,
        glue.name,
        plan,
        mode=config.mode,
        total_train=len(raw),
        meta=meta,
        summary_extra={
            "label_counts": counts,
            "train_fingerprint": fingerprint,
            "data_source": raw.source,
            # a plot drawn into the shard folder is part of it (ownership.shards_foreign)
            **({"plot": plot_path.name} if plot_path is not None and plot_path.parent == out else {}),
        },
        overwrite=config.overwrite,
    )
    result = ShardResult(
        out=out,
        task=glue.name,
        mode=config.mode,
        total_train=len(raw),
        sizes=plan.sizes,
        label_counts=counts,
        notes=plan.notes,
        params=params,
        client_categories=plan.client_categories,
        is_regression=glue.is_regression,
        train_fingerprint=fingerprint,
        data_source=raw.source,
        seconds=seconds,
        load_seconds=load_seconds,
        write_seconds=0.0,
    )
    plot = None
    if config.plot:
        from fedlora_cli.plots import plot_label_distribution

        plot = plot_label_distribution(result, plot_path)
    return replace(result, write_seconds=time.perf_counter() - t2, plot=plot)
