"""category: whole categories (label names, MNLI genres, any column) per client, never an empty client."""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
from fedlora_cli.sharding.helpers import client_list, codes_of, deal_round_robin, split_by_owner

MAX_LISTED_CATEGORIES = 100  # beyond this, summary.json does not list each client's categories


def split(rng: np.random.Generator, keys: PartitionKeys, k: int) -> ShardPlan:
    """category: see `split_items`, over all examples."""
    if keys.categories is None:
        raise ValueError("mode 'category' needs `categories`")
    return split_items(rng, keys.items, keys.categories, keys.strata, k)


def allocate_clients(sizes: np.ndarray, k: int) -> np.ndarray:
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


def split_items(
    rng: np.random.Generator, items: np.ndarray, categories: np.ndarray, strata: np.ndarray, k: int
) -> ShardPlan:
    """category over `items` (`categories` and `strata` are indexed by example): whole categories per client.

    K <= #categories: categories go largest first to the client with the fewest examples so far (ties
    broken at random), then client numbers are shuffled — sizes as even as whole categories allow.
    K > #categories: the reference leaves K - #categories clients empty; fedlora gives each category a
    number of clients proportional to its size (>= 1 each, largest remainder) and splits it iid among
    them, so every client still sees exactly one category, and says so in the notes.
    """
    names, cat = codes_of(categories[items])
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
        clients = split_by_owner(items, owner, k)
        params: dict[str, Any] = {"categories": c}
        if c > MAX_LISTED_CATEGORIES:
            # e.g. --category-key sentence: thousands of one-example categories; lists would swamp
            # summary.json
            notes.append(f"{c:,} categories: which client holds which is not listed")
            return ShardPlan(clients, notes, params, None)
        held: list[list[str]] = [[] for _ in range(k)]
        for cat_id in range(c):
            held[int(relabel[owner_of_cat[cat_id]])].append(str(names[cat_id]))
        params["clients_per_category"] = dict.fromkeys(map(str, names), 1)
        return ShardPlan(clients, notes, params, held)

    alloc = allocate_clients(counts, k)
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
        for j, part in zip(ids, deal_round_robin(rng, members, strata[members], a), strict=True):
            clients[j] = part
            held[j] = [str(names[cat_id])]
        if a > 1:
            notes.append(
                f"category {str(names[cat_id])!r} ({len(members):,} examples) split across {client_list(ids)}"
            )
        first += a
    params = {"categories": c, "clients_per_category": {str(names[i]): int(alloc[i]) for i in range(c)}}
    return ShardPlan(clients, notes, params, held)
