"""The commands that make runs, by name: their config type and core function (ONE registry), and `rerun`.

`fedlora runs rerun` and anything else that holds a command name and a recorded config (not CLI
options) calls the core through here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora_cli.config import from_dict
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.runs import adapter_digest, read_record, update_record
from fedlora_cli.runs.query import load_run


@dataclass(frozen=True)
class Workflow:
    command: str
    config_type: str  # "module:Class"
    function: str  # "module:function": config -> result, with optional progress= and argv=

    def config_class(self) -> type:
        module, name = self.config_type.split(":")
        return getattr(importlib.import_module(module), name)

    def config_from(self, data: dict[str, Any]) -> Any:
        try:
            return from_dict(self.config_class(), data)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"the recorded {self.command} config cannot be rebuilt ({first_line(e)})"
            ) from None

    def run(self, config: Any, *, progress: Any = None, argv: list[str] | None = None) -> Any:
        module, name = self.function.split(":")
        fn = getattr(importlib.import_module(module), name)
        accepted = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in (("progress", progress), ("argv", argv)) if k in accepted}
        return fn(config, **kwargs)


WORKFLOWS = {
    w.command: w
    for w in (
        Workflow("train", "fedlora_cli.config:TrainConfig", "fedlora_cli.centralised:run_train"),
        Workflow("baseline", "fedlora_cli.config:BaselineConfig", "fedlora_cli.centralised:run_baseline"),
        Workflow("rounds", "fedlora_cli.config:RoundsConfig", "fedlora_cli.engines:run_rounds"),
        Workflow("merge", "fedlora_cli.config:MergeConfig", "fedlora_cli.merging:run_merge"),
    )
}


def workflow(command: str) -> Workflow:
    if command not in WORKFLOWS:
        raise InputError(
            f"a `{command}` run cannot be re-run: only {', '.join(WORKFLOWS)} runs make run folders"
        )
    return WORKFLOWS[command]


def redirect(command: str, config: Any, folder: Path) -> Any:
    """The same config, writing exactly into `folder` (and nowhere else the original wrote)."""
    if command == "merge":
        return replace(config, save_adapter=str(folder), overwrite=False)
    output = replace(config.output, output_dir=str(folder), run_name=None, overwrite=False)
    changes: dict[str, Any] = {"output": output}
    if command == "train":
        changes["adapter_output_dir"] = None  # into the new folder, never over the original's adapter
    if command == "rounds":
        changes["resume"] = False
    return replace(config, **changes)


def next_rerun_folder(folder: Path) -> Path:
    """`<name>-rerun-<n>` beside the run, with the first n that is free."""
    n = 1
    while (folder.parent / f"{folder.name}-rerun-{n}").exists():
        n += 1
    return folder.parent / f"{folder.name}-rerun-{n}"


@contextlib.contextmanager
def working_directory(path: str | None) -> Iterator[None]:
    """Relative paths in a recorded config are relative to where the run was started: go there."""
    previous = os.getcwd()
    if path and Path(path).is_dir():
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@dataclass(frozen=True)
class RerunResult:
    original: Path
    folder: Path
    recorded_sha256: str | None  # the original's final adapter digest (None: it has no adapter)
    new_sha256: str | None

    @property
    def identical(self) -> bool:
        return self.recorded_sha256 is not None and self.recorded_sha256 == self.new_sha256


def _final_digest(folder: Path) -> str | None:
    info = load_run(folder)
    if info.final is not None and info.final.adapter_sha256:
        return info.final.adapter_sha256
    adapter = info.adapter
    return adapter_digest(adapter) if adapter is not None else None


def rerun(folder: str | os.PathLike, *, progress: Any = None, argv: list[str] | None = None) -> RerunResult:
    """Run a recorded config again into `<name>-rerun-<n>` beside the original; report both adapter digests."""
    folder = Path(folder).resolve()
    record = read_record(folder)
    flow = workflow(record.command)
    config = flow.config_from(record.config)
    target = next_rerun_folder(folder)
    config = redirect(record.command, config, target)
    with working_directory(record.cwd):
        flow.run(config, progress=progress, argv=argv)
    if (target / "run.json").is_file():
        update_record(target, rerun_of=str(folder))
    recorded = _final_digest(folder)
    new = _final_digest(target) if target.is_dir() else None
    if new is None and recorded is not None:
        raise FedloraError(f"the re-run in {target} made no final adapter to compare")
    return RerunResult(folder, target, recorded, new)
