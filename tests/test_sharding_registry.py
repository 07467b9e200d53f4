"""sharding/registry.py: the one source of partitioner names, light enough for `--help`, true to its modules."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
import typer

from fedlora_cli.app import app
from fedlora_cli.config import SHARD_MODES, PartitionSpec, ShardConfig
from fedlora_cli.sharding import (
    PARTITIONERS,
    ShardPlan,
    get_partitioner,
    make_client_splits,
    partitioner_names,
    registry,
)
from fedlora_cli.sharding.partition import partitioner_function


def option(command: str, flag: str):
    cli = typer.main.get_command(app)
    sub = cli.commands[command]
    param = next(p for p in sub.params if flag in p.opts)
    return sub, param


@pytest.mark.parametrize(("command", "flag"), [("shard", "--mode"), ("rounds", "--partition")])
def test_the_cli_offers_exactly_the_registered_partitioners(command, flag):
    sub, param = option(command, flag)
    # what Tab completes (and an Enum's choices, if the option becomes one)
    offered = [item.value for item in param.shell_complete(typer.Context(sub), "")]
    assert offered == list(partitioner_names())
    assert [item.value for item in param.shell_complete(typer.Context(sub), "category")] == [
        "category", "category_overlap"
    ]  # fmt: skip
    for name, entry in PARTITIONERS.items():
        assert f"{name}: {entry.summary}" in param.help  # -h describes each one, from the registry


def test_the_configs_accept_exactly_the_registered_partitioners():
    assert SHARD_MODES == partitioner_names() == tuple(PARTITIONERS)
    for name in partitioner_names():
        assert ShardConfig(task="sst2", clients=2, mode=name).mode == name
        assert PartitionSpec(clients=2, mode=name).mode == name
    listed = ", ".join(partitioner_names())
    with pytest.raises(ValueError, match=f"--mode must be one of {listed}, got 'zipf'"):
        ShardConfig(task="sst2", clients=2, mode="zipf")
    with pytest.raises(ValueError, match=f"--partition must be one of {listed}, got 'zipf'"):
        PartitionSpec(clients=2, mode="zipf")
    with pytest.raises(ValueError, match=f"unknown sharding mode 'zipf': choose one of {listed}"):
        get_partitioner("zipf")


@pytest.mark.parametrize(
    "module", ["fedlora_cli.sharding.registry", "fedlora_cli.sharding", "fedlora_cli.config"]
)
def test_the_registry_imports_neither_numpy_nor_torch(module):
    code = (
        f"import sys, {module}; from fedlora_cli.sharding import registry; registry.partitioner_names()\n"
        "print(sorted(m for m in ('numpy', 'torch', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_each_entry_names_a_function_that_takes_exactly_its_options(name):
    entry = PARTITIONERS[name]
    function = partitioner_function(entry)
    assert function.__module__ == f"fedlora_cli.sharding.{name}"  # one module per partitioner
    keywords = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keywords == [o for o in entry.options if o != "category_key"]
    assert entry.uses_categories == name.startswith("category")
    assert entry.uses_overlap == name.endswith("overlap")


def halves(rng, keys, k, *, min_size):
    """A partitioner made up for the test: the first and the second half."""
    n = len(keys.labels)
    return ShardPlan([np.arange(n // 2), np.arange(n // 2, n)], [f"min_size {min_size}"], {"made_up": True})


def test_a_new_partitioner_is_one_registry_line(monkeypatch):
    entry = registry.Partitioner("halves", f"{__name__}:halves", "two halves", ("min_size",))
    monkeypatch.setitem(registry.PARTITIONERS, "halves", entry)
    plan = make_client_splits(np.zeros(10, dtype=np.int64), 2, "halves", 0, min_size=3)
    assert plan.sizes == [5, 5] and plan.notes == ["min_size 3"] and plan.params == {"made_up": True}


def test_the_package_exports_what_it_lists():
    import fedlora_cli.sharding as sharding

    for name in sharding.__all__:
        assert getattr(sharding, name) is not None, name
