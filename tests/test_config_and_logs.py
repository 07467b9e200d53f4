"""`--config FILE.toml` (command line > file > defaults) and logs people read later (plain lines off a terminal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run

QUICK = ["--max-train-samples", "64", "--max-eval-samples", "32", "--precision", "fp32"]


def test_config_file_then_command_line_precedence(tiny_model, glue_dir, tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(
        f'task = "sst2"\nmodel = "{tiny_model}"\ndata-dir = "{glue_dir}"\n'
        "learning-rate = 2e-3\nlora-r = 4\nepochs = 1\nmax_train_samples = 64\n"  # underscores work too
        'target-modules = ["query"]\neval = false\nmax-eval-samples = 32\nprecision = "fp32"\n'
    )
    out = tmp_path / "run"
    result = run("train", "--config", config, "--lora-r", "2", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "run.json").read_text())
    cfg = record["config"]
    assert cfg["lora"]["r"] == 2  # the command line wins
    assert cfg["train"]["learning_rate"] == 2e-3 and cfg["lora"]["target_modules"] == ["query"]  # the file
    assert cfg["do_eval"] is False and cfg["data"]["max_train_samples"] == 64
    assert cfg["train"]["batch_size"] == 32  # neither: the default
    assert record["argv"][2:4] == ["--config", str(config)]
    # the recorded config is the resolved one: a re-run gives the same adapter without the file
    config.unlink()
    result = run("runs", "rerun", out, "--verify")
    assert result.exit_code == 0, result.stderr


def test_config_file_errors_are_one_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "sst2"\nlearning-rat = 1e-3\n')
    one_error_line(run("train", "--config", bad), 2, "unknown option 'learning-rat' for `fedlora train`")
    bad.write_text('task = "sst2"\n[train]\nepochs = 2\n')
    one_error_line(run("train", "--config", bad), 2, "'train' is a table")
    bad.write_text("task = sst2\n")
    one_error_line(run("train", "--config", bad), 2, "is not valid TOML")
    one_error_line(run("train", "--config", tmp_path / "none.toml"), 2, "no such file")
    shard = tmp_path / "shard.toml"  # every command takes --config; keys are that command's options
    shard.write_text("clients = 3\nrounds = 2\n")
    one_error_line(
        run("shard", "--task", "sst2", "--config", shard), 2, "unknown option 'rounds' for `fedlora shard`"
    )


@pytest.mark.slow
def test_plain_logs_off_a_terminal_have_no_control_codes_and_whole_paths(tiny_model, glue_dir, tmp_path):
    out = tmp_path / ("a-rather-long-folder-name-for-a-narrow-terminal-" * 3) / "run"
    env = {**os.environ, "COLUMNS": "40", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora_cli", "train", "--task", "sst2", "--model", str(tiny_model),
         "--data-dir", str(glue_dir), *QUICK, "--epochs", "2", "--batch-size", "16", "--log-every", "3",
         "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout and "\r" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    steps = [line for line in lines if line.startswith("training: step ")]
    # 64 examples / 16 = 4 steps per epoch, 8 steps: windows end at steps 3 and 6, and the rest at 8
    assert [s.split(" · ")[0] for s in steps] == [
        "training: step 3/8",
        "training: step 6/8",
        "training: step 8/8",
    ]
    assert all(" · loss " in s and " · lr " in s for s in steps)
    epochs = [line for line in lines if line.startswith("training: epoch ")]
    assert [e.split(" · ")[0] for e in epochs] == ["training: epoch 1/2", "training: epoch 2/2"]
    assert any(line.startswith("training: done 8/8 in ") for line in lines)
    assert f"run: {out}" in proc.stdout.splitlines()  # one line, however narrow the terminal
    assert f"adapter: {out / 'adapter'}" in proc.stdout.splitlines()


def test_rounds_log_one_plain_line_per_round(tiny_model, glue_dir, tmp_path):
    from test_rounds import write_manifests

    order = np.random.default_rng(0).permutation(64).tolist()
    shards = write_manifests(tmp_path / "shards", [order[:32], order[32:]], total=64)
    result = run("rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
                 "--rounds", "2", *QUICK, "--output-root", tmp_path, "--run-name", "fed", "--log-every", "0")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rounds = [line for line in result.stderr.splitlines() if line.startswith("rounds: ")]
    assert [r.split(" · ")[0] for r in rounds[:2]] == ["rounds: 1/2", "rounds: 2/2"]
    assert len(rounds) == 3 and rounds[2].startswith("rounds: done 2/2 in ")
    assert "accuracy" in rounds[0] and "agg err" in rounds[0]
    assert not any(" step " in line for line in result.stderr.splitlines())  # --log-every 0: no step lines


def test_a_config_that_is_not_a_small_regular_file_is_refused_without_reading_it(tmp_path):
    one_error_line(run("train", "--config", "/dev/zero"), 2, "/dev/zero is not a regular file")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    one_error_line(run("train", "--config", fifo), 2, "is not a regular file")
    huge = tmp_path / "huge.toml"
    huge.write_text("# padding\n" * 200_000)  # 2 MB of valid TOML
    one_error_line(run("train", "--config", huge), 2, "is larger than 1024 KiB")
    one_error_line(run("train", "--config", tmp_path), 2, "is a folder; give a .toml file")
    one_error_line(run("sweep", "/dev/zero"), 2, "sweep /dev/zero is not a regular file")


def test_summary_tables_in_a_log_file_carry_whole_numbers(capsys, monkeypatch):
    """Off a terminal Rich would fit a table into 80 columns and cut its cells (`accu…`, `0.48…`)."""
    from types import SimpleNamespace

    from fedlora_cli.commands.rounds import show_rounds

    monkeypatch.setenv("COLUMNS", "80")
    row = SimpleNamespace(round=1, clients=[1, 2, 3], failed=[], eval={"accuracy": 0.481234},
                          aggregation={"error": 0.123456, "privacy": {"epsilon": 12.3456, "clipped": 3}},
                          train_loss=0.693147, bytes_down=123_456_789, bytes_up=987_654_321, seconds={"wall": 1234.5},
                          validation=None)  # fmt: skip
    result = SimpleNamespace(clients=3, history=[row], main_metric="accuracy", stopped=None,
                             final_metrics={"accuracy": 0.481234}, resumed_after=None,
                             final_adapter=Path("/r/final/adapter"), run_dir=Path("/r"), selected=None)  # fmt: skip
    show_rounds(result)
    out = capsys.readouterr().out
    assert "…" not in out, out
    for whole in ("accuracy", "train loss", "agg error", "clipped", "0.4812", "0.6931", "0.1235", "12.3", "3/3",
                  "117.74", "941.90", "1234.5"):  # fmt: skip
        assert whole in out, (whole, out)
