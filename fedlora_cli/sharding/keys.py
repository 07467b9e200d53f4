"""What a task's examples are split by: strata for the balanced modes, categories for the category modes."""

from __future__ import annotations

import numpy as np

from fedlora_cli.data import RawSplit
from fedlora_cli.errors import InputError
from fedlora_cli.tasks import get_task

STSB_BIN_WIDTH = 0.2  # the reference's score bin for STS-B stratification


def bin_scores(scores: np.ndarray, width: float = STSB_BIN_WIDTH) -> np.ndarray:
    """The reference's STS-B bins: floor(score / width), so [0, 0.2) -> 0, [0.2, 0.4) -> 1, …

    Rounded before the floor: 0.6 / 0.2 is 2.9999999999999996 in floating point, and the reference's
    plain floor puts such scores one bin too low.
    """
    return np.floor(np.round(np.asarray(scores, dtype=np.float64) / width, 9)).astype(np.int64)


def stratification_keys(task: str, raw: RawSplit, bin_stsb: bool = True) -> np.ndarray:
    """Per-example stratum, as the reference's iid mode: the label; MNLI label|genre when the split has a
    genre column; STS-B 0.2-wide score bins (or the raw scores with `bin_stsb=False`)."""
    glue = get_task(task)
    labels = raw.labels
    if glue.is_regression:
        return bin_scores(labels) if bin_stsb else labels
    if glue.name == "mnli" and "genre" in raw.columns:
        _, genre = np.unique(np.asarray(raw.columns["genre"], dtype=object), return_inverse=True)
        return labels * (int(genre.max()) + 1) + genre.reshape(-1)
    return labels


def category_values(raw: RawSplit, key: str, *, bin_stsb: bool = True) -> np.ndarray:
    """The category of each example for the category modes, as strings (they name clients in notes).

    `label` gives label names (STS-B: score bins like "3.2-3.4", or raw scores without binning); any
    other column of the train split is taken as it is. `labels` is accepted, as the reference does.
    """
    glue = get_task(raw.task)
    if key in ("label", "labels"):
        if not glue.is_regression:
            return np.asarray(glue.label_names, dtype=object)[raw.labels]
        if not bin_stsb:
            return np.asarray([f"{s:g}" for s in raw.labels], dtype=object)
        bins = bin_scores(raw.labels)
        names = {
            b: f"{b * STSB_BIN_WIDTH:.1f}-{(b + 1) * STSB_BIN_WIDTH:.1f}" for b in np.unique(bins).tolist()
        }
        return np.asarray([names[b] for b in bins.tolist()], dtype=object)
    if key not in raw.columns:
        raise InputError(
            f"unknown --category-key {key!r} for {glue.name}: the train split has columns "
            f"{', '.join(raw.columns)}"
        )
    return np.asarray([str(v) for v in raw.columns[key]], dtype=object)
