"""The run tree: run folders, run.json (what was run, exactly), history.jsonl, metrics files."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora_cli import __version__, atomic, ownership
from fedlora_cli.config import OutputSpec, to_dict
from fedlora_cli.errors import InputError, first_line
from fedlora_cli.ownership import HISTORY, METRICS, RUN_RECORD

_PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "safetensors", "numpy", "flwr")


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_path(output: OutputSpec, task: str, model_short: str, prefix: str = "") -> Path:
    """`<root>/<task>_<model>/<run-name>`, or `output_dir` when given."""
    if output.output_dir:
        return Path(output.output_dir).expanduser()
    name = output.run_name or f"{prefix}{timestamp()}"
    return Path(output.root).expanduser() / f"{task}_{model_short}" / name


# What a single-machine run writes; --overwrite removes these and nothing else (see ownership.run_foreign).
RUN_ENTRIES = {RUN_RECORD, METRICS, "adapter", "model"}
RUN_OPTION = "--run-name / --output-dir"


def claim_run_dir(path: Path, *, overwrite: bool, what: str = RUN_OPTION) -> Path:
    """Create the run folder, refusing to mix a new run into an old one unless asked to overwrite.

    Overwriting only ever deletes a fedlora run (ownership.RUN): a folder holding anything else is
    refused, so a mistyped `--output-dir ~ --overwrite` cannot wipe a directory.
    """
    import shutil

    path = ownership.claim(path, ownership.RUN, overwrite=overwrite, option=what)
    with atomic.writing(path):
        if path.is_dir():
            for entry in path.iterdir():
                if entry.name in ownership.LOCK_FILES:  # this process's own lock (runlock.py)
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        path.mkdir(parents=True, exist_ok=True)
    return path


def interrupted_rounds_message(run_dir: Path, complete: int) -> str:
    """What `rounds` says when interrupted: what is complete, and a command that continues the run.

    `--output-dir` names the run whether it was started with `--run-name` or `--output-dir`.
    """
    return f"interrupted: {complete_rounds(run_dir, complete)}; continue with `fedlora rounds … --output-dir {run_dir} --resume`"


def complete_rounds(run_dir: Path, complete: int) -> str:
    """The one phrase for what a stopped run keeps (never "rounds 1..0")."""
    if complete == 0:
        return f"no round of {run_dir} was complete"
    if complete == 1:
        return f"round 1 of {run_dir} is complete"
    return f"rounds 1-{complete} of {run_dir} are complete"


def package_versions() -> dict[str, str]:
    out = {"fedlora": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_record(
    *,
    command: str,
    config: Any,
    argv: list[str] | None,
    seeds: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What run.json holds: enough to re-run the command and to know what it ran on."""
    return {
        "command": command,
        "argv": list(sys.argv if argv is None else argv),
        "config": to_dict(config),
        "versions": package_versions(),
        "seeds": seeds,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        **(extra or {}),
    }


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    return atomic.write_json(folder / RUN_RECORD, record)


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from `path`; anything else (missing, not JSON, a list …) is one InputError."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: the {what} is a folder, not a file") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise InputError(f"{path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def write_history(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrite history.jsonl whole (atomically): a crash leaves the previous complete version."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    return atomic.write_text(folder / HISTORY, text)


def read_history(folder: Path) -> list[dict[str, Any]]:
    path = folder / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------
# the federated run tree: round_NNN/client_NNN/adapter, round_NNN/global/adapter, final/adapter

ADAPTER_DIR = "adapter"


class RoundTree:
    """Paths and completeness rules of a `rounds` run folder (DESIGN.md §5).

    A round is complete once `round_NNN/global/metrics.json` exists: it is written last, after the
    global adapter, so a crash at any point leaves the round incomplete and `--resume` redoes it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def round_dir(self, round_no: int) -> Path:
        return self.root / f"round_{round_no:03d}"

    def client_dir(self, round_no: int, client_id: int) -> Path:
        return self.round_dir(round_no) / f"client_{client_id:03d}"

    def global_dir(self, round_no: int) -> Path:
        return self.round_dir(round_no) / "global"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    def is_complete(self, round_no: int) -> bool:
        g = self.global_dir(round_no)
        return (g / METRICS).is_file() and (g / ADAPTER_DIR / "adapter_model.safetensors").is_file()

    def last_complete_round(self) -> int:
        """Highest r such that rounds 1..r are all complete (0 if none)."""
        r = 0
        while self.is_complete(r + 1):
            r += 1
        return r

    def discard_after(self, round_no: int) -> list[Path]:
        """Remove the folders of rounds after `round_no` (incomplete leftovers of an interruption)."""
        import shutil

        removed = []
        for entry in sorted(self.root.glob("round_*")):
            try:
                number = int(entry.name.removeprefix("round_"))
            except ValueError:
                continue
            if number > round_no and entry.is_dir():
                shutil.rmtree(entry)
                removed.append(entry)
        final = self.final_dir
        if final.exists():
            shutil.rmtree(final)
            removed.append(final)
        atomic.remove_stale_temporaries(self.root)
        return removed
