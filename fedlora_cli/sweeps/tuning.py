"""Tuning: each tuned cell's points scored on the validation split over the tune seeds, the choice, its
record.

A point's score on one tune seed is the validation metric of that run's reported adapter (final metrics'
`validation`: the selected round or epoch with --select best, else the last), never a dev score: the dev split
only reports. A run that scores its clients on local validation splits (--client-validation-fraction) is
scored by the mean over its clients of their final models on those instead (`per_client.validation`): a
per-client comparison reports the clients' local tests, and chooses on their validation splits.

The cell's choice is the point with the best mean over the tune seeds; a point whose mean is not finite (a
diverged run's NaN) never wins; ties go to the first in grid order. Once made, the choice is recorded in
sweep.json (`tuning`) with what it was made from, and a sweep run again uses it and never tunes that cell
again: a recorded choice whose points, tune seeds, metric or cell options differ from the file's is refused.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError
from fedlora_cli.ownership import RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, now
from fedlora_cli.sweeps.record import canonical
from fedlora_cli.sweeps.spec import Cell, Sweep, TunePoint

CHOICES = "tuning"  # sweep.json: {cell name: the choice recorded for it}


@dataclass(frozen=True)
class PointScore:
    point: TunePoint
    values: dict[int, float]  # tune seed -> validation score of that seed's complete run (NaN kept)
    runs: int  # planned runs (tune seeds)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) >= 2 else None


def tune_metric(sweep: Sweep) -> str | None:
    """What chooses: [tune] metric, else [sweep] metric, else (None) each run's task's main metric."""
    return (sweep.tune.metric if sweep.tune is not None else None) or sweep.metric


def validation_score(folder: Path, metric: str | None) -> tuple[str, float] | None:
    """The validation score (metric, value) of a complete run's reported adapter; None while it is not
    complete."""
    from fedlora_cli.runs.query import load_run

    if not (folder / RUN_RECORD).is_file():
        return None
    info = load_run(folder)
    if info.status != COMPLETE or info.final is None:
        return None
    metric = metric or info.final.main_metric
    validation = info.final.extra.get("validation")
    clients = (info.final.extra.get("per_client") or {}).get("validation")
    if isinstance(clients, dict):
        if clients.get("metric") != metric or not isinstance(clients.get("mean"), int | float):
            raise InputError(
                f"{folder}: its clients' validation splits have no {metric!r} score: set [tune] metric to "
                f"{clients.get('metric')!r}"
            )
        return metric, float(clients["mean"])
    if not isinstance(validation, dict):
        raise InputError(
            f"{folder} has no validation score, and tuning chooses on the validation split: set "
            f"validation-fraction (or validation-examples), or client-validation-fraction for a per-client "
            f"comparison, for the tuned cells"
        )
    value = validation.get(metric) if metric else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InputError(
            f"{folder}: its validation split has no {metric!r} score (it has "
            f"{', '.join(sorted(validation))}): set [tune] metric to one of those"
        )
    return metric, float(value)


def score_cell(sweep: Sweep, cell: Cell) -> tuple[str | None, list[PointScore]]:
    """Each point of a tuned cell with its validation score per tune seed, read from the tune run folders."""
    metric = tune_metric(sweep)
    by_point: dict[str, dict[int, float]] = {p.name: {} for p in sweep.tune_points(cell)}
    for point, seed, folder in sweep.tune_runs(cell):
        scored = validation_score(folder, metric)
        if scored is not None:
            metric = metric or scored[0]
            by_point[point.name][seed] = scored[1]
    assert sweep.tune is not None
    runs = len(sweep.tune.seeds)
    return metric, [PointScore(p, by_point[p.name], runs) for p in sweep.tune_points(cell)]


def choose(scores: list[PointScore]) -> PointScore | None:
    """The point with the best mean validation score; None until every point has every tune seed's run.

    Strictly better replaces: a tie keeps the first in grid order. A non-finite mean never wins (every
    point non-finite: the first)."""
    if not scores or any(s.n < s.runs for s in scores):
        return None
    best = None
    for s in scores:
        mean = s.mean
        if mean is not None and math.isfinite(mean) and (best is None or mean > best.mean):
            best = s
    return best or scores[0]


def choice_record(
    sweep: Sweep, cell: Cell, metric: str | None, scores: list[PointScore], chosen: PointScore
) -> dict:
    """What sweep.json keeps of a choice: the point, and everything it was chosen from (checked on every
    rerun)."""
    assert sweep.tune is not None
    return {
        "point": chosen.point.options,
        "name": chosen.point.name,
        "metric": metric,
        "score": chosen.mean,
        "seeds": list(sweep.tune.seeds),
        "points": [s.point.name for s in scores],
        "scores": {s.point.name: {str(k): v for k, v in s.values.items()} for s in scores},
        "options": cell.options,
        "configured_metric": tune_metric(sweep),
        "chosen": now(),
    }


def recorded_choices(sweep: Sweep, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The choices sweep.json holds for the cells the file tunes; one made from other points, tune seeds,
    metric or cell options than the file now gives is refused (a rerun never mixes two tunings)."""
    saved = record.get(CHOICES)
    saved = saved if isinstance(saved, dict) else {}
    out = {}
    for cell in sweep.cells:
        points = sweep.tune_points(cell)
        choice = saved.get(cell.name)
        if not points or not isinstance(choice, dict):
            continue
        assert sweep.tune is not None
        now_made_from = {
            "points": [p.name for p in points],
            "seeds": list(sweep.tune.seeds),
            "configured_metric": tune_metric(sweep),
            "options": cell.options,
        }
        for key, value in now_made_from.items():
            if canonical({"v": choice.get(key)}) != canonical({"v": value}):
                raise InputError(
                    f"{sweep.folder / 'sweep.json'}: cell {cell.name} was tuned with other {key} "
                    f"({choice.get(key)!r} -> {value!r}): the sweep file changed; give the sweep another "
                    "name, or move its folder away"
                )
        if choice.get("name") not in now_made_from["points"] or not isinstance(choice.get("point"), dict):
            raise InputError(
                f"{sweep.folder / 'sweep.json'}: cell {cell.name}'s recorded choice is not one of its "
                f"points: move the sweep's folder away to tune it afresh"
            )
        out[cell.name] = choice
    return out


def tuning_rows(sweep: Sweep, choices: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The whole tuning table: each tuned cell × point, its validation score over the tune seeds (mean, sample
    std, each seed), and the chosen point marked."""
    assert sweep.tune is not None
    keys: list[str] = []
    for points in sweep.tune.points.values():
        for p in points:
            keys += [k for k in p.options if k not in keys]
    header = [
        "cell",
        "arm",
        *keys,
        "metric",
        "n",
        "validation mean",
        "validation std",
        *(f"seed {s}" for s in sweep.tune.seeds),
        "chosen",
    ]
    rows = []
    for cell in sweep.cells:
        if not sweep.tune_points(cell):
            continue
        metric, scores = score_cell(sweep, cell)
        chosen = choices.get(cell.name, {}).get("name")
        for s in scores:
            rows.append(
                [
                    cell.name,
                    cell.arm,
                    *(str(s.point.options.get(k, "")) for k in keys),
                    metric or "",
                    f"{s.n}/{s.runs}",
                    _fmt(s.mean),
                    _fmt(s.std),
                    *(_fmt(s.values.get(seed)) for seed in sweep.tune.seeds),
                    "✓" if s.point.name == chosen else "",
                ]
            )
    return header, rows


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""
