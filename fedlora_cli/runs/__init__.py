"""The run tree: run folders, run.json (what was run, exactly), history.jsonl, metrics files.

`record` holds the typed run record and its lifecycle (the one reader of run.json), `history` the typed
round rows (the one reader of history.jsonl), `integrity` what `--resume` checks, `rounds` a federated run's
tree, `query` the reading side (`fedlora runs`).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from fedlora_cli import atomic, ownership
from fedlora_cli.config import OutputSpec
from fedlora_cli.errors import InputError
from fedlora_cli.runs.history import HistoryRow, read_history, write_history  # noqa: F401
from fedlora_cli.runs.record import (  # noqa: F401 - the names callers import from fedlora_cli.runs
    COMPLETE,
    FAILED,
    INTERRUPTED,
    METRICS,
    RUN_RECORD,
    RUNNING,
    STATUSES,
    FinalMetrics,
    RunRecord,
    adapter_digest,
    apply_changes,
    config_changes,
    experiment_changes,
    final_metrics,
    finish_record,
    flatten,
    git_commit,
    new_record,
    now,
    package_versions,
    read_record,
    record_resume,
    run_session,
    state_digest,
    update_record,
    write_metrics,
    write_record,
)


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_path(output: OutputSpec, task: str, model_short: str, prefix: str = "") -> Path:
    """`<root>/<task>_<model>/<run-name>`, or `output_dir` when given."""
    if output.output_dir:
        return Path(output.output_dir).expanduser()
    name = output.run_name or f"{prefix}{timestamp()}"
    return Path(output.root).expanduser() / f"{task}_{model_short}" / name


# What a single-machine run writes; --overwrite removes these and nothing else. A failed run keeps its
# record and its tracker logs (TRACKER_DIRS), and loses its partial outputs (the rest).
TRACKER_DIRS = set(ownership.TRACKER_DIRS)
RUN_ENTRIES = {RUN_RECORD, METRICS, "adapter", "best", "model", *TRACKER_DIRS}
RUN_OPTION = "--run-name / --output-dir"


def claim_run_dir(path: Path, *, overwrite: bool, what: str = RUN_OPTION) -> Path:
    """Create the run folder, refusing to mix a new run into an old one unless asked to overwrite.

    A folder that holds only a failed or interrupted single-machine run is started again without
    `--overwrite`: a dead run must not block its name. Overwriting only ever deletes a fedlora run
    (ownership.RUN): a folder holding anything else is refused, so a mistyped `--output-dir ~
    --overwrite` cannot wipe a directory.
    """
    import shutil

    path = Path(path).expanduser()
    dead = path.is_dir() and _is_dead_run(path)
    path = ownership.claim(path, ownership.RUN, overwrite=overwrite or dead, option=what)
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
    return (
        f"interrupted: {complete_rounds(run_dir, complete)}; continue with `fedlora rounds … "
        f"--output-dir {run_dir} --resume`"
    )


def complete_rounds(run_dir: Path, complete: int) -> str:
    """The one phrase for what a stopped run keeps (never "rounds 1..0")."""
    if complete == 0:
        return f"no round of {run_dir} was complete"
    if complete == 1:
        return f"round 1 of {run_dir} is complete"
    return f"rounds 1-{complete} of {run_dir} are complete"


def _is_dead_run(path: Path) -> bool:
    """A folder holding only a failed or interrupted run of fedlora's: starting again there loses nothing."""
    from fedlora_cli.runs.query import status_of

    try:
        return status_of(path, read_record(path)) in (FAILED, INTERRUPTED)
    except InputError:
        return False


def run_record(
    *,
    command: str,
    config: Any,
    argv: list[str] | None,
    seeds: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What run.json holds when a run starts (status `running`), as a dict; see record.RunRecord."""
    return new_record(command=command, config=config, argv=argv, seeds=seeds, extra=extra).to_json()


# ---------------------------------------------------------------------------------------------------
# the federated run tree: round_NNN/client_NNN/adapter, round_NNN/global/adapter, final/adapter

ADAPTER_DIR = "adapter"  # inside round_NNN/global/, round_NNN/client_NNN/ and final/


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

    @property
    def best_dir(self) -> Path:
        """--select best: the round chosen on the validation split, exported as one plain PEFT adapter."""
        return self.root / "best"

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
        for final in (self.final_dir, self.best_dir):  # both are made again when the run ends
            if final.exists():
                shutil.rmtree(final)
                removed.append(final)
        atomic.remove_stale_temporaries(self.root)
        return removed
