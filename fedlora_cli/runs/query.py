"""Reading run folders: find them under a root, summarise each one, resolve a name, compare configs.

Everything here only reads, and tolerates what older (or newer) fedlora versions wrote: a run.json
without a status, a metrics file in the first version's shape, keys it does not know.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError
from fedlora_cli.jsonfile import read_json_or_none
from fedlora_cli.runs.history import read_history
from fedlora_cli.runs.record import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    METRICS,
    RUN_RECORD,
    RUNNING,
    FinalMetrics,
    RunRecord,
    flatten,
    read_record,
)

DEFAULT_ROOT = "runs"


def process_alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that wrote a `running` record still runs (only knowable on its own host)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, under another user
    return True


def final_metrics_path(folder: Path) -> Path | None:
    """Where a run keeps its final metrics: `final/metrics.json` (rounds) or `metrics.json`."""
    for candidate in (folder / "final" / METRICS, folder / METRICS):
        if candidate.is_file():
            return candidate
    return None


def read_final_metrics(folder: Path, record: RunRecord | None = None) -> FinalMetrics | None:
    path = final_metrics_path(folder)
    data = read_json_or_none(path) if path is not None else None
    if data is None:
        return None
    command = record.command if record is not None else "?"
    task = _task(record) if record is not None else None
    return FinalMetrics.from_json(data, command=command, task=task)


def status_of(folder: Path, record: RunRecord) -> str:
    """The status a reader should believe.

    Final metrics on disk mean complete: they are written last, and a resumed run removes them before
    it continues (so a record whose writer never set the status still reads right). Otherwise a
    `running` record of a live process is running, and a recorded failure or interruption stands.
    What is left — `running` with no live process (killed with SIGKILL, power loss) or no status at
    all (an older fedlora) — was interrupted.
    """
    if final_metrics_path(folder) is not None:
        return COMPLETE
    if record.status == RUNNING and process_alive(record.host, record.pid):
        return RUNNING
    if record.status in (FAILED, INTERRUPTED):
        return record.status
    return INTERRUPTED


# ---------------------------------------------------------------------------------------------------
# one run, summarised


def _task(record: RunRecord) -> str | None:
    config = record.config
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("task"), str):
        return data["task"]
    task = config.get("task")
    return task if isinstance(task, str) else None


def _model(record: RunRecord) -> str | None:
    model = record.config.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    if not isinstance(name, str) or not name:
        base = record.extra.get("base_model")
        return Path(base.rstrip("/")).name if isinstance(base, str) and base else None
    return Path(name.rstrip("/\\")).name or name


def _method(record: RunRecord) -> str:
    """The method a run used: the federated strategy or aggregation (`+dp` with differential privacy,
    `+bound` with a norm bound); lora / full / zero-shot otherwise."""
    config = record.config
    if record.command in ("rounds", "merge"):
        privacy = config.get("privacy")
        dp = "+dp" if isinstance(privacy, dict) and privacy.get("clip") is not None else ""
        bound = config.get("norm_bound")
        bounded = isinstance(bound, dict) and any(v is not None for v in bound.values())
        return _federated_method(config) + dp + ("+bound" if bounded else "")
    if record.command == "train":
        return "lora"
    if record.command == "baseline":
        return "full" if config.get("do_train", True) else "zero-shot"
    return "-"


def _federated_method(config: dict[str, Any]) -> str:
    for key in ("strategy", "method"):
        value = config.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
    aggregation = config.get("aggregation")
    if isinstance(aggregation, dict) and isinstance(aggregation.get("method"), str):
        return aggregation["method"]
    return "?"


@dataclass(frozen=True)
class RunInfo:
    """One run folder as `fedlora runs` shows it."""

    path: Path
    name: str  # the folder relative to the root it was found under (what `runs show` accepts)
    record: RunRecord
    status: str
    final: FinalMetrics | None
    rounds_done: int | None
    rounds_total: int | None

    @property
    def command(self) -> str:
        return self.record.command

    @property
    def task(self) -> str | None:
        return _task(self.record)

    @property
    def model(self) -> str | None:
        return _model(self.record)

    @property
    def method(self) -> str:
        return _method(self.record)

    @property
    def clients(self) -> int | None:
        sizes = self.record.extra.get("client_sizes")
        if isinstance(sizes, dict | list) and sizes:
            return len(sizes)
        clients = self.record.config.get("clients")
        return clients if isinstance(clients, int) else None

    @property
    def main_metric(self) -> str | None:
        return self.final.main_metric if self.final else None

    @property
    def main_value(self) -> float | None:
        return self.final.main_value if self.final else None

    @property
    def adapter(self) -> Path | None:
        """The run's final adapter folder, if it has one."""
        if self.final is not None and self.final.adapter:
            path = Path(self.final.adapter)
            path = path if path.is_absolute() else Path(self.record.cwd or ".") / path
            if (path / "adapter_config.json").is_file():
                return path
        for candidate in (self.path / "final" / "adapter", self.path / "adapter", self.path):
            if (candidate / "adapter_config.json").is_file():
                return candidate
        return None

    def row(self) -> dict[str, Any]:
        """The `runs list --json` row."""
        return {
            "name": self.name,
            "path": str(self.path),
            "command": self.command,
            "task": self.task,
            "model": self.model,
            "method": self.method,
            "clients": self.clients,
            "rounds_done": self.rounds_done,
            "rounds_total": self.rounds_total,
            "status": self.status,
            "main_metric": self.main_metric,
            "main_value": self.main_value,
            "started": self.record.started,
            "ended": self.record.ended,
            "duration_s": self.record.duration_s or None,
            "error": self.record.error,
        }


