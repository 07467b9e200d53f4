"""Sharding: pure partitioners behind one registry | the manifest format | the `fedlora shard` workflow.

Importing this package imports no numpy (the CLI's `--help` reads `registry`): the names below are
loaded from their modules on first use.

- `registry`: the ONE list of partitioner names (`--mode`, `--partition`), each naming its module.
- `iid`, `overlap`, `category`, `category_overlap`, `dirichlet`, `quantity`: one partitioner each, a
  pure function of a seeded rng and the examples' keys; `helpers` holds what they share.
- `keys`: what a task's examples are split by (strata, categories).
- `partition`: the in-memory entry point (`make_client_splits` on arrays, `make_shards` on a split).
- `manifest`: the ONE reader and writer of `client_<i>.json` / `summary.json`.
- `workflow`: `run_shard`, the core of `fedlora shard`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlora_cli.sharding.registry import PARTITIONERS, Partitioner, get_partitioner, partitioner_names

if TYPE_CHECKING:
    from fedlora_cli.ownership import CLIENT_FILE, SUMMARY_FILE
    from fedlora_cli.sharding.base import PartitionKeys, ShardPlan
    from fedlora_cli.sharding.keys import STSB_BIN_WIDTH, bin_scores, category_values, stratification_keys
    from fedlora_cli.sharding.manifest import (
        MAX_INDEX,
        Manifest,
        ShardSet,
        check_out_dir,
        read_manifest,
        read_shards,
        shard_fingerprint,
        shard_summary,
        validate_shards,
        write_shard_set,
        write_shards,
    )
    from fedlora_cli.sharding.partition import (
        label_counts,
        make_client_splits,
        make_shards,
        plan_shards,
        shard_set,
    )
    from fedlora_cli.sharding.workflow import ShardResult, run_shard

# the modes that take a shared pool / whole categories, from the registry
OVERLAP_MODES = tuple(p.name for p in PARTITIONERS.values() if p.uses_overlap)
CATEGORY_MODES = tuple(p.name for p in PARTITIONERS.values() if p.uses_categories)

_LAZY = {
    "fedlora_cli.ownership": ("CLIENT_FILE", "SUMMARY_FILE"),
    "fedlora_cli.sharding.base": ("PartitionKeys", "ShardPlan"),
    "fedlora_cli.sharding.keys": ("STSB_BIN_WIDTH", "bin_scores", "category_values", "stratification_keys"),
    "fedlora_cli.sharding.manifest": (
        "MAX_INDEX",
        "Manifest",
        "ShardSet",
        "check_out_dir",
        "read_manifest",
        "read_shards",
        "shard_fingerprint",
        "shard_summary",
        "validate_shards",
        "write_shard_set",
        "write_shards",
    ),
    "fedlora_cli.sharding.partition": (
        "label_counts",
        "make_client_splits",
        "make_shards",
        "plan_shards",
        "shard_set",
    ),
    "fedlora_cli.sharding.workflow": ("ShardResult", "run_shard"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "CATEGORY_MODES",
    "CLIENT_FILE",
    "MAX_INDEX",
    "Manifest",
    "OVERLAP_MODES",
    "PARTITIONERS",
    "PartitionKeys",
    "Partitioner",
    "STSB_BIN_WIDTH",
    "SUMMARY_FILE",
    "ShardPlan",
    "ShardResult",
    "ShardSet",
    "bin_scores",
    "category_values",
    "check_out_dir",
    "get_partitioner",
    "label_counts",
    "make_client_splits",
    "make_shards",
    "partitioner_names",
    "plan_shards",
    "read_manifest",
    "read_shards",
    "run_shard",
    "shard_fingerprint",
    "shard_set",
    "shard_summary",
    "stratification_keys",
    "validate_shards",
    "write_shard_set",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
