"""The sweep's report: each cell's metric over seeds read from the run folders, and the tables made of them.

The tables: per cell, the reported adapter's dev metric (what --select chose on the validation split) and,
where runs record it, the last round's (or epoch's); with [sweep.table] the pivot of both, with tasks that do
not learn marked and left out of the average, and the paired comparison of one option's values; with [tune]
the whole tuning table. Every table goes to a CSV of its own and into a markdown file; `sweep --report` prints
the same tables.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import InputError
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FinalMetrics
from fedlora_cli.sweeps.clients import client_stats, clients_rows
from fedlora_cli.sweeps.figures import plot_clients, plot_sweep
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports, file_sha256, read_sweep_record
from fedlora_cli.sweeps.spec import Cell, Sweep, label
from fedlora_cli.sweeps.stats import ALPHA, TEST, finite, learns, paired_test, plus_minus
from fedlora_cli.sweeps.tuning import recorded_choices, tune_metric, tuning_rows

NOT_LEARNED = "does not learn at this budget"


@dataclass(frozen=True)
class CellReport:
    cell: Cell
    metric: str | None
    values: dict[int, float]  # seed -> the dev metric of that seed's reported adapter (complete runs)
    runs: int  # planned runs (seeds)
    last: dict[int, float] = field(default_factory=dict)  # seed -> the last round's (epoch's) dev metric
    majority: float | None = None  # what the majority-class answer scores on dev (mean over the seeds' runs)
    tuned: dict[str, Any] | None = None  # the point tuning chose for this cell
    has_last: bool = False  # whether its runs record the last round apart from the reported one
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> per-client stats (clients.py)

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

    def at_last(self) -> CellReport:
        """The same cell with the last round's values in place of the reported ones."""
        return dataclasses.replace(self, values=dict(self.last))


def report(sweep: Sweep) -> list[CellReport]:
    """Each cell's reported and last-round dev metric per seed, its majority-class floor and its tuned point,
    read from the run folders (and the choices in sweep.json)."""
    from fedlora_cli.runs.query import load_run

    choices = recorded_choices(sweep, read_sweep_record(sweep)) if sweep.tune is not None else {}
    out = []
    for cell in sweep.cells:
        values: dict[int, float] = {}
        last: dict[int, float] = {}
        floors: list[float] = []
        per_client: dict[int, dict[str, Any]] = {}
        has_last = False
        metric = sweep.metric
        for seed in sweep.seeds:
            folder = sweep.folder / f"{cell.name}-seed{seed}"
            if not (folder / RUN_RECORD).is_file():
                continue
            info = load_run(folder)
            if info.status != COMPLETE or info.final is None:
                continue
            metric = metric or info.main_metric
            if not metric:
                continue
            if (value := finite(info.final.metrics.get(metric))) is not None:
                values[seed] = value
            has_last = (
                has_last or isinstance(info.final.extra.get("last"), dict) or "epochs" in info.final.extra
            )
            if (value := _last_value(info.final, metric)) is not None:
                last[seed] = value
            if stats := client_stats(info.final.extra, _splits_fingerprint(info.record.extra)):
                per_client[seed] = stats
            majority = info.final.extra.get("majority")
            if isinstance(majority, dict) and (floor := finite(majority.get(metric))) is not None:
                floors.append(floor)
        tuned = choices.get(cell.name, {}).get("point")
        floor = statistics.fmean(floors) if floors else None
        out.append(
            CellReport(cell, metric, values, len(sweep.seeds), last, floor, tuned, has_last, per_client)
        )
    return out


def _splits_fingerprint(record_extra: dict[str, Any]) -> str | None:
    """A run's clients' local splits' fingerprint (run.json `client_test.sha256`); None if unrecorded."""
    client_test = record_extra.get("client_test")
    value = client_test.get("sha256") if isinstance(client_test, dict) else None
    return str(value) if value else None


def _last_value(final: FinalMetrics, metric: str) -> float | None:
    """The last round's (rounds: `last`) or epoch's (train --select best: `epochs`) dev metric; a run that
    reported its last adapter (no --select best) has it as its metrics."""
    last, epochs, selected = final.extra.get("last"), final.extra.get("epochs"), final.extra.get("selected")
    if isinstance(last, dict) and isinstance(last.get("dev"), dict):
        return finite(last["dev"].get(metric))
    if (
        isinstance(epochs, list)
        and epochs
        and isinstance(epochs[-1], dict)
        and isinstance(epochs[-1].get("dev"), dict)
    ):
        return finite(epochs[-1]["dev"].get(metric))
    if not isinstance(selected, dict) or selected.get("rule") != "best":
        return finite(final.metrics.get(metric))
    return None


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def _tuned_keys(cells: list[CellReport]) -> list[str]:
    keys: list[str] = []
    for r in cells:
        keys += [k for k in (r.tuned or {}) if k not in keys]
    return keys


