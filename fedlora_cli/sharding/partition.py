"""Partition in memory: check the request, dispatch through the registry, and make a ShardSet.

No files, no folders claimed, no plots: `fedlora shard` (workflow.run_shard) and a run's own round
setup both call `make_shards`, then write (or not) as they need. Every mode owns one
`np.random.default_rng(seed)` and consumes it in a fixed order, so a seed always gives the same plan.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora_cli.data import RawSplit
from fedlora_cli.errors import InputError
from fedlora_cli.sharding.base import PartitionKeys, ShardPlan, Split
from fedlora_cli.sharding.helpers import codes_of
from fedlora_cli.sharding.keys import bin_scores, category_values, stratification_keys
from fedlora_cli.sharding.manifest import ShardSet, shard_fingerprint, shard_summary
from fedlora_cli.sharding.registry import Partitioner, get_partitioner
from fedlora_cli.tasks import get_task

if TYPE_CHECKING:
    from fedlora_cli.config import ShardConfig


def partitioner_function(entry: Partitioner) -> Split:
    module, _, attr = entry.target.partition(":")
    return getattr(importlib.import_module(module), attr)


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
    """Split examples 0..N-1 across `clients` clients by the registry's partitioner `mode`.

    `labels`: class ids, or scores for regression. `strata`: what iid-style splits balance (default:
    the labels; 0.2-wide bins of scores). `categories`: per-example category for the category modes.
    Raises InputError when the split cannot be made (more clients than examples, `min_size` unmet).
    """
    labels = np.asarray(labels)
    n = len(labels)
    try:
        entry = get_partitioner(mode)
    except ValueError as e:
        raise InputError(str(e)) from None
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
    _, strata_codes = codes_of(strata)
    if entry.uses_categories and categories is None:
        raise ValueError(f"mode {mode!r} needs `categories`")
    keys = PartitionKeys(labels, strata_codes, None if categories is None else np.asarray(categories))
    given = dict(
        overlap_ratio=overlap_ratio,
        dirichlet_alpha=dirichlet_alpha,
        min_size=min_size,
        max_redraws=max_redraws,
    )
    options = {name: given[name] for name in entry.options if name in given}

    plan = partitioner_function(entry)(np.random.default_rng(seed), keys, clients, **options)

    sizes = plan.sizes
    small = int(np.argmin(sizes))
    if sizes[small] < min_size:
        raise InputError(
            f"{mode} split leaves client {small + 1} with {sizes[small]:,} example(s), fewer than "
            f"--min-size {min_size}: use fewer clients or lower --min-size"
        )
    return plan


def plan_shards(raw: RawSplit, config: ShardConfig) -> ShardPlan:
    """Split a loaded train split as `config` says (its partition fields; out, plot … are not read).

    The plan's params are the ones summary.json records: seed, clients, bin_stsb, the mode's own, and
    category_key / max_train_samples where they apply.
    """
    if get_task(config.task).name != raw.task:
        raise ValueError(f"the split is of {raw.task}, the config of {config.task}")
    from fedlora_cli.holdout import holdout_of

    held = holdout_of(raw, config.validation_fraction, config.validation_examples, config.validation_seed)
    if held is not None:  # split what remains, then name its examples by their index in the whole split
        plan = plan_shards(
            raw.take(held.train), replace(config, validation_fraction=None, validation_examples=None)
        )
        clients = [held.train[c] for c in plan.clients]
        validation = {
            "fraction": config.validation_fraction,
            "examples": config.validation_examples,
            **held.record(),
        }
        return ShardPlan(
            clients, plan.notes, {**plan.params, "validation": validation}, plan.client_categories
        )
    entry = get_partitioner(config.mode)
    categories = None
    if entry.uses_categories:
        categories = category_values(raw, config.category_key, bin_stsb=config.bin_stsb)
    plan = make_client_splits(
        raw.labels,
        config.clients,
        config.mode,
        config.seed,
        categories=categories,
        strata=stratification_keys(raw.task, raw, config.bin_stsb),
        overlap_ratio=config.overlap_ratio,
        dirichlet_alpha=config.dirichlet_alpha,
        min_size=config.min_size,
    )
    params = {"seed": config.seed, "clients": config.clients, "bin_stsb": config.bin_stsb, **plan.params}
    if entry.uses_categories:
        params["category_key"] = config.category_key
    if config.max_train_samples is not None:
        params["max_train_samples"] = config.max_train_samples
    return ShardPlan(plan.clients, plan.notes, params, plan.client_categories)


def shard_set(raw: RawSplit, config: ShardConfig, plan: ShardPlan) -> ShardSet:
    """The in-memory ShardSet of `plan` (clients 1..K) with the summary.json `fedlora shard` would write."""
    entry = get_partitioner(config.mode)
    meta = {
        "seed": config.seed,
        "overlap_ratio": config.overlap_ratio if entry.uses_overlap else 0.0,
        "category_key": config.category_key if entry.uses_categories else None,
        "bin_stsb": config.bin_stsb,
    }
    extra = {
        "label_counts": label_counts(raw.task, raw.labels, plan.clients),
        "train_fingerprint": raw.fingerprint(),
        "data_source": raw.source,
    }
    summary = shard_summary(raw.task, plan, mode=config.mode, total_train=len(raw), meta=meta, extra=extra)
    client_ids = list(range(1, len(plan.clients) + 1))
    return ShardSet(
        None, plan.clients, client_ids, raw.task, summary, shard_fingerprint(client_ids, plan.clients)
    )


def make_shards(raw: RawSplit, config: ShardConfig) -> ShardSet:
    """Partition a loaded train split in memory: the ShardSet `fedlora shard` would write, unwritten.

    `config` is a ShardConfig (a run's `PartitionSpec.shard_config(...)` gives one; its out, plot and
    overwrite are not read). Nothing is written, claimed or drawn: `manifest.write_shard_set` writes
    the result, and `read_shards` of that folder gives back the same clients, fingerprint and summary.
    """
    return shard_set(raw, config, plan_shards(raw, config))


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
