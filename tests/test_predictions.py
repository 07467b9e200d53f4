"""`eval --predictions`: per-example predictions of dev and test splits in run_glue.py's format; test splits."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from clitools import one_error_line, run
from fixtures import sentence

MNLI_TEST_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]  # fmt: skip
STSB_TEST_HEADER = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
]


def _tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")


@pytest.fixture(scope="module")
def glue_with_tests(glue_dir, tmp_path_factory) -> Path:
    """The fixture's GLUE folder plus test files as GLUE ships them: a header, an index, no labels."""
    root = tmp_path_factory.mktemp("glue-tests") / "glue"
    shutil.copytree(glue_dir, root)
    rng = random.Random(1)
    _tsv(
        root / "SST-2" / "test.tsv",
        ["index", "sentence"],
        [[i, sentence(rng, i % 2 == 0)] for i in range(30)],
    )
    _tsv(root / "CoLA" / "test.tsv", ["index", "sentence"], [[i, sentence(rng, True)] for i in range(5)])
    for name in ("test_matched", "test_mismatched"):
        rows = [[i, i, f"{i}n", "fiction", "(x)", "(y)", "(X)", "(Y)", sentence(rng, True), sentence(rng, False)]
                for i in range(7)]  # fmt: skip
        _tsv(root / "MNLI" / f"{name}.tsv", MNLI_TEST_HEADER, rows)
    rows = [[i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", sentence(rng, True),
             sentence(rng, True)] for i in range(6)]  # fmt: skip
    _tsv(root / "STS-B" / "test.tsv", STSB_TEST_HEADER, rows)
    return root


def _read(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_test_splits_load_without_labels(glue_with_tests):
    from fedlora_cli.data import load_split

    cola = load_split("cola", "test", data_dir=glue_with_tests)  # header-less train/dev, but a headed test
    assert len(cola) == 5 and not cola.has_labels and set(cola.columns["label"]) == {-1}
    mnli = load_split("mnli", "test_mismatched", data_dir=glue_with_tests)
    assert len(mnli) == 7 and mnli.columns["genre"][0] == "fiction"
    stsb = load_split("stsb", "test", data_dir=glue_with_tests)
    assert stsb.labels.dtype.kind == "f" and not stsb.has_labels
    assert load_split("sst2", "validation", data_dir=glue_with_tests).has_labels


def test_eval_predictions_like_run_glue_and_the_adapters_base_model(tiny_model, glue_with_tests, tmp_path):
    out = tmp_path / "train"
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_with_tests, "--epochs", "3",
                 "--learning-rate", "1e-2", "--max-train-samples", "200", "--precision", "fp32", "--output-dir", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    preds, report = tmp_path / "preds", tmp_path / "eval.json"
    # no --model: the base model recorded in the adapter (adapter_config.json) is used
    result = run("eval", "--task", "sst2", "--data-dir", glue_with_tests, "--adapter", out / "adapter",
                 "--max-eval-samples", "40", "--precision", "fp32", "--predictions", preds, "--output-json", report)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in preds.iterdir()) == ["dev_results_sst2.txt", "predict_results_sst2.txt"]
    test = _read(preds / "predict_results_sst2.txt")
    assert test[0] == ["index", "prediction"] and len(test) == 31  # run_glue's format exactly
    assert [r[0] for r in test[1:]] == [str(i) for i in range(30)]
    assert {r[1] for r in test[1:]} <= {"negative", "positive"}
    dev = _read(preds / "dev_results_sst2.txt")
    assert dev[0] == ["index", "prediction", "label"] and len(dev) == 41
    saved = json.loads(report.read_text())
    agreement = sum(r[1] == r[2] for r in dev[1:]) / 40
    assert agreement == pytest.approx(saved["metrics"]["accuracy"])  # the file says what the metric says
    assert saved["record"]["config"]["model"]["name"] == str(tiny_model)
    assert saved["predictions"] == [
        str(preds / "dev_results_sst2.txt"),
        str(preds / "predict_results_sst2.txt"),
    ]
    one_error_line(run("eval", "--task", "sst2", "--data-dir", glue_with_tests, "--adapter", out / "adapter",
                       "--predictions", preds), 2, "already exists")  # fmt: skip


def test_mnli_gets_a_file_per_split_and_stsb_scores(tiny_model, glue_with_tests, tmp_path):
    common = [
        "--model",
        tiny_model,
        "--data-dir",
        glue_with_tests,
        "--max-eval-samples",
        "9",
        "--precision",
        "fp32",
    ]
    result = run("eval", "--task", "mnli", *common, "--predictions", tmp_path / "mnli")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "mnli").iterdir()) == [
        "dev_results_mnli-mm.txt", "dev_results_mnli.txt", "predict_results_mnli-mm.txt", "predict_results_mnli.txt"]  # fmt: skip
    rows = _read(tmp_path / "mnli" / "predict_results_mnli-mm.txt")
    assert len(rows) == 8 and {r[1] for r in rows[1:]} <= {"entailment", "neutral", "contradiction"}
    result = run("eval", "--task", "stsb", *common, "--predictions", tmp_path / "stsb")
    assert result.exit_code == 0, result.stderr
    rows = _read(tmp_path / "stsb" / "predict_results_stsb.txt")
    assert len(rows) == 7 and all(len(r[1].split(".")[1]) == 3 for r in rows[1:])  # scores, 3 decimals
    dev = _read(tmp_path / "stsb" / "dev_results_stsb.txt")
    assert float(dev[1][2]) > 0  # the gold score


def test_a_missing_local_test_file_is_a_note(tiny_model, glue_dir, tmp_path):
    result = run("eval", "--task", "rte", "--model", tiny_model, "--data-dir", glue_dir, "--max-eval-samples", "8",
                 "--predictions", tmp_path / "p")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "no RTE/test.tsv in --data-dir: no predictions for test" in " ".join(result.stderr.split())
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["dev_results_rte.txt"]
