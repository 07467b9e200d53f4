"""Which evaluated round (or epoch) is kept, and when to stop: decided on the validation split only.

`--select best` keeps the round (epoch) whose adapter scores best on the held-out validation split
(holdout.py); `last` keeps the last one. `--early-stop P` ends training once P evaluations in a row have
not beaten the best so far. Nothing here ever sees the dev split: the dev scores are only reported beside
the choice, so permuting the dev labels changes no choice (a test does exactly that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

RULES = ("last", "best")


@dataclass
class Selection:
    """The choice so far, fed one validation score per evaluated round (or epoch) in order."""

    rule: str  # "best" or "last"
    metric: str  # the task's main metric, scored on the validation split
    patience: int | None = None  # --early-stop: evaluations without a new best before stopping
    best_step: int | None = None
    best_value: float = -math.inf
    last_step: int | None = None
    since_best: int = 0
    seen: list[tuple[int, float]] = field(default_factory=list)

    def observe(self, step: int, validation: dict[str, float] | None) -> None:
        """Record round (epoch) `step`'s validation metrics; higher is better for every GLUE metric."""
        if not validation or self.metric not in validation:
            return
        value = float(validation[self.metric])
        if math.isnan(value):  # a constant predictor's correlation: never better than a real score
            value = -math.inf
        self.seen.append((step, value))
        self.last_step = step
        if self.best_step is None or value > self.best_value:
            self.best_step, self.best_value, self.since_best = step, value, 0
        else:
            self.since_best += 1

    @property
    def stop(self) -> bool:
        """--early-stop: the last `patience` evaluations did not beat the best."""
        return self.patience is not None and self.since_best >= self.patience

    @property
    def chosen(self) -> int | None:
        """The round (epoch) whose adapter is kept: the best, or the last evaluated one."""
        return self.best_step if self.rule == "best" else self.last_step

    def describe(self) -> str:
        if self.chosen is None:
            return "no evaluation on the validation split"
        word = "best" if self.rule == "best" else "last"
        return (
            f"{word} validation {self.metric} "
            f"{self.best_value if self.rule == 'best' else self.seen[-1][1]:.4f}"
        )
