"""Running a sweep: what each (cell, seed) needs now (plan), and the runs one after another (run_sweep)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FAILED, INTERRUPTED, RUNNING, now, package_versions, status_for
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports, read_sweep_record
from fedlora_cli.sweeps.spec import Cell, Sweep

RESUMABLE = ("rounds",)  # interrupted runs of these continue (--resume); others start again


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    seed: int
    folder: Path
    action: str  # run | skip | restart | resume

    @property
    def name(self) -> str:
        return self.folder.name

    def options(self) -> dict[str, Any]:
        """What the command gets: the cell's options, the seed, where to write, and whether to resume."""
        out = {**self.cell.options, "seed": self.seed, "output-dir": str(self.folder)}
        if self.action == "resume":
            out["resume"] = str(self.folder)  # `--resume RUN`: the run's own record says the rest
        return out


def plan(sweep: Sweep) -> list[PlannedRun]:
    """What each (cell, seed) needs now, from its folder; runs made with other options are refused."""
    from fedlora_cli.runs.query import final_metrics_path, status_of
    from fedlora_cli.runs.record import read_record

    recorded = {
        r.get("folder"): r.get("options")
        for r in read_sweep_record(sweep).get("runs", [])
        if isinstance(r, dict)
    }
    planned = []
    for cell, seed, folder in sweep.runs():
        action = "run"
        if (folder / RUN_RECORD).is_file():
            before = recorded.get(folder.name)
            now_options = {**cell.options, "seed": seed}
            if before is not None and _canonical(before) != _canonical(now_options):
                changed = sorted(
                    k for k in before.keys() | now_options.keys() if before.get(k) != now_options.get(k)
                )
                raise InputError(
                    f"{folder} was made with other options ({changed[0]}: {before.get(changed[0])!r} -> "
                    f"{now_options.get(changed[0])!r}): the sweep file changed; give the sweep another name, or "
                    f"move that run away"
                )
            status = status_of(folder, read_record(folder))
            if status == RUNNING:
                raise InputError(
                    f"{folder} is being run by another process (pid in its run.json): wait for it"
                )
            if status == COMPLETE:
                action = "skip"
            elif cell.command in RESUMABLE and final_metrics_path(folder) is None:
                action = "resume"
            else:
                action = "restart"
        elif folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and holds no run.json: move it away, the sweep writes there")
        planned.append(PlannedRun(cell, seed, folder, action))
    return planned


def _canonical(options: dict[str, Any]) -> str:
    return json.dumps({str(k).replace("_", "-"): v for k, v in options.items()}, sort_keys=True, default=str)


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run name -> error line


def run_sweep(
    sweep: Sweep,
    execute: Callable[[str, dict[str, Any]], None],
    *,
    log: Callable[[str], None] = lambda line: None,
    argv: list[str] | None = None,
) -> SweepOutcome:
    """Every planned run, one after another, through `execute(command, options)`; sweep.json as it goes.

    A run that fails is recorded and the sweep goes on; an interruption stops the sweep (run it again to
    continue where it stopped).
    """
    planned = plan(sweep)
    check_reports(sweep)  # a report the sweep could not write at the end: said now, before hours of runs
    sweep.folder.mkdir(parents=True, exist_ok=True)
    outcome = SweepOutcome()
    previous = read_sweep_record(sweep)
    record: dict[str, Any] = {
        "name": sweep.name, "file": str(sweep.file), "spec": sweep.spec, "seeds": list(sweep.seeds),
        "metric": sweep.metric, "cells": [{"name": c.name, "arm": c.arm, "command": c.command, "options": c.options,
                                           "grid": c.point} for c in sweep.cells],
        "started": previous.get("started") or now(), "updated": now(), "status": RUNNING,
        "argv": list(argv or []), "versions": package_versions(), REPORTS: previous.get(REPORTS, {}),
        "runs": [{"cell": p.cell.name, "seed": p.seed, "folder": p.folder.name, "command": p.cell.command,
                  "options": {**p.cell.options, "seed": p.seed}, "status": "skipped" if p.action == "skip" else "pending"}
                 for p in planned],
    }  # fmt: skip

    def save(status: str = RUNNING) -> None:
        record["status"], record["updated"] = status, now()
        atomic.write_json(sweep.folder / SWEEP_RECORD, record)

    save()
    todo = [p for p in planned if p.action != "skip"]
    outcome.skipped = [p.name for p in planned if p.action == "skip"]
    if outcome.skipped:
        log(f"sweep {sweep.name}: {len(outcome.skipped)} of {len(planned)} runs complete already, skipped")
    for i, (p, entry) in enumerate(
        ((p, e) for p, e in zip(planned, record["runs"], strict=True) if p.action != "skip"), 1
    ):
        verb = {"run": "running", "restart": "starting again", "resume": "resuming"}[p.action]
        log(f"sweep {sweep.name}: {i}/{len(todo)} {verb} {p.name} ({p.cell.command})")
        try:
            execute(p.cell.command, p.options())
        except BaseException as e:
            status = status_for(e)
            entry["status"] = status
            if status == INTERRUPTED or not isinstance(e, FedloraError | InputError):
                save(INTERRUPTED if status == INTERRUPTED else FAILED)
                raise
            outcome.failed[p.name] = first_line(e)
            entry["error"] = first_line(e)
            log(f"sweep {sweep.name}: {p.name} failed: {first_line(e)}")
            save()
            continue
        entry["status"] = COMPLETE
        outcome.ran.append(p.name)
        save()
    save(FAILED if outcome.failed else COMPLETE)
    return outcome
