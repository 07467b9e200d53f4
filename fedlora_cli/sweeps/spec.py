"""The sweep file: its TOML checked and its grid expanded into cells (option keys are checked by the CLI)."""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError

MAX_RUNS = 10_000  # cells × seeds a sweep may plan unless its [sweep] max-runs says more (a typo'd grid of
#                    30^5 cells would otherwise be built in memory, and listed, before anything says so)
COMMANDS = ("train", "baseline", "rounds")  # what a cell may run: the commands that make run folders
OWNED = ("output-dir", "output-root", "run-name", "overwrite", "resume", "seed", "config")  # set by the sweep


def label(value: Any) -> str:
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
    if label(name) != name or name in (".", ".."):
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
        if label(arm) != arm:
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
            cell_name = "_".join([arm, *(f"{k}={label(v)}" for k, v in point.items())])
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
