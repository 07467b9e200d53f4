"""One process per run folder: a second `rounds` (fresh or --resume, either engine), `train` or `baseline`
on a folder in use stops with one line naming the holder; a dead holder never blocks anyone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run
from test_rounds import write_manifests

from fedlora_cli import ownership
from fedlora_cli.runlock import HOLDER_FILE, LOCK_FILE, RunBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--local-epochs", "1", "--precision", "fp32", "--max-eval-samples", "50"]
HOLD = "import sys, time; from fedlora_cli.runlock import RunLock; held = RunLock(sys.argv[1], 'rounds').acquire(); print('held', flush=True); time.sleep(120)"  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(3).permutation(600).tolist()
    return write_manifests(tmp_path_factory.mktemp("shards") / "k2", [order[:50], order[50:100]])


def rounds(model, glue, shards, out, *extra):
    return run("rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
               "--output-dir", out, "--rounds", "1", *QUICK, *extra)  # fmt: skip


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_stops_naming_the_first_and_a_killed_holder_blocks_nobody(
    tiny_model, glue_dir, shards, tmp_path
):
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            message = one_error_line(rounds(tiny_model, glue_dir, shards, out, *extra), 1, f"{out} is in use")
            assert f"process {holder.pid} on {socket.gethostname()} (fedlora rounds" in message
        for command in ("train", "baseline"):
            result = run(command, "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--no-eval"
                         if command == "train" else "--no-train", "--output-dir", out, "--max-eval-samples", "20")  # fmt: skip
            one_error_line(result, 1, f"in use by process {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == sorted(ownership.LOCK_FILES)  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: its lock files stay behind
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == sorted(ownership.LOCK_FILES)
    result = rounds(tiny_model, glue_dir, shards, out)
    assert result.exit_code == 0, result.stderr
    assert (out / "round_001" / "global" / "metrics.json").is_file()
    assert not list(out.glob(".*"))  # the lock files went with the run that held them last


def test_the_flower_engine_takes_the_same_lock_before_it_starts_ray(tiny_model, glue_dir, shards, tmp_path):
    pytest.importorskip("flwr", reason="the `flower` extra is not installed")
    out = tmp_path / "run"
    with RunLock(out, "rounds"):
        result = rounds(tiny_model, glue_dir, shards, out, "--engine", "flower")
        one_error_line(result, 1, f"in use by process {os.getpid()}")
    assert not out.exists()  # the lock made the folder, and took it away again


def test_train_into_a_folder_in_use_leaves_it_alone(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "train"
    first = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-train-samples", "32",
                "--epochs", "1", "--no-eval", "--output-dir", out)  # fmt: skip
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with RunLock(out, "train"):
        again = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-train-samples",
                    "32", "--epochs", "1", "--no-eval", "--output-dir", out, "--overwrite")  # fmt: skip
        one_error_line(again, 1, "in use by process")
        assert {
            p.name: p.read_bytes()
            for p in out.iterdir()
            if p.is_file() and p.name not in ownership.LOCK_FILES
        } == before


def test_the_lock_itself(tmp_path):
    folder = tmp_path / "a" / "b"
    lock = RunLock(folder, "rounds").acquire()
    note = json.loads((folder / HOLDER_FILE).read_text())
    assert note["pid"] == os.getpid() and note["command"] == "rounds" and (folder / LOCK_FILE).exists()
    with pytest.raises(RunBusy, match=f"process {os.getpid()}"):
        RunLock(folder, "train").acquire()  # another open file description: refused even in one process
    ownership.claim(
        folder, ownership.RUN, overwrite=False, option="--x"
    )  # its files do not occupy the folder
    lock.release()
    assert not (tmp_path / "a").exists()  # every folder it made was empty, and went
    (tmp_path / "keep").mkdir()
    with RunLock(tmp_path / "keep", "train"):
        (tmp_path / "keep" / "run.json").write_text("{}")
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["run.json"]
