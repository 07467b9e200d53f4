"""The sweep's report: each cell's metric over seeds read from the run folders, its tables and files."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import InputError
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE
from fedlora_cli.sweeps.figures import plot_sweep
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports, file_sha256, read_sweep_record
from fedlora_cli.sweeps.spec import Cell, Sweep, label
from fedlora_cli.sweeps.stats import plus_minus


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


def write_report(sweep: Sweep, cells: list[CellReport], *, figure: bool = True) -> dict[str, Path]:
    """report.csv, report.md and (with matplotlib) report.png in the sweep's folder.

    A report file is replaced only when this sweep wrote it (check_reports); sweep.json records what it wrote."""
    check_reports(sweep)
    written: dict[str, Path] = {}
    try:
        _write_reports(sweep, cells, figure, written)
    finally:  # what was written is recorded, even when a later file fails
        if written:
            record = read_sweep_record(sweep)
            owned = record.get(REPORTS) if isinstance(record.get(REPORTS), dict) else {}
            owned.update({p.name: file_sha256(p) for p in written.values() if p.is_file()})
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
            name = f"report-{label(value)}.png"
            written[f"png {value}"] = plot_sweep(
                sweep,
                subset,
                sweep.folder / name,
                title=f"{sweep.name}: {value}",
                drop=f"{by}={label(value)}",
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
            row.append(plus_minus([*r.values.values()]) if r else "")
            if col in t.also:
                extra = (
                    [_value_of(sweep.folder / f"{r.cell.name}-seed{s}", t.also[col]) for s in r.values]
                    if r
                    else []
                )
                row.append(plus_minus([v for v in extra if v is not None]))
        averages = seed_averages(by_col)
        row.append(plus_minus(averages))
        if t.reference:
            gap = statistics.fmean(averages) - ref_mean if averages and ref_mean is not None else None
            row.append("" if gap is None else f"{100 * gap:+.1f}")
        rows.append(row)
    return header, rows


def _metric_of(groups: dict[tuple, dict[Any, CellReport]], column: Any) -> str:
    return next((g[column].metric for g in groups.values() if column in g and g[column].metric), "metric")
