"""Atomic writes: the user's umask, one-line failures that name the target, nothing half-written or dropped."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fedlora_cli import atomic
from fedlora_cli.errors import InputError, OutputError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_and_folders_honour_the_umask(tmp_path, umask):
    file = atomic.write_json(tmp_path / "new" / "metrics.json", {"a": 1})
    assert mode(file) == 0o666 & ~umask
    assert mode(file.parent) == 0o777 & ~umask
    with atomic.staged_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_bytes(b"x")
        atomic.write_bytes(tmp / "config.json", b"{}")
    assert mode(tmp_path / "adapter") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "config.json") == 0o666 & ~umask
    # replacing a file gives the new one the umask's mode too, whatever the old one had
    file.chmod(0o600)
    atomic.write_json(file, {"a": 2})
    assert mode(file) == 0o666 & ~umask


def test_the_cli_writes_group_readable_shards_under_umask_002(glue_dir, tmp_path):
    from clitools import run

    old = os.umask(0o002)
    try:
        result = run("shard", "--task", "sst2", "--data-dir", glue_dir, "-k", 2, "--out", tmp_path / "s")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert mode(tmp_path / "s") == 0o775
    assert {mode(p) for p in (tmp_path / "s").iterdir()} == {0o664}


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no space left on device; free some space"),
        (errno.EROFS, "read-only file system; write somewhere else"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_a_failed_write_names_the_target_and_leaves_the_old_file(tmp_path, monkeypatch, code, cause):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", fail)  # the data is written, then the disk says no
    with pytest.raises(OutputError) as info:
        atomic.write_json(target, {"new": True})
    assert str(info.value).startswith(f"cannot write {target}: {cause}")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_a_failed_folder_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        pytest.raises(OutputError, match=f"cannot write {tmp_path / 'out'}: no space left on device"),
        atomic.staged_dir(tmp_path / "out") as tmp,
    ):
        (tmp / "a").write_bytes(b"1")
        fail()
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_replaces_nothing_its_caller_did_not_vouch_for(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with (
        pytest.raises(FileExistsError),
        atomic.staged_dir(target) as tmp,
    ):  # no approval given: a bug in the caller, and nothing is lost
        (tmp / "new").write_text("x")

    def refuse(path: Path) -> None:
        raise InputError(f"{path} holds files that fedlora did not write")

    with (
        pytest.raises(InputError, match="did not write"),
        atomic.staged_dir(target, may_replace=refuse) as tmp,
    ):
        (tmp / "new").write_text("x")
    calls = []

    def refuse_late(path: Path) -> None:  # approved at the start, refused at the swap: still safe
        calls.append(path)
        if len(calls) == 2:
            refuse(path)

    with pytest.raises(InputError), atomic.staged_dir(target, may_replace=refuse_late) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]
    # an empty folder needs no approval
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.staged_dir(empty) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in empty.iterdir()] == ["new"]


def test_adapter_weights_and_saved_models_honour_the_umask_like_the_json_beside_them(
    tiny_model, glue_dir, tmp_path, umask
):
    import torch
    from clitools import run

    from fedlora_cli.config import LoraSpec
    from fedlora_cli.modeling import save_adapter

    state = {
        "base_model.model.a.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.a.lora_B.weight": torch.zeros(4, 2),
    }
    save_adapter(tmp_path / "adapter", state, LoraSpec(2, 4.0, 0.0, ("a",)), base_model=None)
    assert {p.name: mode(p) for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json": 0o666 & ~umask,
        "adapter_model.safetensors": 0o666 & ~umask,
        "fedlora_adapter.json": 0o666 & ~umask,
    }
    if umask != 0o002:
        return  # one CLI run is enough: save_pretrained's own files, under the umask a shared group uses
    result = run("baseline", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--no-train",
                 "--max-eval-samples", "8", "--save-model", "--output-dir", tmp_path / "base")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    saved = {p.name: mode(p) for p in (tmp_path / "base" / "model").iterdir()}
    assert "model.safetensors" in saved and set(saved.values()) == {0o664}, saved
