"""Comparisons researchers can trust: a held-out validation split carved before sharding chooses rounds and
epochs (--select best, --early-stop); the dev split is only reported; learning-rate schedules span rounds."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run

from fedlora_cli.holdout import carve, validation_size
from fedlora_cli.selection import Selection
from fedlora_cli.training import lr_factor, schedule_window

FAST = ["--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32"]


# ---------------------------------------------------------------------------------------------------
# the carve and the choice, as pure functions


def test_carve_is_stratified_exact_seeded_and_disjoint():
    keys = np.array([0] * 300 + [1] * 100 + [2] * 20)
    held = carve(keys, 42, seed=3)
    assert len(held.validation) == 42 and len(held.train) == 420 - 42
    assert not set(held.validation) & set(held.train)
    assert sorted([*held.validation, *held.train]) == list(range(420))
    # each stratum in proportion: 30, 10, 2
    assert np.bincount(keys[held.validation]).tolist() == [30, 10, 2]
    assert np.array_equal(carve(keys, 42, seed=3).validation, held.validation)  # seeded
    assert not np.array_equal(carve(keys, 42, seed=4).validation, held.validation)
    # uneven shares: the remainders go to the largest ones, and the total stays exact
    odd = carve(np.array([0] * 7 + [1] * 5 + [2] * 3), 4, seed=0)
    assert len(odd.validation) == 4


def test_validation_size_refuses_what_leaves_nothing():
    assert validation_size(600, 0.1, None) == 60 and validation_size(600, None, 25) == 25
    assert validation_size(600, None, None) == 0
    with pytest.raises(Exception, match="keep at least one to train on"):
        validation_size(10, None, 10)


def test_selection_keeps_the_best_and_stops_after_patience():
    sel = Selection("best", "accuracy", patience=2)
    for step, value in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7)]:
        sel.observe(step, {"accuracy": value})
    assert sel.chosen == 2 and sel.stop  # 3 and 4 did not beat 0.7 (a tie is not better)
    last = Selection("last", "accuracy")
    last.observe(1, {"accuracy": 0.9})
    last.observe(2, {"accuracy": 0.1})
    assert last.chosen == 2 and not last.stop
    nan = Selection("best", "pearson")
    nan.observe(1, {"pearson": math.nan})
    nan.observe(2, {"pearson": -0.2})
    assert nan.chosen == 2  # a constant predictor's NaN correlation never wins


def test_lr_shapes_and_a_global_window_is_one_monotone_schedule():
    total, warm = 100, 10
    linear = [lr_factor("linear", s, total, warm) for s in range(total)]
    cosine = [lr_factor("cosine", s, total, warm) for s in range(total)]
    constant = [lr_factor("constant", s, total, warm) for s in range(total)]
    assert linear[:warm] == cosine[:warm] == constant[:warm]  # the same warm-up
    assert all(a >= b for a, b in zip(linear[warm:], linear[warm + 1 :], strict=False))
    assert all(a >= b for a, b in zip(cosine[warm:], cosine[warm + 1 :], strict=False))
    assert constant[warm:] == [1.0] * (total - warm)
    assert cosine[warm] == 1.0 and cosine[-1] < 0.01
    # round t of 5, 20 steps per turn: the t-th slice of one schedule of 100 steps
    windows = [schedule_window("global-linear", t, 5, 20) for t in range(1, 6)]
    assert windows == [(0, 100), (20, 100), (40, 100), (60, 100), (80, 100)]
    assert schedule_window("per-turn", 3, 5, 20) is None


# ---------------------------------------------------------------------------------------------------
# end to end on the tiny model


def permuted_dev(glue_dir: Path, target: Path) -> Path:
    """The same GLUE folder with SST-2's dev labels shuffled: scores change, choices must not."""
    shutil.copytree(glue_dir, target)
    path = target / "SST-2" / "dev.tsv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    labels = [r[1] for r in body]
    np.random.default_rng(0).shuffle(labels)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[r[0], label] for r, label in zip(body, labels, strict=True)])
    return target


