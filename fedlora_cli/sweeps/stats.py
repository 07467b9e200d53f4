"""The statistics of a sweep's report: mean ± std over seeds."""

from __future__ import annotations

import statistics


def plus_minus(values: list[float]) -> str:
    """mean ± sample std over seeds, × 100 (one decimal); the mean alone for one seed."""
    if not values:
        return ""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)