def report_rows(sweep: Sweep, cells: list[CellReport]) -> tuple[list[str], list[list[str]]]:
    """The table: cell, arm, command, each grid key, each tuned option (its chosen value), metric, n, mean,
    std, and the per-seed values."""
    grid_keys: list[str] = []
    for c in sweep.cells:
        grid_keys += [k for k in c.point if k not in grid_keys]
    tuned = _tuned_keys(cells)
    header = [
        "cell",
        "arm",
        "command",
        *grid_keys,
        *(f"{k} (tuned)" for k in tuned),
        "metric",
        "n",
        "mean",
        "std",
        *(f"seed {s}" for s in sweep.seeds),
    ]
    rows = []
    for r in cells:
        rows.append(
            [
                r.cell.name,
                r.cell.arm,
                r.cell.command,
                *(str(r.cell.point.get(k, "")) for k in grid_keys),
                *(str((r.tuned or {}).get(k, "")) for k in tuned),
                r.metric or "",
                f"{r.n}/{r.runs}",
                _fmt(r.mean),
                _fmt(r.std),
                *(_fmt(r.values.get(s)) for s in sweep.seeds),
            ]
        )
    return header, rows


@dataclass(frozen=True)
class ReportTable:
    """One table of the report: `<name>.csv`, and a section of `<document>.md` (title, then notes, then
    rows)."""

    name: str
    document: str  # report | table | tuning
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: tuple[str, ...] = ()


def report_tables(sweep: Sweep, cells: list[CellReport]) -> list[ReportTable]:
    """Every table of the report, in the order the files and the terminal show them."""
    metric = next((c.metric for c in cells if c.metric), "metric")
    seeds = ", ".join(map(str, sweep.seeds))
    has_last = any(c.has_last for c in cells)
    tables = [
        ReportTable(
            "report",
            "report",
            f"{metric}, mean ± std over seeds {seeds}",
            *report_rows(sweep, cells),
            notes=_reported_notes(has_last),
        )
    ]
    if has_last:
        tables.append(
            ReportTable(
                "report-last",
                "report",
                f"the last round: {metric}, mean ± std over seeds {seeds}",
                *report_rows(sweep, [c.at_last() for c in cells]),
            )
        )
    if sweep.table is not None:
        tables.append(pivot_table(sweep, cells))
        if has_last:
            tables.append(pivot_table(sweep, cells, last=True))
        if sweep.table.compare:
            tables.append(compare_table(sweep, cells))
    if (per_client := clients_rows(cells, list(sweep.seeds))) is not None:
        tables.append(
            ReportTable(
                "clients",
                "table",
                f"each client's model on its own local test split: {metric}",
                *per_client,
                notes=(
                    f"× 100, mean ± sample std over seeds {seeds} of each run's statistic over its "
                    "clients: the mean, the mean of the worst 10 % of clients, the worst and the best "
                    "client. model: personal (each client's own adapter) or global (the one global adapter "
                    "on every client's test).",
                    "vs best: the clients' mean and worst 10 % against the cell with the best clients' "
                    "mean among those scored on the same local tests (the same seed's same split), × 100: "
                    f"the {TEST} over the seeds both completed; p ≥ {ALPHA:g} is within noise. Empty: no "
                    "other cell was scored on the same tests.",
                ),
            )
        )
    if sweep.tune is not None:
        choices = recorded_choices(sweep, read_sweep_record(sweep))
        chooser = tune_metric(sweep) or "score (each task's main metric)"
        tables.append(
            ReportTable(
                "tuning",
                "tuning",
                f"tuning: validation {chooser} over tune seeds {', '.join(map(str, sweep.tune.seeds))}",
                *tuning_rows(sweep, choices),
                notes=(
                    "Each point of a cell runs on every tune seed and is scored on the validation split (the "
                    "reported adapter's score: what --select chose); the cell's choice (✓) has the best mean "
                    "(ties: the first in grid order) and runs on the [sweep] seeds. The dev split never "
                    "enters the choice.",
                ),
            )
        )
    return tables


def _reported_notes(has_last: bool) -> tuple[str, ...]:
    if not has_last:
        return ()
    return (
        "The reported adapter of each run: the round (epoch) --select chose on the validation split, or the "
        "last; the last round's values follow in their own table.",
    )


