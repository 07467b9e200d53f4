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
            m = [mean_std(by_round_metric.get(r, [])) for r in rounds]
            lo = [mean_std(by_round_loss.get(r, [])) for r in rounds]
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
