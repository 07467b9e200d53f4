"""sharding/manifest.py: the reference's manifest format, read and written by its one reader and writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora_cli.errors import InputError, OutputError
from fedlora_cli.sharding import (
    ShardPlan,
    make_client_splits,
    manifest,
    read_shards,
    validate_shards,
    write_shards,
)


def reference_dir(folder: Path, clients: list[list[int]], task: str = "sst2", summary: bool = True) -> Path:
    """Exactly what the reference's save_shard_manifests writes: compact client files, indent-2 summary."""
    folder.mkdir(parents=True)
    for i, idxs in enumerate(clients):
        with open(folder / f"client_{i + 1}.json", "w") as f:
            json.dump({"dataset": task, "indices": idxs}, f)
    if summary:
        info = {
            "client_indices": clients,
            "size_per_client": [len(c) for c in clients],
            "total_train": sum(len(c) for c in clients),
            "task": task,
            "mode": "iid",
            "meta": {"seed": 123, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True},
        }
        with open(folder / "summary.json", "w") as f:
            json.dump(info, f, indent=2)
    return folder


def twelve_clients() -> list[list[int]]:
    order = np.random.default_rng(6).permutation(120).tolist()  # the reference writes shuffled order
    return [order[i::12] for i in range(12)]


def test_reads_the_reference_format_in_numeric_client_order(tmp_path):
    clients = twelve_clients()
    shards = read_shards(reference_dir(tmp_path / "ref", clients))
    assert shards.client_ids == list(range(1, 13))  # client_10..12 after client_9
    assert [c.tolist() for c in shards.clients] == clients  # file order within a client kept
    assert shards.task == "sst2" and shards.summary["mode"] == "iid"
    assert shards.sizes == [10] * 12
    validate_shards(shards, "sst2", 120)
    validate_shards(shards, "SST-2", 120)  # task names as elsewhere in fedlora


def test_reads_client_files_without_summary(tmp_path):
    shards = read_shards(reference_dir(tmp_path / "ref", twelve_clients(), summary=False))
    assert shards.summary is None and len(shards.clients) == 12
    validate_shards(shards, "sst2", 120)


def test_fingerprint_tracks_the_assignment(tmp_path):
    clients = twelve_clients()
    a = read_shards(reference_dir(tmp_path / "a", clients)).fingerprint
    assert a == read_shards(reference_dir(tmp_path / "b", clients)).fingerprint
    swapped = [clients[1], clients[0], *clients[2:]]
    assert a != read_shards(reference_dir(tmp_path / "c", swapped)).fingerprint


def test_manifest_round_trip(tmp_path):
    labels = np.random.default_rng(7).integers(0, 2, 300)
    plan = make_client_splits(labels, 11, "dirichlet", 0, dirichlet_alpha=2.0)
    meta = {"seed": 0, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True}
    out = write_shards(
        tmp_path / "s", "sst2", plan, mode="dirichlet", total_train=300, meta=meta,
        summary_extra={"label_counts": [{"a": 1}] * 11, "train_fingerprint": "f" * 64},
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"client_{i}.json" for i in range(1, 12)] + ["summary.json"]
    )
    client = json.loads((out / "client_10.json").read_text())
    assert set(client) == {"dataset", "indices"} and client["dataset"] == "sst2"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("client_indices", "size_per_client", "total_train", "task", "mode", "meta"):
        assert key in summary
    assert summary["meta"] == meta and summary["total_train"] == 300 and summary["mode"] == "dirichlet"
    assert summary["client_indices"] == [c.tolist() for c in plan.clients]
    assert summary["size_per_client"] == plan.sizes
    assert summary["fedlora_version"] and summary["params"]["dirichlet_alpha"] == 2.0
    shards = read_shards(out)
    assert shards.client_ids == list(range(1, 12))
    assert all(np.array_equal(a, b) for a, b in zip(shards.clients, plan.clients, strict=True))
    validate_shards(shards, "sst2", 300, train_fingerprint="f" * 64)
    with pytest.raises(InputError, match="different sst2 training data"):
        validate_shards(shards, "sst2", 300, train_fingerprint="e" * 64)


