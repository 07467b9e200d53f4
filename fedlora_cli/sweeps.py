"""Sweeps: a grid of runs from one TOML file, run one after another, then a mean ± std table and a figure.

A cell is a command name plus its options (the keys of `--config` files); every (cell, seed) is a
normal run folder, `<root>/<sweep>/<cell>-seed<k>`. Re-running a sweep skips complete runs, starts
failed or interrupted single-machine runs again and resumes interrupted `rounds` runs. The runs
themselves are made by a callable the CLI passes in (it invokes the command exactly as the user
would), so a sweep run is indistinguishable from one typed by hand. The format, by example:

    [sweep]
    name = "sst2-noniid"       # default: the file's name without .toml
    root = "runs/sweeps"       # runs go to <root>/<name>/; default: runs
    seeds = [1, 2, 3]          # each cell runs once per seed (its --seed); default: [42]
    metric = "accuracy"        # what the report averages; default: the task's main metric

    [base]                     # options of every run (long option names, as in --config files)
    task = "sst2"
    max-train-samples = 2000

    [arms.fed]                 # an arm: a command, its options, and a grid over some of them
    command = "rounds"
    shards = "shards/sst2_k5"
    rounds = 5
    grid = { aggregation = ["svd", "naive"], lora-r = [4, 8] }

    [arms.central]             # no grid: one cell
    command = "train"
    epochs = 5                 # the same budget as 5 rounds of 1 local epoch
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.jsonfile import read_json
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FAILED, INTERRUPTED, RUNNING, now, package_versions, status_for

SWEEP_RECORD = "sweep.json"
MAX_RUNS = 10_000  # cells × seeds a sweep may plan unless its [sweep] max-runs says more (a typo'd grid of
#                    30^5 cells would otherwise be built in memory, and listed, before anything says so)
REPORTS = "reports"  # sweep.json: {report file name: sha256} of the reports this sweep wrote
COMMANDS = ("train", "baseline", "rounds")  # what a cell may run: the commands that make run folders
OWNED = ("output-dir", "output-root", "run-name", "overwrite", "resume", "seed", "config")  # set by the sweep
RESUMABLE = ("rounds",)  # interrupted runs of these continue (--resume); others start again


def _label(value: Any) -> str:
    """A grid value as it appears in a folder name: short, and safe in any shell and file system."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str) and ("/" in value or os.sep in value):
        text = Path(value.rstrip("/")).name
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text) or "x"


@dataclass(frozen=True)
class Cell:
    name: str  # `<arm>` or `<arm>_<key>=<value>_…`
    arm: str
    command: str
    options: dict[str, Any]  # base + arm + grid point (no seed, no output placement)
    point: dict[str, Any]  # the grid point alone


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


@dataclass(frozen=True)
class TableSpec:
    """`[sweep.table]`: the report as a pivot — one row per setting, one column per value of an option.

    rows: what makes a row (`arm`, and/or option names such as `aggregation`); columns: the option whose
    values become columns (e.g. `task`), averaged in a last column; reference: the arm every row's gap is
    measured against (e.g. the centralised arm); also: {column value: metric}, an extra column of
    another metric for that value (e.g. {mrpc = "f1"}); figures: an option — one figure per value of it.
    Values are shown × 100 (as GLUE tables are).
    """

    rows: tuple[str, ...]
    columns: str
    reference: str | None = None
    also: dict[str, str] = field(default_factory=dict)
    figures: str | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    file: Path
    root: Path
    seeds: tuple[int, ...]
    metric: str | None
    cells: tuple[Cell, ...]
    spec: dict[str, Any] = field(repr=False)
    table: TableSpec | None = None

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def runs(self) -> list[tuple[Cell, int, Path]]:
        """Every (cell, seed), seed by seed: the first seed of every cell comes first, so a sweep that is
        stopped early still has a whole table (of fewer seeds), and later seeds narrow it."""
        return [(c, s, self.folder / f"{c.name}-seed{s}") for s in self.seeds for c in self.cells]


