"""What fedlora wrote, and the one rule for writing where something already is.

Without --overwrite, an existing target (a folder that is not empty, or a file) is an error. With it,
fedlora replaces only its own output and refuses anything else, naming it. It tells its own output by
the file that describes each kind (an adapter's fedlora_adapter.json, a run's run.json, a shard
folder's summary.json, the title embedded in a plot, a metrics file's "fedlora_version") and by the
exact names it writes beside that file. Every command that writes to a path the user named calls
`claim` before any work; `may_replace` gives `atomic.staged_dir` the same rule for the final swap.

No torch here: sharding uses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.atomic import is_leftover, occupied
from fedlora_cli.errors import InputError
from fedlora_cli.jsonfile import read_json_or_none

# the names fedlora writes (modeling, runs and sharding import them from here)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "fedlora_adapter.json"  # fedlora's own description of an adapter; PEFT ignores it
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META)
RUN_RECORD = "run.json"
METRICS = "metrics.json"
HISTORY = "history.jsonl"
# A run folder's lock (runlock.py): the OS lock file, and the note of which process holds it.
LOCK_FILES = (".fedlora.lock", ".fedlora.lock.json")
SUMMARY_FILE = "summary.json"
CLIENT_FILE = re.compile(r"^client_(\d+)\.json$")
ROUND_DIR = re.compile(r"^round_\d{3,}$")
RUN_COMMANDS = ("train", "baseline", "rounds")
TRACKER_DIRS = ("tensorboard", "wandb")  # what --report-to writes inside a run folder
PLOT_TITLE = "fedlora shard label distribution"  # embedded in every plot fedlora draws (png, pdf, svg)
MAX_LISTED = 3  # foreign names quoted in an error message


@dataclass(frozen=True)
class Output:
    """A kind of output: what it is called, whether it is a folder, and how to find what is not fedlora's."""

    noun: str  # "adapter folder", "plot" …
    folder: bool
    foreign: Callable[[Path], list[str]]  # names at the path fedlora did not write ([] = all fedlora's)


def claim(path: str | os.PathLike, output: Output, *, overwrite: bool, option: str) -> Path:
    """Check that `path` may be written as `output`: free, or fedlora's own and `overwrite` given.

    Returns the path (expanded); raises InputError (exit 2) naming the path, what is in the way and
    the option to change. Nothing is deleted here: the caller replaces the target once its work is done.
    """
    path = Path(path).expanduser()
    if output.folder and (path.is_symlink() or path.exists()) and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder: choose another {option}")
    if not output.folder and path.is_dir():
        raise InputError(f"{path} is a folder, not a file: choose another {option}")
    if not occupied(path) or (output.folder and not entries(path)):
        return path
    foreign = output.foreign(path)
    if foreign:
        raise InputError(
            f"{path} {_describe(foreign, output)}: fedlora never replaces what it did not write; "
            f"choose another {option}"
        )
    if not overwrite:
        raise InputError(
            f"{path} already holds a fedlora {output.noun}: choose another {option}, or pass --overwrite to "
            f"replace it"
        )
    return path


def may_replace(output: Output, option: str = "") -> Callable[[Path], None]:
    """For `atomic.staged_dir`: approve replacing `path` only if everything there is fedlora's `output`."""

    def check(path: Path) -> None:
        foreign = output.foreign(path)
        if foreign:
            fix = f"; choose another {option}" if option else ""
            raise InputError(
                f"{path} {_describe(foreign, output)}: fedlora never replaces what it did not write{fix}"
            )

    return check


