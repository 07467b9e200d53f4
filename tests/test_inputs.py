"""Hostile or damaged input — adapters, manifests, TSVs, records — is one line and exit 2 at every entry point."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file, save_file

from fedlora_cli.data import load_split
from fedlora_cli.errors import InputError
from fedlora_cli.jsonfile import read_json
from fedlora_cli.modeling import read_adapter
from fedlora_cli.sharding import read_manifest, read_shards

QUICK = ["--max-train-samples", "64", "--epochs", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def good_adapter(tiny_model, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inputs") / "run"
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, *QUICK, "--no-eval",
                 "--output-dir", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out / "adapter"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs-shards")
    for i, idx in enumerate((range(0, 32), range(32, 64)), start=1):
        (folder / f"client_{i}.json").write_text(json.dumps({"dataset": "sst2", "indices": list(idx)}))
    return folder


# ---------------------------------------------------------------------------------------------------
# adapters: validated in one place (modeling.read_adapter), so every entry point refuses the same things


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(str(folder / "adapter_model.safetensors"))
        fn(state)
        save_file(state, str(folder / "adapter_model.safetensors"))

    return edit


def _first(state: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(state) if part in k)


def _set(state, part: str, value: float) -> None:
    state[_first(state, part)][0, 0] = value


def _to_int(state) -> None:
    key = _first(state, "lora_A")
    state[key] = state[key].to(torch.int64)


def _drop(state, part: str) -> None:
    del state[_first(state, part)]


ADAPTER_DAMAGE = {
    "config is a list": (lambda f: (f / "adapter_config.json").write_text("[8, 16]"), "must be a JSON object, got list"),
    "r is a list": (_edit_config(r=[8]), "'r' must be an integer in 1..2,147,483,647, got [8]"),
    "r is a string": (_edit_config(r="8"), "'r' must be an integer in 1..2,147,483,647, got '8'"),
    "r is 2**70": (_edit_config(r=2**70), "'r' must be an integer in 1..2,147,483,647, got 1180591620717411303424"),
    "r disagrees with the tensors": (_edit_config(r=4), "says r=4 but the LoRA tensors have rank 8"),
    "alpha is NaN": (_edit_config(lora_alpha=float("nan")), "'lora_alpha' must be a finite number, got nan"),
    "alpha is a bool": (_edit_config(lora_alpha=True), "'lora_alpha' must be a finite number, got True"),
    "target_modules is a number": (_edit_config(target_modules=5), "'target_modules' must be a module name"),
    "config is not JSON": (lambda f: (f / "adapter_config.json").write_bytes(b"\xff{"), "is not valid JSON"),
    "a NaN weight": (_edit_tensors(lambda s: _set(s, "lora_B", float("nan"))), "holds NaN or infinite values"),
    "an infinite weight": (_edit_tensors(lambda s: _set(s, "lora_A", float("-inf"))), "NaN or infinite"),
    "integer weights": (_edit_tensors(_to_int), "is torch.int64; adapter tensors must be floating point"),
    "lora_B missing": (_edit_tensors(lambda s: _drop(s, "lora_B")), "lora_A.weight' but no"),
    "weights not safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"PK\x03\x04zip"), "cannot read"),
}  # fmt: skip


def damaged(good: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name.replace(" ", "_").replace("*", "")
    shutil.copytree(good, folder)
    ADAPTER_DAMAGE[name][0](folder)
    return folder


@pytest.mark.parametrize("name", sorted(ADAPTER_DAMAGE))
def test_read_adapter_refuses_each_kind_of_damage(good_adapter, tmp_path, name):
    folder = damaged(good_adapter, tmp_path, name)
    with pytest.raises(InputError) as info:
        read_adapter(folder)
    assert ADAPTER_DAMAGE[name][1] in str(info.value) and "\n" not in str(info.value)


def test_fedlora_meta_of_the_wrong_type_is_ignored_not_fatal(good_adapter, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(good_adapter, folder)
    (folder / "fedlora_adapter.json").write_text('["not", "an", "object"]')
    assert read_adapter(folder).meta == {}


@pytest.mark.parametrize(
    "name", ["r is a list", "r disagrees with the tensors", "a NaN weight", "integer weights"]
)
@pytest.mark.parametrize("entry", ["eval", "train --init-adapter", "rounds --init-adapter", "merge"])
def test_every_entry_point_refuses_a_damaged_adapter(
    tiny_model, glue_dir, good_adapter, shards, tmp_path, entry, name
):
    bad = damaged(good_adapter, tmp_path, name)
    common = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir]
    args = {
        "eval": ["eval", *common, "--adapter", bad],
        "train --init-adapter": ["train", *common, *QUICK, "--init-adapter", bad, "--output-dir", tmp_path / "out"],
        "rounds --init-adapter": ["rounds", *common, "--shards", shards, "--init-adapter", bad,
                                  "--output-dir", tmp_path / "out"],
        "merge": ["merge", "--adapters", good_adapter, bad, "--save-adapter", tmp_path / "out"],
    }[entry]  # fmt: skip
    one_error_line(run(*args), 2, ADAPTER_DAMAGE[name][1])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# shard manifests: one reader (sharding.read_manifest) for `rounds`, `merge --shard-manifests` and Flower


def _client2(content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "client_2.json").write_text(content)


def _fifo(folder: Path) -> None:
    (folder / "client_2.json").unlink()
    os.mkfifo(folder / "client_2.json")


def _dangling(folder: Path) -> None:
    (folder / "client_2.json").unlink()
    (folder / "client_2.json").symlink_to(folder / "gone.json")


def _directory(folder: Path) -> None:
    (folder / "client_2.json").unlink()
    (folder / "client_2.json").mkdir()


def _summary(content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "summary.json").write_text(content)


MANIFEST_DAMAGE = {
    "a list, not an object": (_client2("[3, 4]"), 'has no "indices"'),
    "dataset is a list": (_client2('{"dataset": ["sst2"], "indices": [3]}'), '"dataset" must be a task name'),
    "an index of 2**70": (_client2(f'{{"indices": [3, {2**70}]}}'), "an index out of range (1180591620717411303424)"),
    "a negative index": (_client2('{"indices": [-1]}'), "a negative index (-1)"),
    "a float index": (_client2('{"indices": [3.0]}'), '"indices" must be a list of integers'),
    "a boolean index": (_client2('{"indices": [true]}'), '"indices" must be a list of integers'),
    "a duplicate index": (_client2('{"indices": [3, 5, 3]}'), "index 3 appears 2 times"),
    "not UTF-8": (lambda f: (f / "client_2.json").write_bytes(b'{"indices": [3]}\xff'), "not UTF-8"),
    "a dangling symlink": (_dangling, "is a dangling symbolic link"),
    "a directory": (_directory, "is a folder, not a manifest file"),
    "a FIFO": (_fifo, "is not a regular file (a device, FIFO or socket)"),
    "summary task is a list": (_summary('{"task": ["sst2"]}'), '"task" has the wrong type'),
    "summary total_train is a string": (_summary('{"total_train": "600"}'), '"total_train" has the wrong type'),
    "summary is a list": (_summary("[]"), "is not a JSON object"),
}  # fmt: skip


def shard_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in (1, 2):
        (folder / f"client_{i}.json").write_text(
            json.dumps({"dataset": "sst2", "indices": [2 * i, 2 * i + 1]})
        )
    MANIFEST_DAMAGE[name][0](folder)
    return folder


@pytest.mark.parametrize("name", sorted(MANIFEST_DAMAGE))
def test_read_shards_refuses_each_kind_of_damage_and_never_drops_a_client(tmp_path, name):
    folder = shard_folder(tmp_path, name)
    with pytest.raises(InputError) as info:
        read_shards(folder)
    assert MANIFEST_DAMAGE[name][1] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["dataset is a list", "an index of 2**70", "a FIFO", "a dangling symlink"])
def test_rounds_and_merge_refuse_damaged_manifests(tiny_model, glue_dir, good_adapter, tmp_path, name):
    folder = shard_folder(tmp_path, name)
    args = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", folder,
            "--output-dir", tmp_path / "out"]  # fmt: skip
    one_error_line(run(*args), 2, MANIFEST_DAMAGE[name][1])
    result = run("merge", "--adapters", good_adapter, good_adapter, "--shard-manifests", folder / "client_1.json",
                 "--shard-manifests", folder / "client_2.json", "--save-adapter", tmp_path / "out")  # fmt: skip
    one_error_line(result, 2, MANIFEST_DAMAGE[name][1])
    assert not (tmp_path / "out").exists()


def test_read_manifest_returns_the_checked_fields(tmp_path):
    path = tmp_path / "client_1.json"
    path.write_text('{"dataset": "sst2", "indices": [5, 1, 3]}')
    manifest = read_manifest(path)
    assert manifest.dataset == "sst2" and manifest.indices.tolist() == [5, 1, 3]
    assert manifest.indices.dtype == np.int64


# ---------------------------------------------------------------------------------------------------
# data files and records


@pytest.fixture
def sst2_copy(glue_dir, tmp_path) -> Path:
    shutil.copytree(glue_dir / "SST-2", tmp_path / "glue" / "SST-2")
    return tmp_path / "glue"


def test_invalid_utf8_in_a_tsv_names_the_line(sst2_copy, tiny_model):
    path = sst2_copy / "SST-2" / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = b"caf\xe9 au lait\t1"  # latin-1, as an old export would write it
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InputError, match=r"train.tsv:4: not UTF-8 text \(byte 0xe9\)"):
        load_split("sst2", "train", data_dir=sst2_copy)
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", sst2_copy, *QUICK,
                 "--output-dir", sst2_copy / "out")  # fmt: skip
    one_error_line(result, 2, "train.tsv:4: not UTF-8 text")


@pytest.mark.parametrize("split", ["dev", "train"])
def test_an_empty_split_is_an_error_not_a_meaningless_metric(sst2_copy, tiny_model, split):
    (sst2_copy / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n")
    command = ["eval"] if split == "dev" else ["train", *QUICK, "--output-dir", sst2_copy / "out"]
    result = run(*command, "--task", "sst2", "--model", tiny_model, "--data-dir", sst2_copy)
    one_error_line(result, 2, f"the sst2 {'validation' if split == 'dev' else 'train'} split has no examples")
    assert not (sst2_copy / "out").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null", "{", "\udcff"])
def test_a_record_that_is_not_a_json_object_is_one_error(tmp_path, content):
    path = tmp_path / "run.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(InputError, match="run.json"):
        read_json(path, "run record")


JSON_DAMAGE = {  # what is at the path, and what the one line says about it
    "missing": (lambda p: None, "no such run record"),
    "a folder": (lambda p: p.mkdir(), "is a folder, not a file"),
    "a FIFO": (lambda p: os.mkfifo(p), "is not a regular file (a device, FIFO or socket)"),
    "too large": (lambda p: p.write_text('{"x": "' + "y" * 2000 + '"}'), "is larger than"),
    "not JSON": (lambda p: p.write_text("{"), "is not valid JSON"),
    "not text": (lambda p: p.write_bytes(b"\xff\xfe\x00{"), "is not valid JSON"),
    "nested too deeply": (lambda p: p.write_text("[" * 1020), "is not valid JSON (nested too deeply)"),
    "a list": (lambda p: p.write_text("[1]"), "must be a JSON object, got list"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(JSON_DAMAGE))
def test_the_one_json_object_reader_fails_by_one_rule(tmp_path, kind):
    """jsonfile.read_json: every way a file is not a JSON object is one InputError naming the file, and a
    FIFO or a huge file is refused without reading it to the end (it never returns)."""
    from fedlora_cli.jsonfile import read_json_or_none

    path = tmp_path / "run.json"
    make, says = JSON_DAMAGE[kind]
    make(path)
    with pytest.raises(InputError) as info:
        read_json(path, "run record", limit=1024)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message
    assert read_json_or_none(path) is None or kind == "too large"  # the default limit lets 2 kB through
    (tmp_path / "ok.json").write_text('{"a": NaN}')  # fedlora writes NaN for metrics without a value
    assert read_json(tmp_path / "ok.json")["a"] != 0


def test_a_record_of_the_wrong_shape_is_one_error_naming_the_key(tmp_path):
    from fedlora_cli.runs import read_record

    good = {"command": "rounds", "argv": ["fedlora", "rounds"], "config": {"rounds": 2}}
    for key, value, says in (("config", [1], "'config' must be a JSON object, got [1]"),
                             ("command", ["train"], "'command' must be a command name"),
                             ("argv", "fedlora train", "'argv' must be a list of strings"),
                             ("resumes", [{"changes": {"rounds": 3}}], "'resumes' must be a list of"),
                             ("pid", True, "'pid' must be a process id")):  # fmt: skip
        (tmp_path / "run.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(InputError, match="run.json: not a run record fedlora can use") as info:
            read_record(tmp_path)
        assert says in str(info.value), str(info.value)
    (tmp_path / "run.json").write_text(json.dumps({**good, "from_the_future": [1]}))
    assert read_record(tmp_path).extra == {"from_the_future": [1]}  # unknown keys are kept, not checked
