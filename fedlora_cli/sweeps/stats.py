"""The statistics of a sweep's report: mean ± std over seeds, the paired test between two cells, the learning
floor.

Seeds pair runs: two cells run with the same --seed get the same shards and the same validation split, so a
difference between them seed by seed is a difference of methods, not of data. The paired t-test
(scipy.stats.ttest_rel, two-sided) asks whether the mean of those differences is distinguishable from zero.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05  # a difference is "within noise" when the paired test's p-value is at least this
TEST = "paired t-test (scipy.stats.ttest_rel, two-sided)"


def finite(value: object) -> float | None:
    """A number that is finite (not a bool, NaN or inf) as a float; None for anything else."""
    return (
        float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


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


@dataclass(frozen=True)
class Paired:
    """One cell against another over the seeds both completed."""

    n: int  # paired seeds
    difference: float | None  # mean over paired seeds of (this - other)
    t: float | None
    p: float | None
    verdict: str  # within noise | worse | better | n/a

    @property
    def within_noise(self) -> bool:
        return self.verdict == "within noise"


def paired_test(this: dict[int, float], other: dict[int, float], *, alpha: float = ALPHA) -> Paired:
    """The paired t-test of `this` against `other` (seed -> value) over their common seeds.

    Fewer than 2 paired seeds: n/a. Differences that are all equal have no spread, so t is undefined: all zero
    is the same result (within noise, p = 1); a constant non-zero offset is n/a (the test cannot say; more
    seeds can). Otherwise within noise when p >= alpha, else worse or better by the sign of the difference."""
    seeds = sorted(set(this) & set(other))
    n = len(seeds)
    if n == 0:
        return Paired(0, None, None, None, "n/a")
    diffs = [this[s] - other[s] for s in seeds]
    difference = statistics.fmean(diffs)
    if n < 2:
        return Paired(n, difference, None, None, "n/a")
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, max(abs(d) for d in diffs)):
        if abs(difference) <= 1e-12:
            return Paired(n, 0.0, None, 1.0, "within noise")
        return Paired(n, difference, None, None, "n/a")
    from scipy.stats import ttest_rel

    result = ttest_rel([this[s] for s in seeds], [other[s] for s in seeds])
    t, p = float(result.statistic), float(result.pvalue)
    if not math.isfinite(p):
        return Paired(n, difference, None, None, "n/a")
    verdict = "within noise" if p >= alpha else ("worse" if difference < 0 else "better")
    return Paired(n, difference, t, p, verdict)


def learns(score: float, floor: float, margin: float) -> bool:
    """Whether a score clears what the majority-class answer scores by `margin` (0.02 = 2 points)."""
    return score - floor >= margin - 1e-12
