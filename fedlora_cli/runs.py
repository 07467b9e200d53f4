"""The run tree: run folders, run.json (what was run, exactly), history.jsonl, metrics files."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora_cli import __version__, atomic
from fedlora_cli.config import OutputSpec, to_dict
from fedlora_cli.errors import InputError

RUN_RECORD = "run.json"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
_PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "safetensors", "numpy", "flwr", "dp-accounting")  # fmt: skip


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_path(output: OutputSpec, task: str, model_short: str, prefix: str = "") -> Path:
    """`<root>/<task>_<model>/<run-name>`, or `output_dir` when given."""
    if output.output_dir:
        return Path(output.output_dir).expanduser()
    name = output.run_name or f"{prefix}{timestamp()}"
    return Path(output.root).expanduser() / f"{task}_{model_short}" / name


# What a single-machine run writes; --overwrite removes these and nothing else.
RUN_ENTRIES = {RUN_RECORD, METRICS, "adapter", "model"}


def claim_run_dir(path: Path, *, overwrite: bool, what: str = "--run-name / --output-dir") -> Path:
    """Create the run folder, refusing to mix a new run into an old one unless asked to overwrite.

    Overwriting only ever deletes what a run writes: a folder holding anything else is refused, so a
    mistyped `--output-dir ~ --overwrite` cannot wipe a directory.
    """
    import shutil

    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder: choose another {what}")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        raise InputError(
            f"{path} already holds a run: choose another {what}, or pass --overwrite to replace it"
        )
    foreign = [e for e in entries if e not in RUN_ENTRIES]
    if foreign:
        raise InputError(
            f"{path} holds files that are not a fedlora run ({', '.join(foreign[:3])}): --overwrite "
            f"refuses to delete them; choose another {what}"
        )
    for name in entries:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None


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
