"""`rounds --clients K`: one-command experiments that shard the data themselves, with `fedlora shard`'s partitioners."""

from __future__ import annotations

import json

from clitools import one_error_line, run

FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--max-eval-samples", "50"]


def rounds(model, glue, root, name, *extra):
    return run("rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--output-root", root,
               "--run-name", name, "--rounds", "2", *FAST, *extra)  # fmt: skip


def manifests(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("client_*.json"))}


def test_rounds_shards_in_memory_exactly_as_fedlora_shard_does_and_resumes(tiny_model, glue_dir, tmp_path):
    split = [
        "--clients",
        "3",
        "--dirichlet-alpha",
        "0.5",
        "--max-train-samples",
        "300",
        "--data-dir",
        glue_dir,
    ]
    result = rounds(tiny_model, glue_dir, tmp_path, "dir", "--partition", "dirichlet", *split)
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "dir"
    made = run(
        "shard",
        "--task",
        "sst2",
        "--mode",
        "dirichlet",
        "--seed",
        "42",
        "--out",
        tmp_path / "by-hand",
        *split,
    )
    assert made.exit_code == 0, made.stderr
    assert manifests(run_dir / "shards") == manifests(tmp_path / "by-hand")  # the same partitioner, same seed
    summary = json.loads((run_dir / "shards" / "summary.json").read_text())
    assert summary["mode"] == "dirichlet" and summary["params"]["max_train_samples"] == 300
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["partition"]["clients"] == 3 and record["config"]["shards"] == ""
    assert record["shards"] == str((run_dir / "shards").resolve())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2] and history[-1]["clients"] == [1, 2, 3]
    # extend the run: --resume reads the shards it wrote (the same split, checked by fingerprint)
    again = rounds(
        tiny_model, glue_dir, tmp_path, "dir", "--partition", "dirichlet", *split, "--rounds", "3", "--resume"
    )
    assert again.exit_code == 0, again.stderr
    assert manifests(run_dir / "shards") == manifests(tmp_path / "by-hand")
    assert json.loads((run_dir / "final" / "metrics.json").read_text())["rounds"] == 3


def test_shards_made_from_the_first_n_examples_carry_n_to_rounds(tiny_model, glue_dir, tmp_path):
    shards = tmp_path / "k2"
    made = run("shard", "--task", "sst2", "--clients", "2", "--max-train-samples", "120", "--data-dir", glue_dir,
               "--out", shards)  # fmt: skip
    assert made.exit_code == 0, made.stderr
    result = rounds(tiny_model, glue_dir, tmp_path, "n", "--shards", shards, "--rounds", "1")
    assert result.exit_code == 0, result.stderr  # no --max-train-samples needed: summary.json says 120
    record = json.loads((tmp_path / "sst2_tiny-roberta" / "n" / "run.json").read_text())
    assert record["config"]["data"]["max_train_samples"] == 120
    bad = rounds(tiny_model, glue_dir, tmp_path, "m", "--shards", shards, "--max-train-samples", "200")
    one_error_line(bad, 2, "made from the first 120 training examples: use --max-train-samples 120")
    assert not (tmp_path / "sst2_tiny-roberta" / "m").exists()


def test_one_shard_source(tiny_model, glue_dir, tmp_path):
    one_error_line(rounds(tiny_model, glue_dir, tmp_path, "x"), 2, "give --shards DIR")
    one_error_line(
        rounds(tiny_model, glue_dir, tmp_path, "x", "--shards", tmp_path, "--clients", "2"), 2, "not both"
    )
    one_error_line(rounds(tiny_model, glue_dir, tmp_path, "x", "--clients", "2", "--partition", "zipf"), 2,
                   "--partition must be one of")  # fmt: skip
    assert not list(tmp_path.glob("sst2_*"))


def test_resume_run_reads_everything_from_the_run_and_allows_only_what_a_resume_may_change(
    tiny_model, glue_dir, tmp_path
):
    first = rounds(tiny_model, glue_dir, tmp_path, "short", "--clients", "2", "--max-train-samples", "120",
                   "--rounds", "1")  # fmt: skip
    assert first.exit_code == 0, first.stderr
    root = tmp_path / "sst2_tiny-roberta"
    # RUN by name under --output-root: nothing else needed, and --rounds may grow
    more = run("rounds", "--resume", "short", "--output-root", tmp_path, "--rounds", "2")
    assert more.exit_code == 0, more.stderr
    record = json.loads((root / "short" / "run.json").read_text())
    assert [r["changes"] for r in record["resumes"]] == [{"rounds": [1, 2]}]
    assert (
        record["status"] == "complete"
        and json.loads((root / "short" / "final" / "metrics.json").read_text())["rounds"] == 2
    )
    # an option that would make it another experiment is refused, by name, before anything changes
    before = (root / "short" / "history.jsonl").read_text()
    bad = run("rounds", "--resume", root / "short", "--rounds", "3", "--learning-rate", "0.5")
    one_error_line(bad, 2, "train.learning_rate: 0.02 -> 0.5 would make it another experiment")
    assert (root / "short" / "history.jsonl").read_text() == before
    one_error_line(run("rounds", "--resume", "nowhere", "--output-root", tmp_path), 2, "no run nowhere")
