"""The commands that make runs, by name: their config type and core function (ONE registry), and `rerun`.

`fedlora runs rerun` and anything else that holds a command name and a recorded config (not CLI
options) calls the core through here.

A re-run runs a record's *final* configuration from the start, into a new folder: for a run that was
resumed with changes (`rounds --resume --rounds 3` on a 2-round run) that is the configuration the last
session ran with. Each round depends only on the round before it and on seeds derived from the run seed
and the round, never on the number of rounds or on where a session began, so this ends where the
resumed run ended, and `--verify` can compare the two final adapters bit for bit.

A re-run writes only into its new folder (beside the run as the user named it, never beside a link's
target, and inside the runs root the run was found under) or where `--output-dir` says, and only into
the user's own caches: the paths a record names for caches are not trusted.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

from fedlora_cli.config import from_dict
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.runs import RUN_RECORD, RunRecord, adapter_digest, read_record, update_record
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
        except (
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
        ) as e:  # a damaged record fails in any of these
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


def redirect(command: str, config: Any, folder: Path, *, model_cache: str | None = None) -> Any:
    """The same config, writing exactly into `folder` (and nowhere else the original wrote).

    The caches are the user's, not the record's: the tokenized cache is the current default, the Hugging
    Face cache `model_cache` (None: Hugging Face's default). A record is a file anyone may have edited.
    """
    if command == "merge":
        return replace(config, save_adapter=str(folder), overwrite=False)
    output = replace(config.output, output_dir=str(folder), run_name=None, overwrite=False)
    changes: dict[str, Any] = {"output": output}
    if command == "train":
        changes["adapter_output_dir"] = None  # into the new folder, never over the original's adapter
    if command == "rounds":
        changes["resume"] = False
        changes["resume_from_round"] = None
    for name, cache in (("data", None), ("model", model_cache)):
        spec = getattr(config, name, None)
        if is_dataclass(spec) and hasattr(spec, "cache_dir"):
            changes[name] = replace(spec, cache_dir=cache)
    return replace(config, **changes)


def next_rerun_folder(folder: Path) -> Path:
    """`<name>-rerun-<n>` beside the run, with the first n that is free (a dangling link is not free)."""
    n = 1
    while os.path.lexists(folder.parent / f"{folder.name}-rerun-{n}"):
        n += 1
    return folder.parent / f"{folder.name}-rerun-{n}"


def _absolute(path: str | os.PathLike) -> Path:
    """An absolute path that keeps links as they are (`Path.resolve` would replace a link by its target)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def rerun_target(
    folder: Path, *, root: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None
) -> Path:
    """Where a re-run of the run at `folder` (as named, absolute) goes.

    `output_dir`, when the user gives one (a new folder). Otherwise `<name>-rerun-<n>` beside the run as
    named: a link to a run elsewhere gets its re-run beside the link. A run found under the runs `root` gets
    its re-run there or not at all: a folder in between that leads elsewhere (a link) is refused.
    """
    if output_dir is not None:
        target = _absolute(output_dir)
        if os.path.lexists(target):
            raise InputError(f"--output-dir {target} already exists: a re-run goes into a new folder")
        return target
    target = next_rerun_folder(folder)
    if root is not None and _inside(folder, _absolute(root)):
        real_root, real_parent = _absolute(root).resolve(), target.parent.resolve()
        if not _inside(real_parent, real_root):
            raise InputError(
                f"a re-run of {folder} would be written to {real_parent}, outside the runs root {root}: pass "
                f"--output-dir to say where it goes"
            )
    return target


def describe_config(record: RunRecord) -> str:
    """Which configuration a re-run runs, in words: the recorded one, or the final one after resumes."""
    changed: dict[str, list[Any]] = {}
    for resume in record.resumes:
        for key, (before, after) in (resume.get("changes") or {}).items():
            if key.startswith(("output.", "resume")):
                continue
            changed[key] = [changed.get(key, [before])[0], after]
    if not record.resumes:
        return "the recorded configuration"
    times = f"{len(record.resumes)} resume{'s' if len(record.resumes) > 1 else ''}"
    if not changed:
        return f"the recorded configuration (unchanged by {times})"
    what = ", ".join(f"{k} {_show(a)} → {_show(b)}" for k, (a, b) in sorted(changed.items()))
    return f"the final configuration, as {times} left it ({what}), from the start"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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
class RerunPlan:
    """What a re-run will do, known before any work: the command can say it first."""

    original: Path  # the run as named (absolute; a link stays a link)
    record: RunRecord
    config: Any  # the record's final configuration, redirected into `target`
    target: Path
    how: str  # describe_config(record)


@dataclass(frozen=True)
class RerunResult:
    original: Path
    folder: Path
    recorded_sha256: str | None  # the original's final adapter digest (None: it has no adapter)
    new_sha256: str | None
    how: str = "the recorded configuration"

    @property
    def identical(self) -> bool:
        return self.recorded_sha256 is not None and self.recorded_sha256 == self.new_sha256


def _final_digest(folder: Path) -> str | None:
    info = load_run(folder)
    if info.final is not None and info.final.adapter_sha256:
        return info.final.adapter_sha256
    adapter = info.adapter
    return adapter_digest(adapter) if adapter is not None else None


def plan_rerun(
    folder: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    model_cache: str | None = None,
) -> RerunPlan:
    """Read the run's record and decide the configuration and the folder of its re-run (rerun_target)."""
    folder = _absolute(folder)
    record = read_record(folder)
    flow = workflow(record.command)
    config = flow.config_from(record.effective_config())
    target = rerun_target(folder, root=root, output_dir=output_dir)
    config = redirect(record.command, config, target, model_cache=model_cache)
    return RerunPlan(folder, record, config, target, describe_config(record))


def run_rerun(plan: RerunPlan, *, progress: Any = None, argv: list[str] | None = None) -> RerunResult:
    """Run a planned re-run; report both final adapter digests."""
    flow = workflow(plan.record.command)
    with working_directory(plan.record.cwd):
        flow.run(plan.config, progress=progress, argv=argv)
    target = plan.target
    if (target / RUN_RECORD).is_file():
        update_record(target, rerun_of=str(plan.original.resolve()), rerun_config=plan.how)
    recorded = _final_digest(plan.original)
    new = _final_digest(target) if target.is_dir() else None
    if new is None and recorded is not None:
        raise FedloraError(f"the re-run in {target} made no final adapter to compare")
    return RerunResult(plan.original, target, recorded, new, plan.how)


def rerun(
    folder: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    model_cache: str | None = None,
    progress: Any = None,
    argv: list[str] | None = None,
) -> RerunResult:
    """Run a recorded run's final configuration again into a new folder (rerun_target); compare the
    adapters."""
    plan = plan_rerun(folder, root=root, output_dir=output_dir, model_cache=model_cache)
    return run_rerun(plan, progress=progress, argv=argv)
