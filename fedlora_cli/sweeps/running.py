"""Running a sweep: what each run needs now (plan), and the runs one after another (run_sweep): first the tune
runs of the cells still to be tuned (each cell's choice recorded as soon as its tune runs are complete), then
every (cell, seed) with its options (a tuned cell's: with its chosen point)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FAILED, INTERRUPTED, RUNNING, now, package_versions, status_for
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, canonical, check_reports, read_sweep_record
from fedlora_cli.sweeps.spec import Cell, Sweep
from fedlora_cli.sweeps.tuning import CHOICES, choice_record, choose, recorded_choices, score_cell

RESUMABLE = ("rounds",)  # interrupted runs of these continue (--resume); others start again


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell  # with a tune point's options (tune runs) or the chosen point's (a tuned cell's runs)
    seed: int
    folder: Path
    action: str  # run | skip | restart | resume
    stage: str = "report"  # tune: a point of a cell on a tune seed; report: a cell on a [sweep] seed
    point: str | None = None  # tune runs: the point's name
    waits: bool = False  # a tuned cell's run before its choice: its options are not known yet

    @property
    def name(self) -> str:
        return self.folder.name

    def options(self) -> dict[str, Any]:
        """What the command gets: the cell's options, the seed, where to write, and whether to resume."""
        assert not self.waits, "a run that waits for its cell's tuning has no options yet"
        out = {**self.cell.options, "seed": self.seed, "output-dir": str(self.folder)}
        if self.action == "resume":
            out["resume"] = str(self.folder)  # `--resume RUN`: the run's own record says the rest
        return out


def _key(sweep: Sweep, folder: Path) -> str:
    """A run's folder as sweep.json names it: relative to the sweep's folder (`<cell>-seed<k>`, `tune/…`)."""
    return folder.relative_to(sweep.folder).as_posix()


def plan(sweep: Sweep) -> list[PlannedRun]:
    """What each run needs now, from its folder: the tune runs of every tuned cell whose choice is not
    recorded (a recorded one is never re-tuned: its tune runs are not even planned), then every (cell, seed).
    Runs made with other options are refused."""
    record = read_sweep_record(sweep)
    choices = recorded_choices(sweep, record)
    recorded = {r.get("folder"): r.get("options") for r in record.get("runs", []) if isinstance(r, dict)}
    planned = []
    for cell in sweep.cells:
        if sweep.tune_points(cell) and cell.name not in choices:
            for point, seed, folder in sweep.tune_runs(cell):
                tuned = sweep.at_point(cell, point.options)
                action = _action(sweep, tuned, seed, folder, recorded)
                planned.append(PlannedRun(tuned, seed, folder, action, "tune", point.name))
    for cell, seed, folder in sweep.runs():
        waits = False
        if sweep.tune_points(cell):
            if cell.name in choices:
                cell = sweep.at_point(cell, choices[cell.name]["point"])
            else:
                waits = True
        action = _action(sweep, cell, seed, folder, recorded, check_options=not waits)
        planned.append(PlannedRun(cell, seed, folder, action, waits=waits))
    return planned