def write_report(sweep: Sweep, cells: list[CellReport], *, figure: bool = True) -> dict[str, Path]:
    """Every table as `<name>.csv` and in its markdown file (report.md, table.md, tuning.md), and (with
    matplotlib) report.png in the sweep's folder.

    A report file is replaced only when this sweep wrote it (check_reports); sweep.json records what it
    wrote."""
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
    tables = report_tables(sweep, cells)
    for t in tables:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([t.header, *t.rows])
        written[f"{t.name} csv" if t.name != "report" else "csv"] = atomic.write_text(
            sweep.folder / f"{t.name}.csv", buf.getvalue()
        )
    for document in _ordered(t.document for t in tables):
        parts = [t for t in tables if t.document == document]
        text = ""
        for i, t in enumerate(parts):
            text += f"{'#' if i == 0 else '##'} {f'sweep {sweep.name}: ' if i == 0 else ''}{t.title}\n\n"
            text += "".join(f"{note}\n\n" for note in t.notes) + markdown_table(t.header, t.rows) + "\n"
        written["md" if document == "report" else f"{document} md"] = atomic.write_text(
            sweep.folder / f"{document}.md", text.rstrip("\n") + "\n"
        )
    if figure:
        try:
            from fedlora_cli.plots import require_matplotlib

            require_matplotlib()
        except InputError:
            return
        written["png"] = plot_sweep(sweep, cells, sweep.folder / "report.png")
        if (clients := plot_clients(sweep, cells, sweep.folder / "clients.png")) is not None:
            written["clients png"] = clients
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


def _value_of(folder: Path, metric: str, *, last: bool = False) -> float | None:
    from fedlora_cli.runs.query import load_run

    info = load_run(folder)
    if info.final is None or info.status != COMPLETE:
        return None
    return _last_value(info.final, metric) if last else finite(info.final.metrics.get(metric))


def pivot(sweep: Sweep, cells: list[CellReport], *, last: bool = False) -> tuple[list[str], list[list[str]]]:
    """The [sweep.table] view as (header, rows); see pivot_table."""
    t = pivot_table(sweep, cells, last=last)
    return t.header, t.rows


@dataclass(frozen=True)
class Learning:
    """Whether the reference arm learned a column value: its mean against the majority-class score."""

    column: Any
    score: float | None  # the reference's mean over seeds (reported values)
    floor: float | None  # the majority-class score

    def learned(self, margin: float) -> bool | None:
        return None if self.score is None or self.floor is None else learns(self.score, self.floor, margin)