def small_plan() -> ShardPlan:
    return make_client_splits(np.asarray([0, 1] * 10), 2, "iid", 0)


def test_write_refuses_an_existing_folder_without_overwrite(tmp_path):
    out = tmp_path / "s"
    write_shards(out, "sst2", small_plan(), mode="iid", total_train=20)
    with pytest.raises(InputError, match="already holds a fedlora shard folder.*--overwrite"):
        write_shards(out, "sst2", small_plan(), mode="iid", total_train=20)
    # --overwrite replaces the whole folder: no stale client files survive (the reference's hazard)
    plan = make_client_splits(np.asarray([0, 1] * 10), 4, "iid", 0)
    write_shards(out, "sst2", plan, mode="iid", total_train=20, overwrite=True)
    write_shards(out, "sst2", small_plan(), mode="iid", total_train=20, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_1.json", "client_2.json", "summary.json"]
    read_shards(out)


@pytest.mark.parametrize("foreign", ["thesis.tex", "client_1.json"])
def test_overwrite_never_replaces_what_fedlora_did_not_write(tmp_path, foreign):
    out = tmp_path / "home"
    out.mkdir()
    (out / foreign).write_text("precious")
    with pytest.raises(InputError, match="fedlora did not write"):
        write_shards(out, "sst2", small_plan(), mode="iid", total_train=20, overwrite=True)
    assert (out / foreign).read_text() == "precious"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return Path(path).write_bytes(data)

    monkeypatch.setattr(manifest, "write_bytes", failing)
    with pytest.raises(OutputError, match="cannot write .*s: disk full"):
        write_shards(tmp_path / "s", "sst2", small_plan(), mode="iid", total_train=20)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging leftover


def write_client(folder: Path, i: int, content: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"client_{i}.json").write_text(content)


@pytest.mark.parametrize(
    ("files", "pattern"),
    [
        ({}, "no client_*.json in"),
        ({1: "{not json"}, "is not valid JSON"),
        ({1: '{"dataset": "sst2"}'}, 'has no "indices"'),
        ({1: '{"dataset": "sst2", "indices": [1, 2.5]}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": [1, true]}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": "1,2"}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": [3, -1]}'}, "negative index (-1)"),
        (
            {1: '{"dataset": "sst2", "indices": [1]}', 2: '{"dataset": "rte", "indices": [2]}'},
            "different datasets",
        ),
    ],
)
def test_read_errors(tmp_path, files, pattern):
    folder = tmp_path / "s"
    folder.mkdir()
    for i, text in files.items():
        write_client(folder, i, text)
    with pytest.raises(InputError) as e:
        read_shards(folder)
    assert pattern in str(e.value)


def test_read_errors_missing_folder_and_stale_files(tmp_path):
    with pytest.raises(InputError, match="does not exist: run `fedlora shard"):
        read_shards(tmp_path / "nope")
    folder = reference_dir(tmp_path / "ref", [[0, 1], [2, 3]])
    write_client(folder, 3, '{"dataset": "sst2", "indices": [4, 5]}')  # left over from an earlier run
    with pytest.raises(InputError, match="stale files"):
        read_shards(folder)


def test_validate_errors(tmp_path):
    shards = read_shards(reference_dir(tmp_path / "a", [[0, 1], [2, 3]]))
    with pytest.raises(InputError, match="holds shards of sst2, not rte: pass --task sst2"):
        validate_shards(shards, "rte", 4)
    with pytest.raises(InputError, match="made for 4 training examples.*--max-train-samples 4"):
        validate_shards(shards, "sst2", 100)
    no_summary = read_shards(reference_dir(tmp_path / "b", [[0, 1], [2, 9]], summary=False))
    with pytest.raises(InputError) as e:
        validate_shards(no_summary, "sst2", 5)
    assert "client 2" in str(e.value) and "index 9" in str(e.value) and "5 examples" in str(e.value)
    # the reference's category mode with more clients than categories: empty clients
    empty = read_shards(reference_dir(tmp_path / "c", [[0, 1], [2, 3], []]))
    with pytest.raises(InputError, match="client\\(s\\) 3 .* have no examples"):
        validate_shards(empty, "sst2", 4)
