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


@pytest.mark.slow
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
    assert (
        metrics["command"] == "train" and metrics["task"] == "sst2" and metrics["main_metric"] == "accuracy"
    )
    assert metrics["metrics"]["accuracy"] >= 0.9 and metrics["eval"]["examples"] == 200
    assert metrics["train"]["tokens_per_second"] > 0 and metrics["train"]["examples"] == 600
    assert metrics["adapter"] == str(out / "adapter") and len(metrics["adapter_sha256"]) == 64
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "train" and "train" in record["argv"]
    assert record["config"]["lora"] == {
        "alpha": 16.0,
        "dropout": 0.1,
        "init": "default",
        "r": 8,
        "target_modules": ["query", "value"],
        "use_rslora": False,
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
    trained = json.loads((out / "metrics.json").read_text())
    assert saved["command"] == "eval" and saved["main_metric"] == "accuracy"
    assert saved["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert saved["adapter_sha256"] == trained["adapter_sha256"]  # the same adapter, provably
    assert saved["record"]["status"] == "complete" and saved["record"]["argv"][:2] == ["fedlora", "eval"]
    assert saved["record"]["config"]["adapter"] == str(out / "adapter")


def test_baseline_zero_shot_and_full_finetuning(tiny_model, glue_dir, tmp_path):
    zero = run("baseline", "--task", "rte", "--model", tiny_model, "--data-dir", glue_dir, "--no-train",
               "--output-dir", tmp_path / "zero")  # fmt: skip
    assert zero.exit_code == 0, zero.stderr
    metrics = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert metrics["train"] is None and 0.0 <= metrics["metrics"]["accuracy"] <= 1.0
    full = run("baseline", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--epochs", "3",
               "--learning-rate", "1e-3", "--precision", "fp32", "--output-dir", tmp_path / "full")  # fmt: skip
    assert full.exit_code == 0, full.stderr
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] >= 0.9 and metrics["command"] == "baseline"


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
    # nothing half-written: only the record of the failure stays, and it does not block the name
    assert sorted(p.name for p in (tmp_path / "diverged").iterdir()) == ["run.json"]
    assert json.loads((tmp_path / "diverged" / "run.json").read_text())["status"] == "failed"
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
    one_error_line(result, 2, "holds files that fedlora did not write (thesis.tex)")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_download_offline_fails_cleanly():
    result = run("download", "--model", "roberta-base", env={"HF_HUB_OFFLINE": "1"})
    one_error_line(result, 1, "cannot download model 'roberta-base'")
    one_error_line(run("download"), 2, "nothing to download")


def test_debug_variable_shows_the_exception(tmp_path):
    result = run("train", "--task", "sst2", "--model", tmp_path / "none", env={"FEDLORA_DEBUG": "1"})
    assert result.exit_code != 0 and type(result.exception).__name__ == "InputError"


# ---------------------------------------------------------------------------------------------------
# model folders: safetensors only, never remote code


def _model_copy(tiny_model, tmp_path, name: str):
    import shutil

    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


def test_a_model_folder_with_only_pickled_weights_is_refused_with_the_fix(tiny_model, glue_dir, tmp_path):
    folder = _model_copy(tiny_model, tmp_path, "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(
        b"\x80\x04 never unpickled"
    )  # loading it would fail differently
    result = run("eval", "--task", "sst2", "--model", folder, "--data-dir", glue_dir)
    flat = one_error_line(
        result, 2, "has only pickled weights (pytorch_model.bin), which fedlora does not load"
    )
    assert "save_pretrained(" in flat and "model.safetensors" in flat


def test_both_loaders_are_told_safetensors_only_and_no_remote_code(tiny_model, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora_cli.config import ModelSpec
    from fedlora_cli.modeling import load_base_model, load_tokenizer
    from fedlora_cli.tasks import get_task

    seen = []
    for cls in (AutoModelForSequenceClassification, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_tokenizer(ModelSpec(str(tiny_model)))
    load_base_model(ModelSpec(str(tiny_model)), get_task("sst2"), 0)
    assert all(kw["trust_remote_code"] is False for kw in seen)
    assert seen[1]["use_safetensors"] is True


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ({"model_type": "my-encoder", "auto_map": {"AutoModel": "modeling_my.MyModel"}},
         "is not an architecture transformers knows and ships its own code (auto_map); fedlora never runs"),
        ({"model_type": None}, "model_type None is not an architecture transformers knows"),
    ],
)  # fmt: skip
def test_remote_code_is_refused_in_one_line(tiny_model, glue_dir, tmp_path, edit, pattern):
    folder = _model_copy(tiny_model, tmp_path, "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    one_error_line(run("eval", "--task", "sst2", "--model", folder, "--data-dir", glue_dir), 2, pattern)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_a_model_config_of_the_wrong_shape_is_one_line(tiny_model, glue_dir, tmp_path, content):
    folder = _model_copy(tiny_model, tmp_path, "broken")
    (folder / "config.json").write_text(content)
    one_error_line(run("eval", "--task", "sst2", "--model", folder, "--data-dir", glue_dir), 2, "config.json")


# ---------------------------------------------------------------------------------------------------
# every failure is one line: full disks, read-only folders, missing permissions, Ctrl-C


@pytest.mark.parametrize(
    ("code", "cause"),
    [(28, "no space left on device"), (30, "read-only file system"), (13, "permission denied")],
)
def test_a_failing_disk_is_one_line_naming_the_path_and_nothing_half_written(
    tiny_model, glue_dir, tmp_path, monkeypatch, code, cause
):
    import os

    from fedlora_cli import atomic

    real = atomic._new_temp_file

    def failing(path):
        if path.name == "metrics.json":  # the run has been going for a while: fail near the end
            raise OSError(code, os.strerror(code))
        return real(path)

    monkeypatch.setattr(atomic, "_new_temp_file", failing)
    out = tmp_path / "run"
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-train-samples", "32",
                 "--epochs", "1", "--no-eval", "--output-dir", out)  # fmt: skip
    one_error_line(result, 1, f"cannot write {out / 'metrics.json'}: {cause}")
    # nothing half-written: only the run record stays, saying the run failed and why (runs list shows it)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and cause in record["error"]


def test_an_unwritable_output_folder_is_one_line(tiny_model, glue_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # mkdir fails with ENOTDIR, for root too (permissions would not stop root)
    result = run(
        "train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", out
    )
    one_error_line(result, 1, f"cannot write {out}: not a directory")


def test_eval_works_without_a_writable_cache_and_says_so_once(trained, tiny_model, glue_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache cannot be made under a file")
    env = {"FEDLORA_CACHE": str(blocker / "cache")}
    out, _ = trained
    result = run(
        "eval",
        "--task",
        "mnli",
        "--model",
        tiny_model,
        "--data-dir",
        glue_dir,
        "--precision",
        "fp32",
        env=env,
    )  # fmt: skip  (MNLI: two dev splits, two cache writes that fail)
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "cache" in line]
    assert len(notes) == 1 and "cannot be written" in notes[0] and "tokenizing in memory" in notes[0], notes
    assert "accuracy" in result.stdout
    assert not (blocker.parent / "cache").exists()


def test_ctrl_c_is_one_line_exit_130_and_the_unfinished_run_keeps_only_its_record(
    tiny_model, glue_dir, tmp_path, monkeypatch
):
    from fedlora_cli import centralised

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(centralised, "train_model", interrupt)
    out = tmp_path / "run"
    result = run(
        "train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", out
    )
    one_error_line(result, 130, f"interrupted: {out} is marked interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # nothing half-written
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    again = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", out,
                "--max-train-samples", "32", "--epochs", "1", "--no-eval")  # fmt: skip
    assert again.exit_code == 0, again.stderr  # the interrupted run does not block its folder
    monkeypatch.setattr(centralised, "evaluate", interrupt)  # a command without a run folder
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir)
    one_error_line(result, 130, "interrupted")
    assert "Aborted" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# output meant for copying is never hard-wrapped


def test_paths_stay_on_one_line_in_a_narrow_terminal(trained, tiny_model, glue_dir, tmp_path):
    out, _ = trained
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "metrics with spaces [v1].json"
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", out / "adapter",
                 "--max-eval-samples", "8", "--output-json", deep, env={"COLUMNS": "40"})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"metrics: {deep}" in result.stdout.splitlines()
    merged = tmp_path / ("merged-adapter-" * 4)
    result = run("merge", "--adapters", out / "adapter", "--save-adapter", merged, env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.stderr
    assert f"adapter: {merged} (with fuse_manifest.json)" in result.stdout.splitlines()
    result = run("eval", "--task", "mnli", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", out / "adapter",
                 env={"COLUMNS": "40"})  # fmt: skip
    assert any(line.startswith("error: adapter ") and line.endswith("needs 3: it was trained for another task")
               for line in result.stderr.splitlines()), result.stderr  # fmt: skip


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_a_damaged_model_safetensors_is_one_line(tiny_model, glue_dir, tmp_path, damage):
    folder = _model_copy(tiny_model, tmp_path, "damaged")
    weights = folder / "model.safetensors"
    if damage == "text":
        weights.write_text("not a safetensors file")
    else:
        weights.write_bytes(weights.read_bytes()[:20_000])
    result = run("eval", "--task", "sst2", "--model", folder, "--data-dir", glue_dir)
    flat = one_error_line(result, 2, f"--model {folder}: the model weights in the folder are damaged")
    assert "SafetensorError" not in flat and "copy or save the model again" in flat