def load_run(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> RunInfo:
    folder = Path(folder)
    record = read_record(folder)
    rounds_done = rounds_total = None
    if record.command == "rounds":
        from fedlora_cli.runs import RoundTree

        rounds_done = RoundTree(folder).last_complete_round()
        total = record.effective_config().get("rounds")  # an older record kept the first session's
        rounds_total = total if isinstance(total, int) else None
    name = folder.name
    if root is not None:
        with contextlib.suppress(ValueError):
            name = folder.resolve().relative_to(Path(root).resolve()).as_posix()
    final = read_final_metrics(folder, record)
    return RunInfo(folder, name, record, status_of(folder, record), final, rounds_done, rounds_total)


# ---------------------------------------------------------------------------------------------------
# many runs


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every folder under `root` that holds a run.json, in path order; a run's own subfolders are not
    searched."""
    root = Path(root).expanduser()
    if (root / RUN_RECORD).is_file():
        return [root]
    found: list[Path] = []
    for here, dirs, files in os.walk(root):
        if RUN_RECORD in files:
            found.append(Path(here))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def list_runs(
    root: str | os.PathLike = DEFAULT_ROOT,
    *,
    task: str | None = None,
    status: str | None = None,
    command: str | None = None,
    method: str | None = None,
) -> list[RunInfo]:
    """The runs under `root`, oldest first, filtered. A folder whose run.json cannot be read is skipped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (the runs root; pass another ROOT)")
    runs = []
    for folder in find_runs(root):
        try:
            info = load_run(folder, root)
        except InputError:
            continue
        if task and info.task != task:
            continue
        if status and info.status != status:
            continue
        if command and info.command != command:
            continue
        if method and info.method != method:
            continue
        runs.append(info)
    return sorted(runs, key=lambda r: (r.record.started or "", r.name))


def resolve_run(ref: str | os.PathLike, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """RUN as a folder, a path relative to the root, or a folder name found under the root (unique)."""
    path = Path(ref).expanduser()
    if (path / RUN_RECORD).is_file():
        return path
    root = Path(root).expanduser()
    if (root / path / RUN_RECORD).is_file():
        return root / path
    if root.is_dir():
        matches = [p for p in find_runs(root) if p.name == str(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(p.relative_to(root).as_posix() for p in matches[:4])
            raise InputError(f"run {ref!s} is ambiguous under {root} ({names}): give its path")
    if path.is_dir():
        raise InputError(f"{path} holds no {RUN_RECORD}: is it a fedlora run folder?")
    raise InputError(
        f"no run {ref!s}: give a run folder, or a run name under {root} (see `fedlora runs list`)"
    )


def run_names(root: str | os.PathLike, prefix: str = "") -> list[str]:
    """Names shell completion offers for RUN: paths relative to the root, and unique folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    rel = [p.relative_to(root).as_posix() for p in find_runs(root) if p != root]
    names = sorted(set(rel) | {r.rsplit("/", 1)[-1] for r in rel})
    return [n for n in names if n.startswith(prefix)]


def config_diff(runs: list[RunInfo]) -> dict[str, list[Any]]:
    """Flattened config keys (plus the command) whose values differ between the runs: key -> one value per
    run."""
    flat = [{"command": r.command, **flatten(r.record.config)} for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return {
        k: [f.get(k) for f in flat]
        for k in keys
        if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
    }


def curve_of(info: RunInfo, metric: str | None = None, label: str | None = None) -> Any:
    """A run's learning curve for plots.plot_curves: per round from history.jsonl, else its final value."""
    from fedlora_cli.plots import Curve

    metric = metric or info.main_metric
    rows = read_history(info.path)
    label = label or info.name
    if rows:
        return Curve(
            label, [r.round for r in rows], [r.metric(metric) for r in rows], [r.train_loss for r in rows]
        )
    final = info.final.metrics.get(metric) if info.final is not None and metric else None
    return Curve(label, final=float(final) if isinstance(final, int | float) else None)
