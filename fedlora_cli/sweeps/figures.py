"""The sweep's figures: metric and training loss per round, mean ± std over seeds, one curve per cell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora_cli.sweeps.stats import mean_std

if TYPE_CHECKING:
    from fedlora_cli.sweeps.reporting import CellReport
    from fedlora_cli.sweeps.spec import Sweep


def plot_sweep(
    sweep: Sweep, cells: list[CellReport], path: Path, title: str | None = None, drop: str | None = None
) -> Path:
    """One figure: per cell, the metric and training loss per round, mean with a ± std band over seeds.

    `drop`: a `key=value` part of the cell names that every cell here shares (left out of the legend)."""
    from fedlora_cli.plots import Curve, plot_curves
    from fedlora_cli.runs.history import read_history

    metric = next((c.metric for c in cells if c.metric), None) or "metric"
    histories = {
        (r.cell.name, seed): read_history(sweep.folder / f"{r.cell.name}-seed{seed}")
        for r in cells
        for seed in r.values
    }
    # The dev split per round when the runs scored it; else (--no-dev-each-round) the validation split, and
    # the axis says which: the curves show how a run got there, the tables what it reports.
    dev_rounds = dev_each_round(histories.values(), metric)
    label = metric if dev_rounds else f"validation {metric}"

    def value(row):
        if dev_rounds:
            return row.metric(metric)
        v = (row.validation or {}).get(metric)
        return float(v) if isinstance(v, int | float) else None

    curves = []
    for report_ in cells:
        by_round_metric: dict[int, list[float]] = {}
        by_round_loss: dict[int, list[float]] = {}
        by_round_error: dict[int, list[float]] = {}
        for seed in report_.values:
            for row in histories[(report_.cell.name, seed)]:
                if (m := value(row)) is not None:
                    by_round_metric.setdefault(row.round, []).append(m)
                if row.train_loss is not None:
                    by_round_loss.setdefault(row.round, []).append(float(row.train_loss))
                if isinstance(error := row.aggregation.get("error"), int | float):
                    by_round_error.setdefault(row.round, []).append(float(error))
        rounds = sorted(by_round_metric.keys() | by_round_loss.keys())
        if rounds:
            m = [mean_std(by_round_metric.get(r, [])) for r in rounds]
            lo = [mean_std(by_round_loss.get(r, [])) for r in rounds]
            er = [mean_std(by_round_error.get(r, [])) for r in rounds]
            curves.append(
                Curve(
                    _legend(report_.cell.name, drop),
                    rounds,
                    [x[0] for x in m],
                    [x[0] for x in lo],
                    [x[1] for x in m],
                    [x[1] for x in lo],
                    error=[x[0] for x in er],
                    error_std=[x[1] for x in er],
                )
            )
        elif dev_rounds:
            curves.append(Curve(_legend(report_.cell.name, drop), final=report_.mean, final_std=report_.std))
        else:  # a centralised reference on the same axis: its validation score
            held = [
                v
                for seed in report_.values
                if (v := _final_validation(sweep, report_, seed, metric)) is not None
            ]
            mean, std = mean_std(held)
            curves.append(Curve(_legend(report_.cell.name, drop), final=mean, final_std=std))
    title = title or f"sweep {sweep.name}"
    counts = sorted({len(c.values) for c in cells if c.values}) or [0]
    seeds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])
    seeds += " seed" if counts[-1] == 1 else " seeds"
    return plot_curves(curves, path, metric=label, title=f"{title} (mean ± std over {seeds})")


def _final_validation(sweep: Sweep, report_: CellReport, seed: int, metric: str) -> float | None:
    from fedlora_cli.runs.query import load_run

    info = load_run(sweep.folder / f"{report_.cell.name}-seed{seed}")
    held = info.final.extra.get("validation") if info.final is not None else None
    value = held.get(metric) if isinstance(held, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _legend(name: str, drop: str | None) -> str:
    """A cell's name without the part every curve of the figure shares."""
    if not drop:
        return name
    parts = [p for p in name.split("_") if p != drop]
    return "_".join(parts) or name


def dev_each_round(histories, metric: str) -> bool:
    """Whether the runs scored the dev split every round: not when any round was scored on the validation
    split alone (--no-dev-each-round, whose runs score dev at their last round only)."""
    return not any(
        row.round >= 1 and row.metric(metric) is None and (row.validation or {}).get(metric) is not None
        for rows in histories
        for row in rows
    )


def plot_clients(sweep: Sweep, cells: list[CellReport], path: Path) -> Path | None:
    """One box per cell over every client of every seed's run (each client's own model on its local test
    split), the clients drawn as points, the mean as a diamond; None when no run scored its clients."""
    from fedlora_cli.plots import plot_client_distribution

    groups = [
        (r.cell.name, [v for seed in sorted(r.clients) for v in r.clients[seed].get("values", [])])
        for r in cells
        if r.clients
    ]
    if not any(values for _, values in groups):
        return None
    metric = next((r.metric for r in cells if r.metric), None) or "metric"
    seeds = sorted({seed for r in cells for seed in r.clients})
    title = f"{sweep.name}: the clients of seeds {', '.join(map(str, seeds))}"
    return plot_client_distribution(groups, path, metric=metric, title=title)
