"""SIGTERM (scancel, docker stop) stops every command as Ctrl-C does: one line, exit 143, and a run that
is resumable (`rounds`) or removed (`train`, `baseline`) — never a stub folder that blocks its name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run
from test_rounds import write_manifests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(4).permutation(600).tolist()
    return write_manifests(tmp_path_factory.mktemp("shards") / "k2", [order[:50], order[50:100]])


def start(*args) -> subprocess.Popen:
    """`python -m fedlora_cli …` as a user starts it: its own process, stderr not a terminal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedlora_cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def terminate_when(proc: subprocess.Popen, ready, timeout: float = 120) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_sigterm_stops_rounds_resumably(tiny_model, glue_dir, shards, tmp_path):
    out = tmp_path / "run"
    common = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
              "--output-dir", out, "--local-epochs", "1", "--precision", "fp32", "--max-eval-samples", "20"]  # fmt: skip
    proc = start(*common, "--rounds", "50")
    code, err = terminate_when(proc, (out / "round_001" / "global" / "metrics.json").is_file)
    assert code == 143, err
    [line] = error_lines(err)
    assert line.startswith("error: terminated (SIGTERM): ") and f"--output-dir {out} --resume" in line
    assert not list(out.glob(".fedlora.lock*"))  # the lock went with the process
    again = run(*common, "--rounds", "2", "--resume")
    assert again.exit_code == 0, again.stderr
    assert (out / "round_002" / "global" / "metrics.json").is_file() and (out / "final" / "adapter").is_dir()


@pytest.mark.slow
def test_sigterm_leaves_an_unfinished_train_run_marked_interrupted_and_reusable(
    tiny_model, glue_dir, tmp_path
):
    out = tmp_path / "train"
    proc = start("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--epochs", "500",
                 "--batch-size", "8", "--precision", "fp32", "--output-dir", out)  # fmt: skip
    code, err = terminate_when(proc, (out / "run.json").is_file)  # training has started
    assert code == 143, err
    [line] = error_lines(err)
    assert line.startswith(f"error: terminated (SIGTERM): {out} is marked interrupted")
    # nothing half-written, and no stub that blocks the name: only the record, saying what happened
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_sigterm_in_any_command_is_one_line_and_exit_143(tiny_model, glue_dir, monkeypatch):
    from fedlora_cli import centralised, termination

    monkeypatch.setattr(termination, "_enabled", True)  # as in the `fedlora` command's own process (app.main)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(centralised, "evaluate", terminated)
    result = run(
        "eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-eval-samples", "10"
    )
    one_error_line(result, 143, "terminated (SIGTERM): stopped before finishing")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command put the default back


def test_in_library_use_and_under_clirunner_sigterm_stays_the_host_process_s(
    tiny_model, glue_dir, monkeypatch
):
    """A SIGTERM that reaches a test suite running a command in-process is the suite's to handle, not fedlora's."""
    from fedlora_cli import centralised

    class Stopped(Exception):
        pass

    def suites_handler(signum, frame):
        raise Stopped

    seen = []

    def terminated(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the host's handler raises before this ends
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(centralised, "evaluate", terminated)
    previous = signal.signal(signal.SIGTERM, suites_handler)
    try:
        result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir,
                     "--max-eval-samples", "10")  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [suites_handler]  # fedlora installed nothing of its own
    assert isinstance(result.exception, Stopped) and result.exit_code == 1  # the suite's handler stopped it


def test_importing_fedlora_installs_no_signal_handler():
    from fedlora_cli import termination

    code = ("import signal, fedlora_cli.app, fedlora_cli.flower.simulation\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
            "from fedlora_cli import termination\nassert not termination.enabled()")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not termination.enabled()  # this test process is not the `fedlora` command


def test_the_flower_engine_leaves_sigterm_alone_outside_the_command_s_own_process(monkeypatch):
    import threading

    pytest.importorskip("flwr", reason="the `flower` extra is not installed")
    from fedlora_cli import termination
    from fedlora_cli.flower.simulation import _ctrl_c_sets

    def hosts(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, hosts)
    try:
        with _ctrl_c_sets(threading.Event()):
            assert signal.getsignal(signal.SIGTERM) is hosts
            assert (
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            )  # Ctrl-C: an orderly stop
        monkeypatch.setattr(termination, "_enabled", True)
        with _ctrl_c_sets(threading.Event()):
            assert signal.getsignal(signal.SIGTERM) is not hosts
        assert signal.getsignal(signal.SIGTERM) is hosts
    finally:
        signal.signal(signal.SIGTERM, previous)
