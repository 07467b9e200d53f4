"""--report-to: what a run logs to TensorBoard, MLflow and W&B, read back with each tool's own reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from clitools import one_error_line, run

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracked(tiny_model, glue_dir, tmp_path_factory):
    """One small train run that reports to every tracker (64 examples, batch 16: 4 steps; windows of 2)."""
    home = tmp_path_factory.mktemp("tracked")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "tests",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "fedlora-tests"}  # fmt: skip
    wandb = __import__("importlib").util.find_spec("wandb") is not None
    trackers = "tensorboard,mlflow" + (",wandb" if wandb else "")
    out = home / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)  # MLflow puts artifacts in ./mlruns of the working folder unless told otherwise
        result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-train-samples", "64",
                     "--max-eval-samples", "32", "--epochs", "1", "--batch-size", "16", "--precision", "fp32",
                     "--log-every", "2", "--report-to", trackers, "--output-dir", out, env=env)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out, env, json.loads((out / "metrics.json").read_text()), wandb


@pytest.mark.slow
def test_tensorboard_events_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, metrics, _ = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert events.Scalars("eval/accuracy")[0].value == pytest.approx(metrics["metrics"]["accuracy"])
    assert events.Scalars("eval/accuracy")[0].step == 4
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"command": "train"' in config and '"learning_rate": 0.0005' in config


@pytest.mark.slow
def test_mlflow_run_reads_back(tracked):
    from mlflow.tracking import MlflowClient

    out, env, metrics, _ = tracked
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tests")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.tags["fedlora.run_dir"] == str(out.resolve())
    params = found.data.params
    assert params["command"] == "train" and params["lora.r"] == "8" and params["train.batch_size"] == "16"
    assert params["lora.target_modules"] == '["query", "value"]'
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4]
    assert found.data.metrics["eval/accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
    artifacts = sorted(a.path for a in client.list_artifacts(found.info.run_id, "adapter"))
    assert artifacts == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                         "adapter/fedlora_adapter.json"]  # fmt: skip


def _wandb_records(path: Path) -> list:
    """Records of a W&B offline run file: a 7-byte header, then LevelDB-log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2, 3, 4):  # full, first, middle, last
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
        elif length == 0:
            break
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_config_and_metrics(tracked):
    out, _, metrics, wandb = tracked
    if not wandb:
        pytest.skip("wandb is not installed")
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    losses = [(h["train/step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [s for s, _ in losses] == [2, 4]
    accuracy = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert accuracy == [pytest.approx(metrics["metrics"]["accuracy"])]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["command"] == "train" and config["lora"]["r"] == 8


def test_unknown_or_missing_tracker_is_one_line_before_any_work(tmp_path, monkeypatch):
    one_error_line(run("train", "--task", "sst2", "--report-to", "comet"), 2, "'comet' is not a tracker")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    one_error_line(
        run("train", "--task", "sst2", "--report-to", "mlflow"), 2, "pip install 'fedlora[mlflow]'"
    )


def test_a_failing_tracker_is_dropped_not_the_run(tmp_path):
    from fedlora_cli.progress import RecordingProgress, Reporter

    class Broken:
        name = "broken"

        def start_run(self, run_dir, name):
            raise ConnectionError("tracking server unreachable\nretry later")

    silent = RecordingProgress()
    with Reporter(silent, [Broken()]) as never_started:  # e.g. a command that does not report yet
        never_started.log_metrics(1, {"eval/accuracy": 1.0})
    assert silent.messages() == ["warning: --report-to broken: this command reported nothing to trackers"]

    display = RecordingProgress()
    reporter = Reporter(display, [Broken()], log_every=2)
    with reporter:
        reporter.start_run(tmp_path, "x")
        reporter.log_metrics(1, {"train/loss": 1.0})
    assert reporter.trackers == []
    assert display.messages() == [
        "warning: broken: tracking server unreachable; no more logging to it in this run"
    ]


def test_reporter_averages_training_windows_and_numbers_steps_across_bars():
    from fedlora_cli.progress import RecordingProgress, Reporter

    tracker = RecordingProgress()
    reporter = Reporter(RecordingProgress(), [tracker], log_every=2)
    with reporter:
        reporter.start_run(Path("."), "x")
        for bar in ("client-1", "client-2"):  # e.g. two clients of a round: 3 steps each
            reporter.start(bar, bar, 3)
            for loss in (1.0, 2.0, 3.0):
                reporter.log_metrics(0, {"train/loss": loss, "train/learning_rate": 0.1})
            reporter.stop(bar)
        reporter.log_metrics(1, {"round/aggregation_error": 0.5})
    windows = [e for e in tracker.events if e[0] == "metrics"]
    assert windows == [
        ("metrics", 2, {"train/loss": 1.5, "train/learning_rate": 0.1}),
        ("metrics", 3, {"train/loss": 3.0, "train/learning_rate": 0.1}),  # a bar's end flushes its window
        ("metrics", 5, {"train/loss": 1.5, "train/learning_rate": 0.1}),
        ("metrics", 6, {"train/loss": 3.0, "train/learning_rate": 0.1}),
        ("metrics", 1, {"round/aggregation_error": 0.5}),
    ]
    assert tracker.events[-1] == ("close", "complete")


def test_round_rows_become_tracker_metrics():
    from fedlora_cli.progress import RecordingProgress
    from fedlora_cli.trackers import report_round

    row = {"round": 3, "clients": [1, 2], "failed": [], "train_loss": 0.5, "eval": {"accuracy": 0.75, "f1": float("nan")},
           "aggregation": {"error": 0.01}, "bytes_up": 10, "bytes_down": 20, "bytes_written": 30,
           "seconds": {"wall": 1.5}}  # fmt: skip
    progress = RecordingProgress()
    report_round(progress, row)
    assert progress.events == [
        (
            "metrics",
            3,
            {
                "eval/accuracy": 0.75,
                "round/train_loss": 0.5,
                "round/aggregation_error": 0.01,
                "round/bytes_up": 10.0,
                "round/bytes_down": 20.0,
                "round/bytes_written": 30.0,
                "round/clients": 2.0,
                "round/failed_clients": 0.0,
                "round/seconds": 1.5,
            },
        )
    ]  # fmt: skip  (NaN is left out: trackers reject it)
