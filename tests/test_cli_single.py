"""The single-machine commands end to end through the CLI: train, eval, baseline, download, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from clitools import one_error_line, run

FAST = ["--epochs", "5", "--learning-rate", "1e-2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tiny_model, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    result = run(
        "train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, *FAST, "--output-dir", out
    )
    assert result.exit_code == 0, result.stderr
    return out, result


def test_help_is_fast_and_imports_no_torch():
    heavy = ("torch", "transformers", "peft", "datasets", "flwr", "ray", "matplotlib")
    code = f"import sys, fedlora_cli.app; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedlora_cli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0
    for name in ("download", "train", "baseline", "eval"):
        assert name in proc.stdout
    assert elapsed < 2.0  # ~0.2 s here; generous for slow CI disks


def test_training_on_local_glue_files_imports_neither_datasets_nor_sklearn(tiny_model, glue_dir, tmp_path):
    """The local-GLUE path needs neither: each costs seconds of start-up and ~100 MB (pandas, pyarrow)."""
    heavy = ("datasets", "sklearn", "pandas", "pyarrow")
    args = ["train", "--task", "sst2", "--model", str(tiny_model), "--data-dir", str(glue_dir), "--epochs", "1",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code = (
        f"import sys\nfrom fedlora_cli.app import app\ntry:\n    app({args!r})\nexcept SystemExit as e:\n"
        f"    assert not e.code, e.code\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_train_writes_exactly_the_run_and_learns(trained):
    out, result = trained
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/fedlora_adapter.json",
        "metrics.json", "run.json",
    ]  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] >= 0.9
    assert metrics["train"]["tokens_per_second"] > 0 and metrics["train"]["examples"] == 600
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "train" and "train" in record["argv"]
    assert record["config"]["lora"] == {
        "alpha": 16.0,
        "dropout": 0.1,
        "r": 8,
        "target_modules": ["query", "value"],
    }
    assert {"fedlora", "torch", "transformers", "peft"} <= set(record["versions"])
    assert record["seeds"] == {"seed": 42} and len(record["data_fingerprints"]["train"]) == 64
    assert "accuracy" in " ".join(result.stdout.split())


def test_adapter_opens_with_plain_peft_and_predicts_like_fedlora_eval(trained, tiny_model, glue_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora_cli.centralised import run_eval
    from fedlora_cli.config import DataSpec, EvalConfig, ModelSpec
    from fedlora_cli.evaluation import predict
    from fedlora_cli.features import load_task_data
    from fedlora_cli.modeling import load_tokenizer

    out, _ = trained
    ours = run_eval(EvalConfig(DataSpec("sst2", str(glue_dir)), ModelSpec(str(tiny_model)), str(out / "adapter"),
                               precision="fp32"))  # fmt: skip
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(out / "adapter"))
    data = load_task_data(
        DataSpec("sst2", str(glue_dir)), load_tokenizer(ModelSpec(str(tiny_model))), train=False
    )
    logits, _, _ = predict(plain, data.evals["validation"], 64, torch.device("cpu"), "fp32")
    assert np.array_equal(logits.argmax(1), ours.evaluation.predictions["validation"])
    assert ours.metrics["accuracy"] >= 0.9


def test_eval_command_prints_metrics_and_writes_json(trained, tiny_model, glue_dir, tmp_path):
    out, _ = trained
    target = tmp_path / "m.json"
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", out / "adapter",
                 "--precision", "fp32", "--output-json", target)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "accuracy" in result.stdout
    saved = json.loads(target.read_text())
    trained_metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert saved["accuracy"] == pytest.approx(trained_metrics["accuracy"])


def test_baseline_zero_shot_and_full_finetuning(tiny_model, glue_dir, tmp_path):
    zero = run("baseline", "--task", "rte", "--model", tiny_model, "--data-dir", glue_dir, "--no-train",
               "--output-dir", tmp_path / "zero")  # fmt: skip
    assert zero.exit_code == 0, zero.stderr
    metrics = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert "train" not in metrics and 0.0 <= metrics["eval"]["accuracy"] <= 1.0
    full = run("baseline", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--epochs", "3",
               "--learning-rate", "1e-3", "--precision", "fp32", "--output-dir", tmp_path / "full")  # fmt: skip
    assert full.exit_code == 0, full.stderr
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] >= 0.9


def test_reference_flags_are_accepted(tiny_model, glue_dir, tmp_path):
    result = run(
        "train", "--task_name", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--lora_r", "4",
        "--lora_alpha", "8", "--target_modules", "query", "value", "--per_device_train_batch_size", "16",
        "--num_train_epochs", "1", "--learning_rate", "1e-2", "--do_train", "--do_eval", "--max_train_samples", "64",
        "--output_dir", tmp_path / "legacy",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "legacy" / "run.json").read_text())["config"]
    assert config["lora"]["r"] == 4 and config["lora"]["alpha"] == 8.0
    assert config["lora"]["target_modules"] == ["query", "value"]
    assert config["train"]["batch_size"] == 16 and config["train"]["epochs"] == 1.0
    assert config["data"]["max_train_samples"] == 64


def test_model_size_alias_resolves_to_roberta(tmp_path, glue_dir):
    # roberta-base is not in this machine's cache: the error must name the download command
    result = run("train", "--task", "sst2", "--model_size", "base", "--data-dir", glue_dir, "--output-dir", tmp_path / "x",
                 env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    one_error_line(result, 1, "fedlora download --model roberta-base")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "code", "pattern"),
    [
        (["--task", "sst3"], 2, "unknown task 'sst3'"),
        (["--task", "sst2", "--lora-r", "0"], 2, "--lora-r must be >= 1"),
        (["--task", "sst2", "--model", "./no/such/model"], 2, "no such folder"),
        (["--task", "sst2", "--data-dir", "/no/such/dir"], 2, "does not exist"),
        (["--task", "mnli"], 2, "MNLI/train.tsv not found"),  # the generated dir has MNLI; see below
    ],
)
def test_bad_input_is_one_line(args, code, pattern, tiny_model, glue_dir, tmp_path):
    defaults = {"--model": str(tiny_model), "--data-dir": str(tmp_path if "mnli" in args else glue_dir)}
    full = list(args) + [x for k, v in defaults.items() if k not in args for x in (k, v)]
    result = run("train", *full, "--output-dir", tmp_path / "out")
    one_error_line(result, code, pattern)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_label_count_or_model_is_refused(trained, tiny_model, glue_dir, tmp_path):
    from fixtures import build_tokenizer_and_model

    out, _ = trained
    result = run(
        "eval", "--task", "mnli", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", out / "adapter"
    )
    one_error_line(result, 2, "needs 3")
    wide = build_tokenizer_and_model(tmp_path / "wide", hidden=32)
    result = run(
        "eval", "--task", "sst2", "--model", wide, "--data-dir", glue_dir, "--adapter", out / "adapter"
    )
    one_error_line(result, 2, "another base model")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["qkv_proj"]  # a module this encoder does not have
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    (foreign / "adapter_model.safetensors").write_bytes(
        (out / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    result = run(
        "eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", foreign
    )
    one_error_line(result, 2, "cannot attach LoRA to --target-modules qkv_proj")
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((out / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", bad)
    one_error_line(result, 2, "pickled")


def test_failed_training_leaves_nothing_and_existing_runs_are_kept(
    tiny_model, glue_dir, tmp_path, trained, monkeypatch
):
    from fedlora_cli import centralised
    from fedlora_cli.errors import FedloraError

    def fail(*args, **kwargs):
        raise FedloraError("training diverged at step 3 (loss nan): lower --learning-rate")

    with monkeypatch.context() as m:
        m.setattr(centralised, "train_model", fail)  # fails after the run folder was claimed
        result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir,
                     "--output-dir", tmp_path / "diverged")  # fmt: skip
    one_error_line(result, 1, "diverged")
    assert not (tmp_path / "diverged").exists()
    out, _ = trained
    before = (out / "run.json").read_text()
    result = run(
        "train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", out
    )
    one_error_line(result, 2, "--overwrite")
    assert (out / "run.json").read_text() == before
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", precious,
                 "--overwrite")  # fmt: skip
    one_error_line(result, 2, "not a fedlora run")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_download_offline_fails_cleanly():
    result = run("download", "--model", "roberta-base", env={"HF_HUB_OFFLINE": "1"})
    one_error_line(result, 1, "cannot download model 'roberta-base'")
    one_error_line(run("download"), 2, "nothing to download")


def test_debug_variable_shows_the_exception(tmp_path):
    result = run("train", "--task", "sst2", "--model", tmp_path / "none", env={"FEDLORA_DEBUG": "1"})
    assert result.exit_code != 0 and type(result.exception).__name__ == "InputError"
