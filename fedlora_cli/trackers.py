"""Experiment trackers (`--report-to tensorboard,mlflow,wandb`): listeners on the same events as the display.

Each implements progress.Tracker and imports its library only when a run starts, so a missing extra
costs nothing until it is asked for (and then fails before any work, with the pip command to run).

- TensorBoard: event files in `<run>/tensorboard/` (`tensorboard --logdir <run>/tensorboard`).
- MLflow: the tracking URI in MLFLOW_TRACKING_URI, else MLflow's own default (MLflow 3: the SQLite store
  `./mlflow.db` of the folder fedlora runs in, artifacts in `./mlruns/`; `mlflow ui` started there shows
  them); experiment
  MLFLOW_EXPERIMENT_NAME, else "fedlora". Parameters (the flattened config), metrics, the final adapter
  as an artifact, and the run's end status.
- Weights & Biases: project WANDB_PROJECT, else "fedlora"; files under `<run>/wandb/`; WANDB_MODE=offline
  works without an account (`wandb sync` later).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError
from fedlora_cli.runs.record import COMPLETE, FAILED, INTERRUPTED, flatten

TRACKERS = ("tensorboard", "mlflow", "wandb")
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--report-to tensorboard,mlflow` or repeated; `none` (HF's spelling) means no tracker."""
    names: list[str] = []
    for value in values or ():
        for part in value.split(","):
            name = part.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"--report-to {unknown[0]!r} is not a tracker: choose from {', '.join(TRACKERS)}")
    return tuple(names)


def make_trackers(values: Sequence[str] | None) -> list[Any]:
    """The trackers named by `--report-to`, each checked to be installed (before any work starts)."""
    import importlib.util

    trackers = []
    for name in parse_report_to(values):
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise InputError(f"--report-to {name} needs the {name} package: pip install 'fedlora[{name}]'")
        trackers.append(
            {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}[name]()
        )
    return trackers


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """What trackers get for one round of `rounds`, from its history row (step = the round number)."""
    out: dict[str, Any] = {}
    for key, value in (row.get("eval") or {}).items():
        out[f"eval/{key}"] = value
    aggregation = row.get("aggregation") or {}
    seconds = row.get("seconds") or {}
    out.update(
        {
            "round/train_loss": row.get("train_loss"),
            "round/aggregation_error": aggregation.get("error"),
            "round/bytes_up": row.get("bytes_up"),
            "round/bytes_down": row.get("bytes_down"),
            "round/bytes_written": row.get("bytes_written"),
            "round/clients": len(row.get("clients") or []),
            "round/failed_clients": len(row.get("failed") or []),
            "round/seconds": seconds.get("wall"),
        }
    )
    return _finite(out)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def start_run(self, run_dir: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_params(self, params: dict[str, Any]) -> None:
        text = json.dumps(params, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", f"```\n{text}\n```")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in _finite(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        pass  # TensorBoard keeps scalars and text, not files

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


_MLFLOW_STATUS = {COMPLETE: "FINISHED", FAILED: "FAILED", INTERRUPTED: "KILLED"}
_MLFLOW_PARAM_LIMIT = 6000  # characters MLflow stores per parameter value


class MLflowTracker:
    name = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.uri: str | None = None

    def start_run(self, run_dir: Path, name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fedlora"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(experiment_name)
        )
        run = self.client.create_run(
            experiment_id, run_name=name, tags={"fedlora.run_dir": str(Path(run_dir).resolve())}
        )
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [
            Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in sorted(flat.items())
        ]
        items = [Param(p.key, p.value[:_MLFLOW_PARAM_LIMIT]) for p in items]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step) for k, v in _finite(metrics).items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=name)

    def close(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(status, "FAILED"))
            self.client = None


class WandbTracker:
    name = "wandb"

    def __init__(self) -> None:
        self.run: Any = None
        self._axes: set[str] = set()

    def start_run(self, run_dir: Path, name: str) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT") or "fedlora"
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), reinit="create_new")

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        # W&B wants one increasing step per run, but training steps and rounds count differently: each
        # metric family (`train/`, `eval/`, `round/`) gets its own x axis, `<family>/step`.
        values = _finite(metrics)
        for family in {k.split("/", 1)[0] for k in values if "/" in k}:
            if family not in self._axes:
                self.run.define_metric(f"{family}/step")
                self.run.define_metric(f"{family}/*", step_metric=f"{family}/step")
                self._axes.add(family)
            values[f"{family}/step"] = step
        self.run.log(values)

    def log_artifact(self, path: Path, name: str) -> None:
        import wandb

        label = re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.run.name or self.run.id}-{name}")
        artifact = wandb.Artifact(name=label, type="model")
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == COMPLETE else 1)
            self.run = None


def report_round(progress: Any, row: dict[str, Any]) -> None:
    """Send one complete round's history row to the trackers, at step = its round number.

    The round loop calls it right after `RoundRecorder.complete_round(row)`, in every engine; a progress
    object without trackers ignores it.
    """
    from fedlora_cli.progress import as_tracker

    as_tracker(progress).log_metrics(int(row["round"]), round_metrics(row))
