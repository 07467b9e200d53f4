"""run.json as a type: what ran (exactly), on what, when and how it ended; its lifecycle; the final-metrics
shape.

A record is written when a run starts (status `running`) and rewritten atomically as the run goes: each
resume appends an entry, and the end sets the status (`complete`, `failed`, `interrupted`), the end time
and the duration. Readers are tolerant: unknown keys are kept (so rewriting a record made by a newer
fedlora loses nothing) and missing ones get defaults (so records made by older versions still load).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora_cli import __version__, atomic
from fedlora_cli.errors import InputError, first_line
from fedlora_cli.jsonfile import read_json
from fedlora_cli.ownership import ADAPTER_WEIGHTS, METRICS, RUN_RECORD  # noqa: F401 - runs.METRICS

RECORD_FORMAT = 2  # 1: the first fedlora (no status, "created" instead of "started")

RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"
STATUSES = (RUNNING, COMPLETE, FAILED, INTERRUPTED)
INTERRUPT_EXIT_CODES = (130, 143)  # Ctrl-C (SIGINT) and SIGTERM, as the shell reports them

_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
    "flwr",
    "dp-accounting",
)


def now() -> str:
    """Local time with its UTC offset, to the second: sortable, and unambiguous across machines."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    out = {"fedlora": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(start: str | os.PathLike | None = None) -> str | None:
    """The commit of the fedlora checkout this code runs from, read from `.git` without running git.

    None when fedlora is not run from a checkout (an installed wheel) or anything is unreadable: a run
    never fails for this. Handles worktrees (`.git` is a file pointing to the real folder), detached
    HEADs and packed refs.
    """
    root = Path(start) if start is not None else Path(__file__).resolve().parents[2]
    try:
        dotgit = root / ".git"
        if dotgit.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dotgit.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            gitdir = Path(text.removeprefix("gitdir:").strip())
            gitdir = gitdir if gitdir.is_absolute() else root / gitdir
        elif dotgit.is_dir():
            gitdir = dotgit
        else:
            return None
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _is_sha(head) else None
        ref = head.removeprefix("ref:").strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        for folder in (gitdir, common):
            if (folder / ref).is_file():
                sha = (folder / ref).read_text().strip()
                return sha if _is_sha(sha) else None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _is_sha(parts[0]):
                    return parts[0]
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"seed": 1}}` -> `{"train.seed": 1}`: how configs are compared, diffed and logged."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Flattened config keys whose value differs: `{"rounds": [3, 4]}` (what a resume changed)."""
    old, new = flatten(before), flatten(after)
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def apply_changes(config: Mapping[str, Any], changes: Mapping[str, list[Any]]) -> dict[str, Any]:
    """`config` (nested) with each flattened key of `changes` set to its new value: config_changes undone."""
    out = json.loads(json.dumps(config))  # a deep copy, of JSON values only
    for key, (_, value) in changes.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


def _jsonable(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if is_dataclass(config):
        from fedlora_cli.config import to_dict

        return to_dict(config)
    raise TypeError(f"a run's config must be a dataclass or a mapping, got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------------
# the record


@dataclass
class RunRecord:
    """What run.json holds: the exact command, what it ran on, and how it went.

    `extra` holds every other top-level key (data and shard fingerprints, sizes, device, precision …):
    they are written back as top-level keys, so commands add what they know without changing this type.
    """

    command: str
    argv: list[str]
    config: dict[str, Any]
    shell: str = ""  # argv as one copy-pasteable shell line
    versions: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    started: str | None = None
    ended: str | None = None
    duration_s: float = 0.0  # seconds spent running, summed over the first session and every resume
    status: str = ""  # one of STATUSES; "" when an older fedlora wrote the record (see query.status_of)
    error: str | None = None  # the one-line message of a failure or interruption
    git_commit: str | None = None
    cwd: str | None = None  # relative paths in argv and config are relative to this folder
    host: str | None = None
    pid: int | None = None  # of the process that runs (or last ran) it: tells a live run from a dead one
    platform: str | None = None
    # {"at", "argv", "shell", "changes": {config key: [before, after]}, "after_round"}: `config` holds the
    # configuration as the last resume left it, these say how it got there
    resumes: list[dict[str, Any]] = field(default_factory=list)
    format: int = RECORD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        own = asdict(self)
        extra = own.pop("extra")
        return {**extra, **own}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record from its JSON object. Missing keys take defaults (older fedlora versions wrote fewer),
        unknown ones go to `extra`; a known key of the wrong type is a ValueError naming it: a damaged or
        hand-edited record must fail here, in one line, not somewhere in the code that trusts it."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data[k] for k in known if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        if "started" not in values and "created" in extra:  # format 1
            values["started"] = extra.pop("created")
        for key, value in values.items():
            _check_shape(key, value)
        values.setdefault("command", "?")
        values.setdefault("argv", [])
        values.setdefault("config", {})
        if not values.get("shell"):
            values["shell"] = shlex.join(values["argv"])
        values.setdefault("format", 1)
        return cls(**values, extra=extra)

    def effective_config(self) -> dict[str, Any]:
        """The configuration that made the result beside this record: `config` with every resume's changes.

        Records written since resumes update `config` are unchanged by this; older ones (whose `config` kept
        the first session's values, `rounds` 2 after an extension to 3) get their final configuration back.
        """
        config: dict[str, Any] = self.config
        for resume in self.resumes:
            config = apply_changes(config, experiment_changes(resume.get("changes") or {}))
        return config


def experiment_changes(changes: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """The changes that change the experiment, not where a session wrote or how it was started."""
    return {k: v for k, v in changes.items() if not k.startswith(("output.", "resume"))}


def _is(kinds: tuple[type, ...]) -> Any:
    return lambda v: isinstance(v, kinds) and not isinstance(v, bool)


def _string_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _resume_list(v: Any) -> bool:
    def entry(r: Any) -> bool:
        changes = (r.get("changes") or {}) if isinstance(r, dict) else None
        return isinstance(changes, dict) and all(
            isinstance(c, list) and len(c) == 2 for c in changes.values()
        )

    return isinstance(v, list) and all(entry(r) for r in v)


_TEXT, _OPTIONAL_TEXT = _is((str,)), _is((str, type(None)))
# what each field of a run record must hold, and how a message names it
_SHAPES: dict[str, tuple[Any, str]] = {
    "command": (_TEXT, "a command name"),
    "argv": (_string_list, "a list of strings"),
    "config": (_is((dict,)), "a JSON object"),
    "shell": (_TEXT, "a string"),
    "versions": (_is((dict,)), "a JSON object"),
    "seeds": (_is((dict,)), "a JSON object"),
    "started": (_OPTIONAL_TEXT, "a time or null"),
    "ended": (_OPTIONAL_TEXT, "a time or null"),
    "duration_s": (_is((int, float)), "a number of seconds"),
    "status": (_TEXT, "a string"),
    "error": (_OPTIONAL_TEXT, "a string or null"),
    "git_commit": (_OPTIONAL_TEXT, "a string or null"),
    "cwd": (_OPTIONAL_TEXT, "a folder or null"),
    "host": (_OPTIONAL_TEXT, "a string or null"),
    "pid": (_is((int, type(None))), "a process id or null"),
    "platform": (_OPTIONAL_TEXT, "a string or null"),
    "resumes": (_resume_list, 'a list of {"at", "argv", "changes": {key: [before, after]}} objects'),
    "format": (_is((int,)), "a whole number"),
}


def _check_shape(key: str, value: Any) -> None:
    accepts, shape = _SHAPES[key]
    if not accepts(value):
        raise ValueError(f"'{key}' must be {shape}, got {json.dumps(value, default=str)[:40]}")


def new_record(
    *,
    command: str,
    config: Any,
    argv: list[str] | None = None,
    seeds: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> RunRecord:
    """A record for a run that starts now in this process (status `running`)."""
    argv = [str(a) for a in (sys.argv if argv is None else argv)]
    return RunRecord(
        command=command,
        argv=argv,
        config=_jsonable(config),
        shell=shlex.join(argv),
        versions=package_versions(),
        seeds=dict(seeds or {}),
        started=now(),
        status=RUNNING,
        git_commit=git_commit(),
        cwd=os.getcwd(),
        host=socket.gethostname(),
        pid=os.getpid(),
        platform=platform.platform(),
        extra=dict(extra or {}),
    )


def write_record(folder: str | os.PathLike, record: RunRecord | Mapping[str, Any]) -> Path:
    data = record.to_json() if isinstance(record, RunRecord) else dict(record)
    return atomic.write_json(Path(folder) / RUN_RECORD, data)


def read_record(folder: str | os.PathLike) -> RunRecord:
    """The one reader of run.json: the typed record, or one InputError naming the file and what is wrong."""
    path = Path(folder) / RUN_RECORD
    if not (path.exists() or path.is_symlink()):
        raise InputError(f"{Path(folder)} holds no {RUN_RECORD}: is it a fedlora run folder?")
    data = read_json(path, "run record")
    try:
        return RunRecord.from_json(data)
    except ValueError as e:
        raise InputError(
            f"{path}: not a run record fedlora can use ({e}): it was damaged or edited"
        ) from None


def update_record(folder: str | os.PathLike, **changes: Any) -> RunRecord:
    """Read, change and rewrite run.json atomically; keys that are not fields go to `extra`."""
    record = read_record(folder)
    for key, value in changes.items():
        if key in {f.name for f in fields(RunRecord)} - {"extra"}:
            setattr(record, key, value)
        else:
            record.extra[key] = value
    write_record(folder, record)
    return record


def record_resume(
    folder: str | os.PathLike,
    *,
    argv: list[str] | None,
    changes: Mapping[str, list[Any]] | None = None,
    after_round: int | None = None,
) -> RunRecord:
    """Note a resume: when, the command line, what it changed and (rounds) the round it continued after.

    `config` becomes the configuration the run continues with, so that the record always describes the
    result it sits beside (a run extended from 2 to 3 rounds says 3); the resumes say what changed when.
    The run is `running` again here.
    """
    record = read_record(folder)
    argv = [str(a) for a in (sys.argv if argv is None else argv)]
    changes = dict(changes or {})
    entry: dict[str, Any] = {"at": now(), "argv": argv, "shell": shlex.join(argv), "changes": changes}
    if after_round is not None:
        entry["after_round"] = after_round
    record.resumes.append(entry)
    record.config = apply_changes(record.config, experiment_changes(changes))
    record.status, record.error, record.ended = RUNNING, None, None
    record.host, record.pid = socket.gethostname(), os.getpid()
    write_record(folder, record)
    return record


def finish_record(
    folder: str | os.PathLike, status: str, *, error: str | None = None, seconds: float = 0.0
) -> RunRecord:
    """Set the final status, the end time, and add this session's `seconds` to the duration."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    record = read_record(folder)
    record.status, record.error, record.ended = status, error, now()
    record.duration_s = round(float(record.duration_s or 0.0) + seconds, 3)
    write_record(folder, record)
    return record


def status_for(exc: BaseException | None) -> str:
    """How an exception ends a run: none is complete; Ctrl-C and SIGTERM interrupt it; the rest fail it."""
    if exc is None:
        return COMPLETE
    if isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) in INTERRUPT_EXIT_CODES:
        return INTERRUPTED
    if isinstance(exc, SystemExit) and exc.code in INTERRUPT_EXIT_CODES:
        return INTERRUPTED
    return FAILED


@contextlib.contextmanager
def run_session(folder: str | os.PathLike) -> Iterator[Path]:
    """Around the work of one session of a run whose run.json exists: sets the status when it ends.

    Complete on success, `interrupted` on Ctrl-C / SIGTERM, `failed` otherwise (with the error's first
    line); the exception itself always propagates. The duration grows by this session's wall time.
    """
    folder = Path(folder)
    start = time.monotonic()
    try:
        yield folder
    except BaseException as e:
        status = status_for(e)
        with contextlib.suppress(Exception):  # never hide the original error behind a bookkeeping one
            error = "interrupted" if status == INTERRUPTED and not str(e).strip() else first_line(e)
            finish_record(folder, status, error=error, seconds=time.monotonic() - start)
        raise
    finish_record(folder, COMPLETE, seconds=time.monotonic() - start)


# ---------------------------------------------------------------------------------------------------
# the final metrics: one shape for train, baseline, rounds, merge and eval


@dataclass
class FinalMetrics:
    """What a run ended with. `metrics` holds the final model's dev metrics, flat (MNLI: `matched_accuracy`,
    `mismatched_accuracy` and their mean `accuracy`); `main_metric` names the task's headline one."""

    command: str
    task: str | None
    main_metric: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    per_split: dict[str, dict[str, float]] = field(default_factory=dict)
    train: dict[str, Any] | None = None  # training statistics: loss, steps, throughput …
    eval: dict[str, Any] | None = None  # evaluation statistics: examples, seconds, loss …
    adapter: str | None = None  # the final adapter folder (PEFT format), if the run made one
    adapter_sha256: str | None = None  # adapter_digest() of its weights: `runs rerun --verify` compares it
    rounds: int | None = None  # federated runs: the last round
    format: int = RECORD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main_value(self) -> float | None:
        value = self.metrics.get(self.main_metric) if self.main_metric else None
        return float(value) if isinstance(value, int | float) else None

    def to_json(self) -> dict[str, Any]:
        own = asdict(self)
        extra = own.pop("extra")
        return {**extra, **own}

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, command: str = "?", task: str | None = None
    ) -> FinalMetrics:
        """Any metrics file fedlora ever wrote: this shape, or the first version's per-command ones."""
        if "metrics" in data and isinstance(data.get("metrics"), dict):
            known = {f.name for f in fields(cls)} - {"extra"}
            values = {k: data[k] for k in known if k in data}
            values.setdefault("command", command)
            values.setdefault("task", task)
            values.setdefault("main_metric", _main_metric(values.get("task")))
            return cls(**values, extra={k: v for k, v in data.items() if k not in known})
        # format 1: train/baseline {"train": {...}, "eval": {metric: value, "per_split": ...}, "adapter"};
        # rounds final/metrics.json {"round": N, metric: value, ...}
        source = data.get("eval") if isinstance(data.get("eval"), dict) else data
        metrics = {k: float(v) for k, v in source.items() if isinstance(v, int | float) and k not in _STATS}
        per_split = source.get("per_split") if isinstance(source.get("per_split"), dict) else {}
        rounds = data.get("round") if isinstance(data.get("round"), int) else None
        return cls(
            command=command,
            task=task,
            main_metric=_main_metric(task),
            metrics=metrics,
            per_split=per_split,
            train=data.get("train") if isinstance(data.get("train"), dict) else None,
            adapter=data.get("adapter") if isinstance(data.get("adapter"), str) else None,
            rounds=rounds,
            format=1,
        )


_STATS = {"examples", "seconds", "samples_per_second", "round", "loss"}


def _main_metric(task: str | None) -> str | None:
    from fedlora_cli.tasks import get_task

    try:
        return get_task(task).main_metric if task else None
    except ValueError:
        return None


def final_metrics(
    command: str,
    task: Any,
    evaluation: Any = None,
    *,
    train: dict[str, Any] | None = None,
    adapter: str | os.PathLike | None = None,
    rounds: int | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> FinalMetrics:
    """The final-metrics record of any command. `task` is a GlueTask (or None); `evaluation` an EvalResult.

    The adapter's digest is computed here, from the file on disk, so it is what `--verify` will read.
    """
    ev_stats = None
    values = dict(metrics or {})
    per_split: dict[str, dict[str, float]] = {}
    if evaluation is not None:
        values = {**evaluation.metrics, **values}
        per_split = evaluation.per_split
        ev_stats = {
            "examples": evaluation.examples,
            "seconds": evaluation.seconds,
            "samples_per_second": evaluation.samples_per_second,
        }
        if getattr(evaluation, "loss", None) is not None:
            ev_stats["loss"] = evaluation.loss
    return FinalMetrics(
        command=command,
        task=task.name if task is not None else None,
        main_metric=task.main_metric if task is not None else None,
        metrics=values,
        per_split=per_split,
        train=train,
        eval=ev_stats,
        adapter=str(adapter) if adapter is not None else None,
        adapter_sha256=adapter_digest(adapter) if adapter is not None else None,
        rounds=rounds,
        extra=dict(extra or {}),
    )


def write_metrics(path: str | os.PathLike, metrics: FinalMetrics) -> Path:
    return atomic.write_json(path, metrics.to_json())


# ---------------------------------------------------------------------------------------------------
# the adapter's fingerprint


def adapter_digest(path: str | os.PathLike) -> str:
    """sha256 of an adapter's tensors: names, dtypes, shapes and raw bytes, in name order.

    It reads the safetensors layout directly (an 8-byte header length, a JSON header, the data), so it
    needs no torch and ignores the file's free-form metadata: two adapters with bit-identical weights
    have the same digest whoever wrote them.
    """
    path = Path(path)
    file = path / ADAPTER_WEIGHTS if path.is_dir() else path
    try:
        with open(file, "rb") as f:
            return _digest(f)
    except FileNotFoundError:
        raise InputError(f"{file}: no such adapter weights file") from None
    except (struct.error, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{file} is not a safetensors file ({first_line(e)})") from None


def state_digest(state: Mapping[str, Any]) -> str:
    """adapter_digest of the file these tensors would be saved as (before, or without, writing it)."""
    import io

    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return _digest(io.BytesIO(save(tensors)))


def safetensors_header(f: Any) -> tuple[dict[str, Any], int]:
    """The JSON header of the safetensors stream `f` (at its start) and the offset where its tensor data
    begins."""
    (length,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(length)), 8 + length


def _digest(f: Any) -> str:
    h = hashlib.sha256()
    header, base = safetensors_header(f)
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        start, end = info["data_offsets"]
        h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        f.seek(base + start)
        h.update(f.read(end - start))
    return h.hexdigest()