def _action(
    sweep: Sweep, cell: Cell, seed: int, folder: Path, recorded: dict[str, Any], *, check_options: bool = True
) -> str:
    from fedlora_cli.runs.query import final_metrics_path, status_of
    from fedlora_cli.runs.record import read_record

    if not (folder / RUN_RECORD).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and holds no run.json: move it away, the sweep writes there")
        return "run"
    if not check_options:  # a run of a cell not tuned yet: made before [tune] was added, with other options
        raise InputError(
            f"{folder} exists, but its cell's tuning is not recorded in {sweep.folder / SWEEP_RECORD}: it "
            "was made without the point tuning will choose; give the sweep another name, or move that run "
            "away"
        )
    before = recorded.get(_key(sweep, folder))
    now_options = {**cell.options, "seed": seed}
    if check_options and isinstance(before, dict) and canonical(before) != canonical(now_options):
        changed = sorted(k for k in before.keys() | now_options.keys() if before.get(k) != now_options.get(k))
        raise InputError(
            f"{folder} was made with other options ({changed[0]}: {before.get(changed[0])!r} -> "
            f"{now_options.get(changed[0])!r}): the sweep file changed; give the sweep another name, or "
            f"move that run away"
        )
    status = status_of(folder, read_record(folder))
    if status == RUNNING:
        raise InputError(f"{folder} is being run by another process (pid in its run.json): wait for it")
    if status == COMPLETE:
        return "skip"
    if cell.command in RESUMABLE and final_metrics_path(folder) is None:
        return "resume"
    return "restart"


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run name -> error line
    chosen: dict[str, str] = field(default_factory=dict)  # cell -> the point tuning chose for it this time
    waiting: list[str] = field(default_factory=list)  # tuned cells whose tuning is not complete: not run


def run_sweep(
    sweep: Sweep,
    execute: Callable[[str, dict[str, Any]], None],
    *,
    log: Callable[[str], None] = lambda line: None,
    argv: list[str] | None = None,
) -> SweepOutcome:
    """Every planned run, one after another, through `execute(command, options)`; sweep.json as it goes.

    Tune runs come first, cell by cell, and a cell's choice is recorded as soon as its tune runs are complete;
    a cell whose tuning is not complete (a tune run failed) does not run on the [sweep] seeds. A run that
    fails is recorded and the sweep goes on; an interruption stops the sweep (run it again to continue where
    it stopped).
    """
    planned = plan(sweep)
    check_reports(sweep)  # a report the sweep could not write at the end: said now, before hours of runs
    sweep.folder.mkdir(parents=True, exist_ok=True)
    outcome = SweepOutcome()
    previous = read_sweep_record(sweep)
    choices = recorded_choices(sweep, previous)
    before = {r.get("folder"): r for r in previous.get("runs", []) if isinstance(r, dict)}
    kept = [
        r
        for r in previous.get("runs", [])
        if isinstance(r, dict) and r.get("stage") == "tune" and str(r.get("cell")) in choices
    ]
    record: dict[str, Any] = {
        "name": sweep.name,
        "file": str(sweep.file),
        "spec": sweep.spec,
        "seeds": list(sweep.seeds),
        "metric": sweep.metric,
        "cells": [
            {"name": c.name, "arm": c.arm, "command": c.command, "options": c.options, "grid": c.point}
            for c in sweep.cells
        ],
        "started": previous.get("started") or now(),
        "updated": now(),
        "status": RUNNING,
        "argv": list(argv or []),
        "versions": package_versions(),
        REPORTS: previous.get(REPORTS, {}),
        **(
            {"tune": {"seeds": list(sweep.tune.seeds), "metric": sweep.tune.metric}, CHOICES: choices}
            if sweep.tune is not None
            else {}
        ),
        "runs": [],
    }

    def entry(p: PlannedRun) -> dict[str, Any]:
        key = _key(sweep, p.folder)
        options = (
            {**p.cell.options, "seed": p.seed} if not p.waits else (before.get(key) or {}).get("options")
        )
        status = "skipped" if p.action == "skip" else "waiting for tuning" if p.waits else "pending"
        out = {
            "cell": p.cell.name,
            "seed": p.seed,
            "folder": key,
            "command": p.cell.command,
            "options": options,
            "status": status,
        }
        return {**out, "stage": "tune", "point": p.point} if p.stage == "tune" else out

    tune = [(p, entry(p)) for p in planned if p.stage == "tune"]
    record["runs"] = kept + [e for _, e in tune] + [entry(p) for p in planned if p.stage == "report"]

    def save(status: str = RUNNING) -> None:
        record["status"], record["updated"] = status, now()
        # the report files as sweep.json says now: a `--report` made while this sweep runs records what it
        # wrote there, and a save from the record read at the start would forget it
        owned = read_sweep_record(sweep).get(REPORTS) if (sweep.folder / SWEEP_RECORD).is_file() else None
        if isinstance(owned, dict):
            record[REPORTS] = owned
        atomic.write_json(sweep.folder / SWEEP_RECORD, record)

    save()
    if tune:
        by_cell: dict[str, list[tuple[PlannedRun, dict[str, Any]]]] = {}
        for p, e in tune:
            by_cell.setdefault(p.cell.name, []).append((p, e))
        try:
            _run_all(
                sweep,
                tune,
                execute,
                outcome,
                log,
                save,
                what="tune runs",
                after=lambda p: _tuned(sweep, p, by_cell, record, outcome, log, save),
            )
        except InputError:  # a choice that cannot be made (a run without the choosing metric): said, recorded
            save(FAILED)
            raise
    report_runs = [p for p in plan(sweep) if p.stage == "report"]  # the choices made now give their options
    outcome.waiting = sorted({p.cell.name for p in report_runs if p.waits})
    for name in outcome.waiting:
        log(
            f"sweep {sweep.name}: {name} is not tuned (a tune run failed): its runs wait; run the sweep again"
        )
    report = [(p, entry(p)) for p in report_runs]
    record["runs"] = kept + [e for _, e in tune] + [e for _, e in report]
    save()
    _run_all(sweep, [(p, e) for p, e in report if not p.waits], execute, outcome, log, save, what="runs")
    save(FAILED if outcome.failed or outcome.waiting else COMPLETE)
    return outcome


