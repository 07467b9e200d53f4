"""sharding/partition.make_shards: the shards of `fedlora shard`, made in memory for a run's own setup."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora_cli.config import DataSpec, PartitionSpec, ShardConfig
from fedlora_cli.data import load_split
from fedlora_cli.errors import InputError
from fedlora_cli.sharding import (
    ShardSet,
    make_shards,
    partitioner_names,
    read_shards,
    run_shard,
    shard_fingerprint,
    validate_shards,
    write_shard_set,
)

CASES = [("mnli", "genre"), ("stsb", "label"), ("sst2", "label")]


@pytest.mark.parametrize("mode", partitioner_names())
@pytest.mark.parametrize(("task", "key"), CASES)
def test_run_shard_writes_exactly_what_make_shards_makes(glue_dir, tmp_path, monkeypatch, mode, task, key):
    monkeypatch.chdir(tmp_path)
    config = ShardConfig(task=task, clients=3, mode=mode, seed=9, data_dir=str(glue_dir), out=str(tmp_path / "s"),
                         category_key=key, max_train_samples=120, overlap_ratio=0.2)  # fmt: skip
    raw = load_split(task, "train", data_dir=glue_dir, max_samples=120)

    shards = make_shards(raw, config)

    assert list(tmp_path.iterdir()) == []  # nothing written, nothing claimed
    assert shards.directory is None and shards.client_ids == [1, 2, 3] and shards.task == raw.task
    assert shards.fingerprint == shard_fingerprint([1, 2, 3], shards.clients)
    summary = shards.summary
    assert summary["mode"] == mode and summary["total_train"] == 120 and summary["meta"]["seed"] == 9
    assert summary["train_fingerprint"] == raw.fingerprint() and summary["params"]["max_train_samples"] == 120
    assert summary["client_indices"] == [c.tolist() for c in shards.clients]
    validate_shards(shards, task, len(raw), train_fingerprint=raw.fingerprint())
    # `fedlora shard` is the same call, then a write: the folder reads back as the very same set
    result = run_shard(config)
    read = read_shards(result.out)
    assert read.fingerprint == shards.fingerprint and read.summary == summary
    assert all(np.array_equal(a, b) for a, b in zip(read.clients, shards.clients, strict=True))
    assert result.sizes == shards.sizes and result.params == summary["params"]


def test_write_shard_set_writes_the_set_and_says_where(glue_dir, tmp_path):
    config = PartitionSpec(clients=4, mode="dirichlet", dirichlet_alpha=1.0).shard_config(
        DataSpec(task="sst2"), 7, out="not read"
    )  # a run's partition options, as round setup would hold them
    shards = make_shards(load_split("sst2", "train", data_dir=glue_dir), config)
    written = write_shard_set(tmp_path / "s", shards)
    assert written.directory == (tmp_path / "s").resolve() and written.fingerprint == shards.fingerprint
    assert sorted(p.name for p in written.directory.iterdir()) == [
        "client_1.json", "client_2.json", "client_3.json", "client_4.json", "summary.json"
    ]  # fmt: skip
    assert json.loads((written.directory / "client_2.json").read_text()) == {
        "dataset": "sst2", "indices": shards.clients[1].tolist()
    }  # fmt: skip
    assert read_shards(written.directory).summary == shards.summary
    with pytest.raises(InputError, match="already holds a fedlora shard folder"):
        write_shard_set(tmp_path / "s", shards)
    # a reference folder has no summary to write back
    with pytest.raises(ValueError, match="needs shards with a task and a summary"):
        write_shard_set(tmp_path / "t", ShardSet(None, shards.clients, [1, 2, 3, 4], "sst2", None, "f"))


def test_in_memory_shards_are_named_as_such_in_errors(glue_dir):
    config = ShardConfig(task="sst2", clients=2, data_dir=str(glue_dir))
    shards = make_shards(load_split("sst2", "train", data_dir=glue_dir), config)
    with pytest.raises(InputError, match="the in-memory shard set was made for 600 training examples"):
        validate_shards(shards, "sst2", 500)


def test_make_shards_refuses_a_split_of_another_task(glue_dir):
    with pytest.raises(ValueError, match="the split is of rte, the config of sst2"):
        make_shards(load_split("rte", "train", data_dir=glue_dir), ShardConfig(task="sst2", clients=2))