def load_sweep(path: str | os.PathLike, data: dict[str, Any]) -> Sweep:
    """Check a sweep file's structure and expand its grid into cells (option keys are checked by the caller)."""
    path = Path(path)
    known = {"sweep", "base", "arms"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(
            f"sweep {path}: unknown table [{unknown[0]}]; a sweep has [sweep], [base] and [arms.<name>]"
        )
    head = data.get("sweep", {})
    base = data.get("base", {})
    arms = data.get("arms", {})
    if not isinstance(head, dict) or not isinstance(base, dict) or not isinstance(arms, dict):
        raise InputError(f"sweep {path}: [sweep], [base] and [arms.<name>] must be tables")
    bad_head = sorted(set(head) - {"name", "root", "seeds", "metric", "table", "max-runs"})
    if bad_head:
        raise InputError(
            f"sweep {path}: unknown key {bad_head[0]!r} in [sweep] (name, root, seeds, metric, table, max-runs)"
        )
    table_spec = _table_spec(head.get("table"), f"sweep {path} [sweep.table]")
    base, arms = _expand_env(base, f"sweep {path}"), _expand_env(arms, f"sweep {path}")
    name = str(head.get("name") or path.stem)
    if _label(name) != name or name in (".", ".."):
        raise InputError(f"sweep {path}: name {name!r} must be a plain folder name (letters, digits, . + -)")
    seeds = head.get("seeds", [42])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise InputError(f"sweep {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"sweep {path}: seeds repeat: {seeds}")
    if not arms:
        raise InputError(f"sweep {path}: no [arms.<name>] table: say which command(s) to run")
    _check_owned(base, f"sweep {path} [base]")
    _check_size(path, head, arms, len(seeds))
    cells: list[Cell] = []
    for arm, table in arms.items():
        where = f"sweep {path} [arms.{arm}]"
        if _label(arm) != arm:
            raise InputError(f"{where}: an arm's name must be letters, digits, . + - (it names folders)")
        table = dict(table)
        command = table.pop("command", None)
        if command not in COMMANDS:
            raise InputError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {command!r}")
        grid = table.pop("grid", {})
        if not isinstance(grid, dict):
            raise InputError(f"{where}: grid must be a table of option = [values]")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise InputError(f"{where}: grid.{key} must be a non-empty list of values")
        _check_owned(table, where)
        _check_owned(grid, f"{where} grid")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, combo, strict=True))
            cell_name = "_".join([arm, *(f"{k}={_label(v)}" for k, v in point.items())])
            cells.append(Cell(cell_name, arm, command, {**base, **table, **point}, point))
    names = [c.name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"sweep {path}: two cells would share the folder name {twice[0]!r}: rename an arm or a value"
        )
    root = Path(str(head.get("root", "runs"))).expanduser()
    metric = head.get("metric")
    return Sweep(
        name,
        path.resolve(),
        root,
        tuple(seeds),
        str(metric) if metric else None,
        tuple(cells),
        data,
        table_spec,
    )


def _check_size(path: Path, head: dict[str, Any], arms: dict[str, Any], seeds: int) -> None:
    """Count the runs a sweep plans (cells × seeds) from the grids' lengths, before any cell is built, and refuse
    more than [sweep] max-runs (default MAX_RUNS)."""
    limit = head.get("max-runs", MAX_RUNS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"sweep {path}: max-runs must be a whole number >= 1, got {limit!r}")
    cells = 0
    for arm, table in arms.items():
        if not isinstance(table, dict):
            raise InputError(f"sweep {path} [arms.{arm}] must be a table")
        grid = table.get("grid", {})
        if not isinstance(grid, dict):
            raise InputError(f"sweep {path} [arms.{arm}]: grid must be a table of option = [values]")
        cells += math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
    if cells * seeds > limit:
        raise InputError(
            f"sweep {path}: {cells:,} cells × {seeds} seed(s) = {cells * seeds:,} runs, more than the limit of "
            f"{limit:,}: shrink the grid, or set max-runs = {cells * seeds} in [sweep] if you mean it"
        )


def _expand_env(value: Any, where: str) -> Any:
    """`${NAME}` in option values is the environment variable NAME (paths that differ between machines:
    a model folder, the GLUE folder); an unset one is an error, never a literal `$NAME` path."""
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    for name in re.findall(r"\$\{(\w+)\}", value):
        if name not in os.environ:
            raise InputError(
                f"{where}: {value!r} needs the environment variable {name}: set it (see the file's comments)"
            )
    return re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], value)