def rounds_cli(model, glue, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--clients", "3",
            "--output-root", root, "--run-name", name, "--rounds", "4", "--local-epochs", "3", *FAST,
            "--validation-fraction", "0.15", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def selected_runs(tiny_model, glue_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("selected")
    shuffled = permuted_dev(glue_dir, tmp_path_factory.mktemp("permuted") / "glue")
    out = {}
    for name, glue in (("real", glue_dir), ("permuted", shuffled)):
        result = run(*rounds_cli(tiny_model, glue, root, name, "--select", "best", "--early-stop", "2"))
        assert result.exit_code == 0, result.stderr
        out[name] = root / "sst2_tiny-roberta" / name
    return out


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_select_best_keeps_the_round_chosen_on_validation(selected_runs):
    run_dir = selected_runs["real"]
    rows = history(run_dir)
    scored = [(r["round"], r["validation"]["accuracy"]) for r in rows if r["round"] >= 1]
    best_round = max(scored, key=lambda p: (p[1], -p[0]))[0]  # the first of the highest
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["selected"]["round"] == best_round and metrics["selected"]["rule"] == "best"
    assert metrics["metrics"]["accuracy"] == rows[best_round]["eval"]["accuracy"]  # its dev score is reported
    assert metrics["last"]["round"] == rows[-1]["round"]
    assert metrics["adapter"].endswith("best/adapter") and (run_dir / "best" / "adapter").is_dir()
    # best/ is that round's global adapter (svd exports it as it is)
    a = (
        run_dir / f"round_{best_round:03d}" / "global" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert (run_dir / "best" / "adapter" / "adapter_model.safetensors").read_bytes() == a


def test_validation_is_held_out_of_every_client(selected_runs, glue_dir):
    from fedlora_cli.data import load_split
    from fedlora_cli.holdout import holdout_of
    from fedlora_cli.sharding import read_shards

    run_dir = selected_runs["real"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["validation"]["examples"] == 90  # 15 % of 600
    shards = read_shards(run_dir / "shards")
    held = holdout_of(load_split("sst2", "train", data_dir=str(glue_dir)), 0.15, None, 0)
    assert held.digest == record["validation"]["sha256"]
    for client in shards.clients:
        assert not set(client.tolist()) & set(held.validation.tolist())
    assert sum(len(c) for c in shards.clients) == 600 - 90


def test_permuting_dev_labels_changes_no_choice(selected_runs):
    """Nothing that chooses reads the dev split: the same rounds are chosen and stopped at."""
    real, permuted = history(selected_runs["real"]), history(selected_runs["permuted"])
    assert [r["round"] for r in real] == [r["round"] for r in permuted]
    assert [r["validation"] for r in real] == [r["validation"] for r in permuted]
    assert [r["eval"] for r in real] != [r["eval"] for r in permuted]  # the dev scores did change
    chosen = [json.loads((selected_runs[k] / "final" / "metrics.json").read_text())["selected"]["round"]
              for k in ("real", "permuted")]  # fmt: skip
    assert chosen[0] == chosen[1]


def test_early_stop_ends_the_run_after_patience(tiny_model, glue_dir, tmp_path, monkeypatch):
    """Validation scores that never improve after round 1: --early-stop 2 stops after round 3."""
    import fedlora_cli.federation.driver as driver

    real = driver.RoundDriver.evaluate_current
    calls = {"n": 0}

    def flat_validation(self, dev=True):
        dev, val = real(self, dev)
        calls["n"] += 1
        score = 0.9 if calls["n"] == 2 else 0.5  # round 0, then round 1 best, then worse
        return dev, dataclasses.replace(val, metrics={**val.metrics, "accuracy": score})

    monkeypatch.setattr(driver.RoundDriver, "evaluate_current", flat_validation)
    result = run(*rounds_cli(tiny_model, glue_dir, tmp_path, "stop", "--rounds", "6", "--early-stop", "2",
                             "--select", "best"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "stop"
    assert [r["round"] for r in history(run_dir)] == [0, 1, 2, 3]
    assert "--early-stop 2" in result.stdout + result.stderr
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["selected"]["round"] == 1 and "stopped" in metrics


def test_global_schedule_decays_once_across_rounds(tiny_model, glue_dir, tmp_path):
    result = run(*rounds_cli(tiny_model, glue_dir, tmp_path, "global", "--lr-schedule", "global-linear",
                             "--warmup-ratio", "0"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = [r for r in history(tmp_path / "sst2_tiny-roberta" / "global") if r["round"] >= 1]
    ranges = [r["learning_rate_range"] for r in rows]
    flat = [v for pair in ranges for v in pair]
    assert all(a >= b for a, b in zip(flat, flat[1:], strict=False)), ranges  # one monotone decay
    assert ranges[0][0] == pytest.approx(2e-2) and ranges[-1][1] < 2e-2 / 4
    per_turn = run(*rounds_cli(tiny_model, glue_dir, tmp_path, "turn", "--warmup-ratio", "0"))
    turn_rows = [r for r in history(tmp_path / "sst2_tiny-roberta" / "turn") if r["round"] >= 1]
    assert per_turn.exit_code == 0
    assert all(r["learning_rate_range"][0] == pytest.approx(2e-2) for r in turn_rows)  # restarts every turn
    # a global schedule spans the run's length: --resume may not change it
    bad = run("rounds", "--resume", str(tmp_path / "sst2_tiny-roberta" / "global"), "--rounds", "6")
    one_error_line(bad, 2, "spans its 4 rounds")


def test_train_select_best_keeps_the_best_epoch(tiny_model, glue_dir, tmp_path):
    args = ["train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-root", tmp_path,
            "--epochs", "3", *FAST, "--validation-examples", "100", "--select", "best"]  # fmt: skip
    result = run(*args, "--run-name", "t")
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "t"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    best = max(epochs, key=lambda e: (e["validation"]["accuracy"], -e["epoch"]))
    assert metrics["selected"]["epoch"] == best["epoch"]
    assert metrics["metrics"]["accuracy"] == best["dev"]["accuracy"]
    assert metrics["adapter"].endswith("best/adapter") and (run_dir / "adapter").is_dir()
    assert metrics["train"]["examples"] == 500  # the held-out 100 were not trained on


def test_choosing_without_a_validation_split_is_refused(tiny_model, glue_dir, tmp_path):
    base = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-root", tmp_path]
    one_error_line(run("train", *base, "--select", "best"), 2, "give --validation-fraction")
    one_error_line(run("rounds", *base, "--clients", "2", "--early-stop", "3"), 2, "never the dev split")
    one_error_line(
        run("train", *base, "--lr-schedule", "global-linear"), 2, "one of linear, cosine, constant"
    )
    one_error_line(run("baseline", *base, "--lr-schedule", "per-turn"), 2, "one of linear, cosine, constant")
    from fedlora_cli.config import DataSpec, TrainConfig, TrainSpec

    with pytest.raises(ValueError, match="does not apply to `fedlora train`"):
        TrainConfig(DataSpec("sst2"), train=TrainSpec(lr_schedule="global-linear"))


def test_shards_made_with_the_same_holdout_are_accepted_others_refused(tiny_model, glue_dir, tmp_path):
    made = run("shard", "--task", "sst2", "--clients", "3", "--data-dir", glue_dir, "--out", tmp_path / "held",
               "--validation-fraction", "0.15")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    summary = json.loads((tmp_path / "held" / "summary.json").read_text())
    assert sum(summary["size_per_client"]) == 510 and summary["params"]["validation"]["examples"] == 90
    plain = run(
        "shard", "--task", "sst2", "--clients", "3", "--data-dir", glue_dir, "--out", tmp_path / "plain"
    )
    assert plain.exit_code == 0
    base = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-root", tmp_path,
            "--rounds", "1", *FAST, "--validation-fraction", "0.15"]  # fmt: skip
    one_error_line(
        run(*base, "--shards", tmp_path / "plain", "--run-name", "p"), 2, "hold held-out validation"
    )
    ok = run(*base, "--shards", tmp_path / "held", "--run-name", "h")
    assert ok.exit_code == 0, ok.stderr


def test_dev_scored_only_at_the_end_reports_what_every_round_scoring_reports(tiny_model, glue_dir, tmp_path):
    """--no-dev-each-round: rounds are scored on validation only (it chooses), and the dev split once for the
    selected and the last round — the same numbers as scoring dev every round, for less work."""
    both = {}
    for name, extra in (("each", []), ("end", ["--no-dev-each-round"])):
        result = run(
            *rounds_cli(tiny_model, glue_dir, tmp_path, name, "--rounds", "3", "--select", "best", *extra)
        )
        assert result.exit_code == 0, result.stderr
        both[name] = tmp_path / "sst2_tiny-roberta" / name
    each, end = (json.loads((both[k] / "final" / "metrics.json").read_text()) for k in ("each", "end"))
    assert end["selected"]["round"] == each["selected"]["round"]
    assert end["metrics"] == each["metrics"] and end["last"]["dev"] == each["last"]["dev"]
    rows = history(both["end"])
    assert [r["eval"] is None for r in rows] == [True, True, True, False]  # dev only after the last round
    assert all(r["validation"] is not None for r in rows)
    # a sweep's figure draws such runs on the validation split, the others on dev
    from fedlora_cli.runs.history import read_history
    from fedlora_cli.sweeps.figures import dev_each_round

    assert dev_each_round([read_history(both["each"])], "accuracy")
    assert not dev_each_round([read_history(both["each"]), read_history(both["end"])], "accuracy")
    one_error_line(run("rounds", "--task", "sst2", "--shards", tmp_path, "--no-dev-each-round"), 2,
                   "--no-dev-each-round scores only the validation split")  # fmt: skip
