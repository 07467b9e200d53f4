"""The sweep file: its TOML checked, its grid expanded into cells and its [tune] grid into points (option keys
are checked by the CLI)."""

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
TUNE_DIR = "tune"  # tune runs: <root>/<sweep>/tune/<cell>__<point>-seed<k>
# what gives a run the validation split tuning reads (the last: each client's own, scored per client)
HOLDOUT = ("validation-fraction", "validation-examples", "client-validation-fraction")


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


def option_key(key: Any) -> str:
    """An option's key as the sweep compares it: `--config` files accept `learning_rate` for
    `learning-rate`."""
    return str(key).replace("_", "-")


def with_point(options: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """`options` with `point`'s values in place of the same options, however either spells its keys."""
    keys = {option_key(k) for k in point}
    return {**{k: v for k, v in options.items() if option_key(k) not in keys}, **point}


def holds_out(options: dict[str, Any]) -> bool:
    """Whether runs with these options carve a validation split (what tuning chooses on)."""
    return any(option_key(k) in HOLDOUT and v not in (None, 0, False) for k, v in options.items())


@dataclass(frozen=True)
class TunePoint:
    name: str  # `<key>=<value>_…`: names the tune runs' folders
    options: dict[str, Any]  # the options it sets, over the cell's own


@dataclass(frozen=True)
class TuneSpec:
    """`[tune]`: every point of an arm's tune grid runs on the tune seeds for each cell of that arm; the point
    with the best mean validation score (ties: the first in grid order) is the cell's, on the [sweep] seeds.

    seeds: the tune seeds, none of them a [sweep] seed; metric: what chooses (default: the sweep's metric,
    else the task's main one), read from the validation split; points: {arm: its points in grid order} — the
    common [tune.grid] with [tune.arms.<arm>] over it key by key (an arm's list replaces the common one for
    that option, a new option adds a dimension, `[]` drops one); an arm without points is not tuned."""

    seeds: tuple[int, ...]
    metric: str | None
    points: dict[str, tuple[TunePoint, ...]]


@dataclass(frozen=True)
class TableSpec:
    """`[sweep.table]`: the report as a pivot — one row per setting, one column per value of an option.

    rows: what makes a row (`arm`, and/or option names such as `aggregation`); columns: the option whose
    values become columns (e.g. `task`), averaged in a last column; reference: the arm every row's gap is
    measured against (e.g. the centralised arm); also: {column value: metric}, an extra column of
    another metric for that value (e.g. {mrpc = "f1"}); figures: an option — one figure per value of it;
    compare: an option (or `arm`) whose values are compared seed by seed within each group of cells that
    agree on every other grid key (a paired t-test against the group's best mean); learn_margin: how far
    above its majority-class score the reference arm must be on a column value for it to count as learned
    (below it, the value is marked and left out of the average). Values are shown × 100 (as GLUE tables are).
    """

    rows: tuple[str, ...]
    columns: str
    reference: str | None = None
    also: dict[str, str] = field(default_factory=dict)
    figures: str | None = None
    compare: str | None = None
    learn_margin: float = 0.02  # 2 points


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
    tune: TuneSpec | None = None

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def runs(self) -> list[tuple[Cell, int, Path]]:
        """Every (cell, seed), seed by seed: the first seed of every cell comes first, so a sweep that is
        stopped early still has a whole table (of fewer seeds), and later seeds narrow it."""
        return [(c, s, self.folder / f"{c.name}-seed{s}") for s in self.seeds for c in self.cells]

    def tune_points(self, cell: Cell) -> tuple[TunePoint, ...]:
        """The points `cell` is tuned over; none: the cell runs as its options say."""
        return self.tune.points.get(cell.arm, ()) if self.tune is not None else ()

    def tune_runs(self, cell: Cell) -> list[tuple[TunePoint, int, Path]]:
        """Every (point, tune seed) of a cell, seed by seed."""
        assert self.tune is not None
        return [
            (p, s, self.folder / TUNE_DIR / f"{cell.name}__{p.name}-seed{s}")
            for s in self.tune.seeds
            for p in self.tune_points(cell)
        ]

    def at_point(self, cell: Cell, point: dict[str, Any]) -> Cell:
        """The cell with a tune point's options over its own (same name: its runs are the cell's)."""
        return Cell(cell.name, cell.arm, cell.command, with_point(cell.options, point), cell.point)


def load_sweep(path: str | os.PathLike, data: dict[str, Any]) -> Sweep:
    """Check a sweep file's structure and expand its grid into cells (option keys are checked by the
    caller)."""
    path = Path(path)
    known = {"sweep", "base", "arms", "tune"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(
            f"sweep {path}: unknown table [{unknown[0]}]; a sweep has [sweep], [base], [arms.<name>] and "
            "[tune]"
        )
    head = data.get("sweep", {})
    base = data.get("base", {})
    arms = data.get("arms", {})
    if not isinstance(head, dict) or not isinstance(base, dict) or not isinstance(arms, dict):
        raise InputError(f"sweep {path}: [sweep], [base] and [arms.<name>] must be tables")
    bad_head = sorted(set(head) - {"name", "root", "seeds", "metric", "table", "max-runs"})
    if bad_head:
        raise InputError(
            f"sweep {path}: unknown key {bad_head[0]!r} in [sweep] (name, root, seeds, metric, table, "
            "max-runs)"
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
    tune_seeds, tune_metric, tune_grids = _tune_grids(data.get("tune"), arms, seeds, f"sweep {path} [tune]")
    _check_size(path, head, arms, len(seeds), tune_grids, len(tune_seeds))
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
    tune = None
    if tune_grids is not None:
        tune = TuneSpec(
            tuple(tune_seeds),
            tune_metric,
            {arm: _points(grid, f"sweep {path} [tune] for arm {arm}") for arm, grid in tune_grids.items()},
        )
        chooser = tune_metric or (str(head["metric"]) if head.get("metric") else None)
        for cell in cells:
            for point in tune.points.get(cell.arm, ()):
                _check_tunable(
                    f"sweep {path}: cell {cell.name}", with_point(cell.options, point.options), chooser
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
        tune,
    )


def _check_tunable(where: str, options: dict[str, Any], metric: str | None) -> None:
    """A tuned cell's runs have a validation split, and score the metric that chooses on it."""
    if not holds_out(options):
        raise InputError(
            f"{where} is tuned, and tuning chooses on the validation split, which its runs do not have: set "
            f"validation-fraction (or validation-examples), or client-validation-fraction for a per-client "
            f"comparison, in [base] or in its arm"
        )
    task = next((v for k, v in options.items() if option_key(k) == "task"), None)
    if metric and isinstance(task, str):
        from fedlora_cli.tasks import get_task

        try:
            known = get_task(task).metrics
        except (KeyError, ValueError):
            return  # an unknown task: the command's own check says so
        if metric not in known:
            raise InputError(
                f"{where}: tuning chooses on {metric!r}, which {task} does not score ({', '.join(known)})"
            )


def _tune_grids(
    data: Any, arms: dict[str, Any], sweep_seeds: list[int], where: str
) -> tuple[list[int], str | None, dict[str, dict[str, list[Any]]] | None]:
    """[tune] checked: its seeds, its metric, and each tuned arm's grid (the common one with the arm's over
    it)."""
    if data is None:
        return [], None, None
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a table (seeds, metric, grid, arms)")
    unknown = sorted(set(data) - {"seeds", "metric", "grid", "arms"})
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (seeds, metric, grid, arms.<arm>)")
    seeds = data.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise InputError(
            f"{where}: seeds must be a non-empty list of integers (the tune seeds), got {seeds!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise InputError(f"{where}: seeds repeat: {seeds}")
    shared = sorted(set(seeds) & set(sweep_seeds))
    if shared:
        raise InputError(
            f"{where}: seed {shared[0]} is also a [sweep] seed: tune on other seeds, so that the reported "
            "runs are not the very runs that won the tuning"
        )
    metric = data.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise InputError(f'{where}: metric must be a metric\'s name, e.g. "accuracy"')
    common = _tune_table(_expand_env(data.get("grid", {}), where), f"{where} grid", drop=False)
    per_arm = data.get("arms", {})
    if not isinstance(per_arm, dict) or not all(isinstance(t, dict) for t in per_arm.values()):
        raise InputError(f"{where}: arms must hold one table per arm, [tune.arms.<arm>] option = [values]")
    for arm in per_arm:
        if arm not in arms:
            raise InputError(f"{where}: [tune.arms.{arm}] names no arm of the sweep ({', '.join(arms)})")
    grids = {}
    for arm, table in arms.items():
        own = _tune_table(_expand_env(per_arm.get(arm, {}), where), f"{where} arms.{arm}", drop=True)
        grid = {k: v for k, v in {**common, **own}.items() if v}
        arm_grid = table.get("grid", {}) if isinstance(table, dict) else {}
        both = sorted({option_key(k) for k in arm_grid} & set(grid)) if isinstance(arm_grid, dict) else []
        if both:
            raise InputError(
                f"{where}: {both[0]!r} is both in the grid of [arms.{arm}] and tuned: a cell either sets an "
                f"option or has it chosen (drop it from one, or set `{both[0]} = []` in [tune.arms.{arm}])"
            )
        if grid:
            grids[arm] = grid
    if not grids:
        raise InputError(
            f"{where}: no option to tune: give [tune.grid] or [tune.arms.<arm>] option = [values]"
        )
    return seeds, metric, grids


def _tune_table(table: Any, where: str, *, drop: bool) -> dict[str, list[Any]]:
    if not isinstance(table, dict):
        raise InputError(f"{where} must be a table of option = [values]")
    out: dict[str, list[Any]] = {}
    for key, values in table.items():
        if not isinstance(values, list) or (not values and not drop):
            raise InputError(
                f"{where}: {key} must be a non-empty list of values"
                + (" (or [] to leave it untuned)" if drop else "")
            )
        out[option_key(key)] = values
    _check_owned(out, where)
    return out


def _points(grid: dict[str, list[Any]], where: str) -> tuple[TunePoint, ...]:
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        options = dict(zip(keys, combo, strict=True))
        points.append(TunePoint("_".join(f"{k}={label(v)}" for k, v in options.items()), options))
    names = [p.name for p in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"{where}: two points would share the folder name {twice[0]!r}: give distinct values"
        )
    return tuple(points)


def _check_size(
    path: Path,
    head: dict[str, Any],
    arms: dict[str, Any],
    seeds: int,
    tune: dict[str, dict[str, list[Any]]] | None = None,
    tune_seeds: int = 0,
) -> None:
    """Count the runs a sweep plans (cells × seeds, and each tuned cell's points × tune seeds) from the grids'
    lengths, before any cell or point is built, and refuse more than [sweep] max-runs (default MAX_RUNS)."""
    limit = head.get("max-runs", MAX_RUNS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"sweep {path}: max-runs must be a whole number >= 1, got {limit!r}")
    cells = tuning = 0
    for arm, table in arms.items():
        if not isinstance(table, dict):
            raise InputError(f"sweep {path} [arms.{arm}] must be a table")
        grid = table.get("grid", {})
        if not isinstance(grid, dict):
            raise InputError(f"sweep {path} [arms.{arm}]: grid must be a table of option = [values]")
        here = math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
        cells += here
        if tune and arm in tune:  # each of the arm's cells runs each point on each tune seed
            tuning += here * math.prod(len(v) for v in tune[arm].values()) * tune_seeds
    total = cells * seeds + tuning
    if total > limit:
        tuned = f" + {tuning:,} tune runs" if tuning else ""
        raise InputError(
            f"sweep {path}: {cells:,} cells × {seeds} seed(s){tuned} = {total:,} runs, more than the limit "
            f"of {limit:,}: shrink the grid, or set max-runs = {total} in [sweep] if you mean it"
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


TABLE_KEYS = ("rows", "columns", "reference", "also", "figures", "compare", "learn-margin")


def _table_spec(data: Any, where: str) -> TableSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a table ({', '.join(TABLE_KEYS)})")
    unknown = sorted(set(data) - set(TABLE_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} ({', '.join(TABLE_KEYS)})")
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
    reference, figures, compare = data.get("reference"), data.get("figures"), data.get("compare")
    if compare is not None and (not isinstance(compare, str) or not compare):
        raise InputError(
            f'{where}: compare must name an option of the grid (or "arm"), e.g. compare = "aggregation"'
        )
    margin = data.get("learn-margin", 0.02)
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise InputError(
            f"{where}: learn-margin must be a number in [0, 1) (0.02 = 2 points), got {margin!r}"
        )
    return TableSpec(
        tuple(rows),
        columns,
        str(reference) if reference else None,
        dict(also),
        str(figures) if figures else None,
        compare,
        float(margin),
    )


def _check_owned(options: dict[str, Any], where: str) -> None:
    for key in options:
        if str(key).replace("_", "-") in OWNED:
            raise InputError(
                f"{where}: {key!r} is set by the sweep (seeds go in [sweep] seeds; runs go to "
                f"<root>/<name>/<cell>-seed<k>)"
            )