def _table_spec(data: Any, where: str) -> TableSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a table (rows, columns, reference, also, figures)")
    unknown = sorted(set(data) - {"rows", "columns", "reference", "also", "figures"})
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (rows, columns, reference, also, figures)")
    rows, columns = data.get("rows", ["arm"]), data.get("columns")
    if (
        not isinstance(rows, list)
        or not all(isinstance(r, str) for r in rows)
        or not isinstance(columns, str)
    ):
        raise InputError(
            f'{where}: rows must be a list of names and columns a name, e.g. rows = ["arm"], columns = "task"'
        )
    also = data.get("also", {})
    if not isinstance(also, dict) or not all(isinstance(v, str) for v in also.values()):
        raise InputError(f'{where}: also must map a column value to a metric, e.g. also = {{ mrpc = "f1" }}')
    reference, figures = data.get("reference"), data.get("figures")
    return TableSpec(tuple(rows), columns, str(reference) if reference else None, dict(also),
                     str(figures) if figures else None)  # fmt: skip


def _check_owned(options: dict[str, Any], where: str) -> None:
    for key in options:
        if str(key).replace("_", "-") in OWNED:
            raise InputError(f"{where}: {key!r} is set by the sweep (seeds go in [sweep] seeds; runs go to "
                             f"<root>/<name>/<cell>-seed<k>)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# planning and running


def _sweep_record(sweep: Sweep) -> dict[str, Any]:
    path = sweep.folder / SWEEP_RECORD
    if not os.path.lexists(path):
        return {}
    return read_json(path, "sweep record", hint="move it away to start the sweep afresh")


def plan(sweep: Sweep) -> list[PlannedRun]:
    """What each (cell, seed) needs now, from its folder; runs made with other options are refused."""
    from fedlora_cli.runs.query import final_metrics_path, status_of
    from fedlora_cli.runs.record import read_record

    recorded = {
        r.get("folder"): r.get("options") for r in _sweep_record(sweep).get("runs", []) if isinstance(r, dict)
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
    previous = _sweep_record(sweep)
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


# ---------------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class CellReport:
    cell: Cell
    metric: str | None
    values: dict[int, float]  # seed -> the final metric of that seed's complete run
    runs: int  # planned runs (seeds)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None with fewer than two."""
        return statistics.stdev(self.values.values()) if len(self.values) >= 2 else None


def report(sweep: Sweep) -> list[CellReport]:
    """Mean and standard deviation over seeds of each cell's final metric, read from the run folders."""
    from fedlora_cli.runs.query import load_run

    out = []
    for cell in sweep.cells:
        values: dict[int, float] = {}
        metric = sweep.metric
        for seed in sweep.seeds:
            folder = sweep.folder / f"{cell.name}-seed{seed}"
            if not (folder / RUN_RECORD).is_file():
                continue
            info = load_run(folder)
            if info.status != COMPLETE or info.final is None:
                continue
            metric = metric or info.main_metric
            value = info.final.metrics.get(metric) if metric else None
            if isinstance(value, int | float) and math.isfinite(value):
                values[seed] = float(value)
        out.append(CellReport(cell, metric, values, len(sweep.seeds)))
    return out


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def report_rows(sweep: Sweep, cells: list[CellReport]) -> tuple[list[str], list[list[str]]]:
    """The table: cell, arm, command, each grid key, metric, n, mean, std, and the per-seed values."""
    grid_keys: list[str] = []
    for c in sweep.cells:
        grid_keys += [k for k in c.point if k not in grid_keys]
    header = ["cell", "arm", "command", *grid_keys, "metric", "n", "mean", "std",
              *(f"seed {s}" for s in sweep.seeds)]  # fmt: skip
    rows = []
    for r in cells:
        rows.append([r.cell.name, r.cell.arm, r.cell.command, *(str(r.cell.point.get(k, "")) for k in grid_keys),
                     r.metric or "", f"{r.n}/{r.runs}", _fmt(r.mean), _fmt(r.std),
                     *(_fmt(r.values.get(s)) for s in sweep.seeds)])  # fmt: skip
    return header, rows


def _is_report(name: str) -> bool:
    return name in ("report.csv", "report.md", "report.png", "table.csv", "table.md") or (
        name.startswith("report-") and name.endswith(".png")
    )


def check_reports(sweep: Sweep) -> None:
    """Every report file in the sweep's folder is one this sweep wrote and nobody changed since (its sha256 is in
    sweep.json): otherwise it is the user's, and writing the report would replace it. One line naming it."""
    if not sweep.folder.is_dir():
        return
    owned = _sweep_record(sweep).get(REPORTS)
    owned = owned if isinstance(owned, dict) else {}
    for path in sorted(sweep.folder.iterdir()):
        if _is_report(path.name) and not (
            path.is_file() and not path.is_symlink() and owned.get(path.name) == _sha256(path)
        ):
            raise InputError(
                f"{path} was not written by this sweep (or was changed since): fedlora never replaces what it "
                f"did not write; move it away, or give the sweep another name"
            )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_report(sweep: Sweep, cells: list[CellReport], *, figure: bool = True) -> dict[str, Path]:
    """report.csv, report.md and (with matplotlib) report.png in the sweep's folder.

    A report file is replaced only when this sweep wrote it (check_reports); sweep.json records what it wrote."""
    check_reports(sweep)
    written: dict[str, Path] = {}
    try:
        _write_reports(sweep, cells, figure, written)
    finally:  # what was written is recorded, even when a later file fails
        if written:
            record = _sweep_record(sweep)
            owned = record.get(REPORTS) if isinstance(record.get(REPORTS), dict) else {}
            owned.update({p.name: _sha256(p) for p in written.values() if p.is_file()})
            atomic.write_json(sweep.folder / SWEEP_RECORD, {**record, REPORTS: owned})
    return written


def _write_reports(sweep: Sweep, cells: list[CellReport], figure: bool, written: dict[str, Path]) -> None:
    header, rows = report_rows(sweep, cells)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    written["csv"] = atomic.write_text(sweep.folder / "report.csv", buf.getvalue())
    metric = next((c.metric for c in cells if c.metric), "metric")
    title = f"# sweep {sweep.name}: {metric}, mean ± std over seeds {', '.join(map(str, sweep.seeds))}\n\n"
    written["md"] = atomic.write_text(sweep.folder / "report.md", title + markdown_table(header, rows))
    if sweep.table is not None:
        header, rows = pivot(sweep, cells)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        written["table csv"] = atomic.write_text(sweep.folder / "table.csv", buf.getvalue())
        written["table md"] = atomic.write_text(sweep.folder / "table.md", markdown_table(header, rows))
    if figure:
        try:
            from fedlora_cli.plots import require_matplotlib

            require_matplotlib()
        except InputError:
            return
        written["png"] = plot_sweep(sweep, cells, sweep.folder / "report.png")
        by = sweep.table.figures if sweep.table is not None else None
        for value in _ordered(c.cell.options[by] for c in cells if by in c.cell.options) if by else []:
            # cells without the option (a centralised reference without --partition) go in every figure
            subset = [c for c in cells if c.cell.options.get(by, value) == value]
            name = f"report-{_label(value)}.png"
            written[f"png {value}"] = plot_sweep(
                sweep,
                subset,
                sweep.folder / name,
                title=f"{sweep.name}: {value}",
                drop=f"{by}={_label(value)}",
            )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ordered(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _value_of(folder: Path, metric: str) -> float | None:
    from fedlora_cli.runs.query import load_run

    info = load_run(folder)
    value = info.final.metrics.get(metric) if info.final is not None and info.status == COMPLETE else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def pivot(sweep: Sweep, cells: list[CellReport]) -> tuple[list[str], list[list[str]]]:
    """The [sweep.table] view: a row per setting, a column per value of `columns` (mean ± std over seeds,
    × 100), extra metrics for some columns (`also`), the average over columns (mean ± std of each seed's
    average), and its gap to the `reference` arm's average."""
    t = sweep.table
    assert t is not None
    columns = _ordered(r.cell.options.get(t.columns) for r in cells)
    groups: dict[tuple, dict[Any, CellReport]] = {}
    for r in cells:
        key = tuple(r.cell.arm if k == "arm" else r.cell.options.get(k) for k in t.rows)
        groups.setdefault(key, {})[r.cell.options.get(t.columns)] = r
    header = list(t.rows)
    for col in columns:
        header.append(f"{col} ({_metric_of(groups, col)})")
        if col in t.also:
            header.append(f"{col} ({t.also[col]})")
    header += ["average", *([f"Δ vs {t.reference}"] if t.reference else [])]

    def seed_averages(by_col: dict[Any, CellReport]) -> list[float]:
        if set(by_col) != set(columns):
            return []
        seeds = set.intersection(*(set(r.values) for r in by_col.values()))
        return [statistics.fmean(by_col[c].values[s] for c in columns) for s in sorted(seeds)]

    reference = next((seed_averages(g) for k, g in groups.items() if t.reference and t.reference in k), [])
    ref_mean = statistics.fmean(reference) if reference else None
    rows = []
    for key, by_col in groups.items():
        row = ["–" if v is None else str(v) for v in key]
        for col in columns:
            r = by_col.get(col)
            row.append(_pm([*r.values.values()]) if r else "")
            if col in t.also:
                extra = (
                    [_value_of(sweep.folder / f"{r.cell.name}-seed{s}", t.also[col]) for s in r.values]
                    if r
                    else []
                )
                row.append(_pm([v for v in extra if v is not None]))
        averages = seed_averages(by_col)
        row.append(_pm(averages))
        if t.reference:
            gap = statistics.fmean(averages) - ref_mean if averages and ref_mean is not None else None
            row.append("" if gap is None else f"{100 * gap:+.1f}")
        rows.append(row)
    return header, rows


def _metric_of(groups: dict[tuple, dict[Any, CellReport]], column: Any) -> str:
    return next((g[column].metric for g in groups.values() if column in g and g[column].metric), "metric")


def _pm(values: list[float]) -> str:
    """mean ± sample std over seeds, × 100 (one decimal); the mean alone for one seed."""
    if not values:
        return ""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def plot_sweep(
    sweep: Sweep, cells: list[CellReport], path: Path, title: str | None = None, drop: str | None = None
) -> Path:
    """One figure: per cell, the metric and training loss per round, mean with a ± std band over seeds.

    `drop`: a `key=value` part of the cell names that every cell here shares (left out of the legend)."""
    from fedlora_cli.plots import Curve, plot_curves
    from fedlora_cli.runs.history import read_history

    metric = next((c.metric for c in cells if c.metric), None) or "metric"
    curves = []
    for report_ in cells:
        by_round_metric: dict[int, list[float]] = {}
        by_round_loss: dict[int, list[float]] = {}
        for seed in report_.values:
            for row in read_history(sweep.folder / f"{report_.cell.name}-seed{seed}"):
                if (m := row.metric(metric)) is not None:
                    by_round_metric.setdefault(row.round, []).append(m)
                if row.train_loss is not None:
                    by_round_loss.setdefault(row.round, []).append(float(row.train_loss))
        rounds = sorted(by_round_metric.keys() | by_round_loss.keys())
        if rounds:
            m = [_mean_std(by_round_metric.get(r, [])) for r in rounds]
            lo = [_mean_std(by_round_loss.get(r, [])) for r in rounds]
            curves.append(Curve(_legend(report_.cell.name, drop), rounds, [x[0] for x in m], [x[0] for x in lo],
                                [x[1] for x in m], [x[1] for x in lo]))  # fmt: skip
        else:
            curves.append(Curve(_legend(report_.cell.name, drop), final=report_.mean, final_std=report_.std))
    title = title or f"sweep {sweep.name}"
    counts = sorted({len(c.values) for c in cells if c.values}) or [0]
    seeds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])
    seeds += " seed" if counts[-1] == 1 else " seeds"
    return plot_curves(curves, path, metric=metric, title=f"{title} (mean ± std over {seeds})")


def _legend(name: str, drop: str | None) -> str:
    """A cell's name without the part every curve of the figure shares."""
    if not drop:
        return name
    parts = [p for p in name.split("_") if p != drop]
    return "_".join(parts) or name