def pivot_table(sweep: Sweep, cells: list[CellReport], *, last: bool = False) -> ReportTable:
    """The [sweep.table] view: a row per setting, a column per value of `columns` (mean ± std over seeds,
    × 100), extra metrics for some columns (`also`), the average over columns (mean ± std of each seed's
    average), and its gap to the `reference` arm's average.

    A column value on which the reference arm does not beat its majority-class score by learn-margin is marked
    "does not learn at this budget" and left out of the average (still shown); decided on the reported values,
    for both tables. `last`: the last round's values in place of the reported ones."""
    t = sweep.table
    assert t is not None
    columns = _ordered(r.cell.options.get(t.columns) for r in cells)
    groups = _groups(t.rows, t.columns, cells)
    learning = _learning(t.reference, groups, columns)
    dropped = [col for col in columns if learning[col].learned(t.learn_margin) is False]
    kept = [col for col in columns if col not in dropped]
    header = list(t.rows)
    for col in columns:
        header.append(f"{col} ({_metric_of(groups, col)})" + (f": {NOT_LEARNED}" if col in dropped else ""))
        if col in t.also:
            header.append(f"{col} ({t.also[col]})")
    average = "average" if not dropped else f"average (without {', '.join(map(str, dropped))})"
    header += [average, *([f"Δ vs {t.reference}"] if t.reference else [])]

    def values(r: CellReport) -> dict[int, float]:
        return r.last if last else r.values

    def seed_averages(by_col: dict[Any, CellReport]) -> list[float]:
        if not kept or not set(kept) <= set(by_col):
            return []
        seeds = set.intersection(*(set(values(by_col[c])) for c in kept))
        return [statistics.fmean(values(by_col[c])[s] for c in kept) for s in sorted(seeds)]

    reference = next((seed_averages(g) for k, g in groups.items() if t.reference and t.reference in k), [])
    ref_mean = statistics.fmean(reference) if reference else None
    rows = []
    for key, by_col in groups.items():
        row = ["–" if v is None else str(v) for v in key]
        for col in columns:
            r = by_col.get(col)
            row.append(plus_minus([*values(r).values()]) if r else "")
            if col in t.also:
                extra = (
                    [
                        _value_of(sweep.folder / f"{r.cell.name}-seed{s}", t.also[col], last=last)
                        for s in values(r)
                    ]
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
    which = "the last round" if last else "reported"
    seeds = ", ".join(map(str, sweep.seeds))
    notes = [
        f"× 100, mean ± sample std over seeds {seeds}; the average is the mean ± std over seeds of each "
        "seed's average over the columns."
    ]
    if t.reference:
        notes.append(_learning_note(t.reference, t.columns, t.learn_margin, learning, columns))
    return ReportTable(
        "table-last" if last else "table", "table", f"{which}: by {t.columns}", header, rows, tuple(notes)
    )


def _groups(
    rows: tuple[str, ...], columns: str, cells: list[CellReport]
) -> dict[tuple, dict[Any, CellReport]]:
    groups: dict[tuple, dict[Any, CellReport]] = {}
    for r in cells:
        key = tuple(r.cell.arm if k == "arm" else r.cell.options.get(k) for k in rows)
        groups.setdefault(key, {})[r.cell.options.get(columns)] = r
    return groups


def _learning(reference: str | None, groups: dict[tuple, dict[Any, CellReport]], columns: list[Any]) -> dict:
    """Per column value: the reference arm's mean (reported values) and its majority-class score."""
    out = {}
    for col in columns:
        r = next((g[col] for k, g in groups.items() if reference and reference in k and col in g), None)
        out[col] = Learning(col, r.mean if r else None, r.majority if r else None)
    return out


def _learning_note(reference: str, columns: str, margin: float, learning: dict, order: list[Any]) -> str:
    note = (
        f"A {columns} on which {reference} does not beat the majority-class score by {100 * margin:g} points "
        f"(learn-margin = {margin:g}) is marked “{NOT_LEARNED}” and left out of the average."
    )
    failed = [learning[c] for c in order if learning[c].learned(margin) is False]
    unknown = [str(c) for c in order if learning[c].learned(margin) is None]
    if failed:
        scores = [
            f"{x.column}: {reference} {100 * x.score:.1f}, majority class {100 * x.floor:.1f}" for x in failed
        ]
        note += f" {'; '.join(scores)}."
    if unknown:
        note += f" Not checked (no {reference} run with a majority-class score): {', '.join(unknown)}."
    return note


def _metric_of(groups: dict[tuple, dict[Any, CellReport]], column: Any) -> str:
    return next((g[column].metric for g in groups.values() if column in g and g[column].metric), "metric")


def compare_table(sweep: Sweep, cells: list[CellReport]) -> ReportTable:
    """[sweep.table] compare: within each group of cells that agree on every other grid key (and arm), each
    value of the compared option against the group's best mean, paired by seed: the mean difference, the
    paired t-test, its p-value, and "within noise" when p >= ALPHA."""
    t = sweep.table
    assert t is not None and t.compare is not None
    by = t.compare
    grid_keys: list[str] = []
    for c in sweep.cells:
        grid_keys += [k for k in c.point if k not in grid_keys]
    others = [k for k in (["arm"] if by != "arm" else []) + grid_keys if k != by]
    members = [r for r in cells if by == "arm" or by in r.cell.point]
    groups: dict[tuple, list[CellReport]] = {}
    for r in members:
        groups.setdefault(
            tuple(r.cell.arm if k == "arm" else r.cell.options.get(k) for k in others), []
        ).append(r)
    header = [*others, by, "metric", "seeds", "mean ± std", "Δ vs best", "t", "p", "verdict"]
    rows = []
    for key, group in groups.items():
        if len(group) < 2:
            continue
        best = None
        for r in group:
            if r.mean is not None and (best is None or r.mean > best.mean):  # a tie keeps the first
                best = r
        for r in group:
            value = r.cell.arm if by == "arm" else r.cell.options.get(by)
            head = [
                *("–" if v is None else str(v) for v in key),
                str(value),
                r.metric or "",
                str(r.n),
                plus_minus([*r.values.values()]),
            ]
            if best is None or r is best:
                rows.append([*head, "", "", "", "best" if r is best else "n/a"])
                continue
            test = paired_test(r.values, best.values)
            rows.append(
                [
                    *head,
                    "" if test.difference is None else f"{100 * test.difference:+.1f}",
                    "" if test.t is None else f"{test.t:.2f}",
                    "" if test.p is None else f"{test.p:.3g}",
                    test.verdict,
                ]
            )
    notes = (
        f"Each {by} against the best mean of its group (the cells that agree on every other grid key), × "
        f"100: the {TEST} over the seeds both completed — the same seed gives both the same shards and "
        f"validation split. Within noise: p ≥ {ALPHA:g}; n/a: fewer than 2 paired seeds (or differences "
        "without spread).",
    )
    return ReportTable("compare", "table", f"paired comparison of {by}", header, rows, notes)