def _describe(foreign: list[str], output: Output) -> str:
    if not output.folder:
        return f"was not written by fedlora (it is not a fedlora {output.noun})"
    more = len(foreign) - MAX_LISTED
    shown = ", ".join(foreign[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
    return f"holds files that fedlora did not write ({shown})"


def entries(folder: Path) -> list[str]:
    """The names in `folder`, less the temporaries of interrupted atomic writes and a run's lock files
    (those are fedlora's, and say nothing about what the folder holds)."""
    return sorted(e.name for e in folder.iterdir() if not is_leftover(e.name) and e.name not in LOCK_FILES)


def read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file that is not a link (fedlora never writes one), else None."""
    return None if path.is_symlink() else read_json_or_none(path)


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _written_by_fedlora(record: dict[str, Any] | None) -> bool:
    return record is not None and isinstance(record.get("fedlora_version"), str)


# ---------------------------------------------------------------------------------------------------
# the kinds of output


def adapter_foreign(folder: Path, prefix: str = "") -> list[str]:
    """An adapter folder is fedlora's when its fedlora_adapter.json says so; it lists any extra files."""
    names = entries(folder)
    meta = read_object(folder / ADAPTER_META)
    if not _written_by_fedlora(meta):
        return [prefix + n for n in names]
    listed = meta.get("files")
    extra = {n for n in listed if isinstance(n, str)} if isinstance(listed, list) else set()
    owned = set(ADAPTER_FILES) | extra
    return [prefix + n for n in names if n not in owned or not _is_file(folder / n)]


def run_foreign(folder: Path) -> list[str]:
    """A run folder is fedlora's when its run.json says so. `train` / `baseline` runs hold run.json,
    metrics.json, adapter/, (train --select best) best/ and (baseline) model/; `rounds` runs hold run.json,
    history.jsonl, shards/, round_NNN/, final/ and (--select best) best/."""
    names = entries(folder)
    record = _run_record(folder)
    if record is None or "fedlora" not in record.versions or record.command not in RUN_COMMANDS:
        return names
    command = record.command
    foreign: list[str] = []
    for name in names:
        target = folder / name
        if name in (RUN_RECORD, METRICS, HISTORY) and _is_file(target):
            continue
        if name in TRACKER_DIRS and _is_dir(target):
            continue  # --report-to tensorboard / wandb logs
        if (
            command == "rounds"
            and (name in ("final", "best", "shards") or ROUND_DIR.match(name))
            and _is_dir(target)
        ):
            continue
        if command == "train" and name == "best" and _is_dir(target):
            continue  # --select best: the chosen epoch's adapter
        if name == "adapter" and _is_dir(target):
            foreign += adapter_foreign(target, prefix="adapter/")
            continue
        if name == "model" and command == "baseline" and _is_dir(target):
            continue  # save_pretrained's files: their names depend on the model and tokenizer
        foreign.append(name)
    return foreign


def _run_record(folder: Path) -> Any:
    """The folder's run record (runs.record.read_record, the one reader of run.json), or None when there is
    none that fedlora could have written (missing, a link, damaged)."""
    from fedlora_cli.runs.record import read_record  # runs/ builds on this module: import it when needed

    if not _is_file(folder / RUN_RECORD):
        return None
    try:
        return read_record(folder)
    except InputError:
        return None


def shards_foreign(folder: Path) -> list[str]:
    """A shard folder is fedlora's when summary.json says so: client_1..K.json, summary.json, its plot."""
    names = entries(folder)
    summary = read_object(folder / SUMMARY_FILE)
    if not _written_by_fedlora(summary):
        return names
    sizes = summary.get("size_per_client")
    k = len(sizes) if isinstance(sizes, list) else 0
    owned = {SUMMARY_FILE} | {f"client_{i}.json" for i in range(1, k + 1)}
    plot = summary.get("plot")
    if isinstance(plot, str) and plot == Path(plot).name:
        owned.add(plot)
    return [n for n in names if n not in owned or not _is_file(folder / n)]


def plot_foreign(path: Path) -> list[str]:
    """A plot fedlora drew carries PLOT_TITLE in its metadata (png text chunk, pdf info, svg title)."""
    try:
        ours = _is_file(path) and PLOT_TITLE.encode() in path.read_bytes()
    except OSError:
        ours = False
    return [] if ours else [path.name]


def json_foreign(path: Path) -> list[str]:
    """A JSON file fedlora wrote for the user (eval --output-json) records the fedlora version."""
    return [] if _written_by_fedlora(read_object(path)) else [path.name]


ADAPTER = Output("adapter folder", True, adapter_foreign)
RUN = Output("run folder", True, run_foreign)
SHARDS = Output("shard folder", True, shards_foreign)
PLOT = Output("plot", False, plot_foreign)
METRICS_JSON = Output("metrics file", False, json_foreign)