def _run_all(
    sweep: Sweep,
    runs: list[tuple[PlannedRun, dict[str, Any]]],
    execute: Callable[[str, dict[str, Any]], None],
    outcome: SweepOutcome,
    log: Callable[[str], None],
    save: Callable[..., None],
    *,
    what: str,
    after: Callable[[PlannedRun], None] = lambda p: None,
) -> None:
    """Run what is not complete, one after another; `after(run)` once each run is done with (ran, failed,
    skipped)."""
    todo = [p for p, _ in runs if p.action != "skip"]
    skipped = [p.name for p, _ in runs if p.action == "skip"]
    outcome.skipped += skipped
    if skipped:
        log(f"sweep {sweep.name}: {len(skipped)} of {len(runs)} {what} complete already, skipped")
    i = 0
    for p, entry in runs:
        if p.action == "skip":
            after(p)
            continue
        i += 1
        verb = {"run": "running", "restart": "starting again", "resume": "resuming"}[p.action]
        stage = "tune " if p.stage == "tune" else ""
        log(f"sweep {sweep.name}: {stage}{i}/{len(todo)} {verb} {p.name} ({p.cell.command})")
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
        else:
            entry["status"] = COMPLETE
            outcome.ran.append(p.name)
            save()
        after(p)


def _tuned(
    sweep: Sweep,
    p: PlannedRun,
    by_cell: dict[str, list[tuple[PlannedRun, dict[str, Any]]]],
    record: dict[str, Any],
    outcome: SweepOutcome,
    log: Callable[[str], None],
    save: Callable[..., None],
) -> None:
    """After a cell's last tune run: its choice, from the tune runs' validation scores, recorded at once."""
    if by_cell[p.cell.name][-1][0] is not p:
        return
    cell = next(c for c in sweep.cells if c.name == p.cell.name)
    metric, scores = score_cell(sweep, cell)
    chosen = choose(scores)
    if chosen is None:
        return
    record[CHOICES][cell.name] = choice_record(sweep, cell, metric, scores, chosen)
    outcome.chosen[cell.name] = chosen.point.name
    score = "–" if chosen.mean is None else f"{chosen.mean:.4f}"
    log(
        f"sweep {sweep.name}: {cell.name}: tuning chose {chosen.point.name} (validation {metric} {score}, "
        f"mean over tune seeds {', '.join(map(str, sweep.tune.seeds if sweep.tune else ()))})"
    )
    save()
