"""The held-out validation split: carved from the training split before any sharding, and never trained on.

Everything that chooses — the round or epoch whose adapter is kept (`--select best`), when to stop
(`--early-stop`), a sweep's hyperparameters (`[tune]`) — reads this split; the GLUE dev split is only
ever scored and reported. The carve is stratified by label (STS-B by 0.2-wide score bins, MNLI by
label and genre, as `fedlora shard`'s iid mode), seeded by `--validation-seed` alone (so every method,
seed and shard layout of a comparison is chosen on the same examples), and recorded in the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedlora_cli.errors import InputError

SALT = 0x7A11D  # keeps the validation draw apart from every other use of the same seed


@dataclass(frozen=True)
class Holdout:
    """Which training examples are held out (indices into the training split, ascending) and which remain."""

    validation: np.ndarray  # int64
    train: np.ndarray  # int64, the complement
    seed: int

    @property
    def digest(self) -> str:
        """sha256 of the held-out indices: two runs chose on the same examples iff these are equal."""
        return hashlib.sha256(self.validation.astype(np.int64).tobytes()).hexdigest()[:16]

    def record(self) -> dict[str, object]:
        return {
            "examples": int(len(self.validation)),
            "train_examples": int(len(self.train)),
            "seed": self.seed,
            "sha256": self.digest,
        }


def validation_size(total: int, fraction: float | None, examples: int | None) -> int:
    """How many of `total` training examples to hold out (0: none asked for)."""
    if examples is not None:
        wanted = examples
    elif fraction is not None:
        wanted = int(round(fraction * total))
    else:
        return 0
    if wanted < 1 or wanted >= total:
        asked = (
            f"--validation-examples {examples}"
            if examples is not None
            else f"--validation-fraction {fraction:g}"
        )
        raise InputError(
            f"{asked} holds out {wanted} of the {total:,} training examples: keep at least one to train on "
            "and hold out at least one"
        )
    return wanted


def holdout_of(raw, fraction: float | None, examples: int | None, seed: int) -> Holdout | None:
    """The validation carve of a loaded training split (data.RawSplit), or None when none is asked for.

    Strata are `fedlora shard`'s iid strata (label; STS-B score bins; MNLI label and genre), so `rounds`,
    `train` and `fedlora shard` given the same options hold out the same examples.
    """
    from fedlora_cli.sharding.keys import stratification_keys

    size = validation_size(len(raw), fraction, examples)
    if size == 0:
        return None
    return carve(stratification_keys(raw.task, raw), size, seed)


def carve(keys: np.ndarray, size: int, seed: int) -> Holdout:
    """Hold out `size` examples, each stratum (`keys`: one value per example) in proportion to its share.

    Per stratum the count is its share of `size`, rounded down, and the examples left over go to the
    strata with the largest remainders (ties: the larger stratum, then the first key), so the total is
    exact; within a stratum the examples are drawn without replacement from a generator seeded by `seed`.
    """
    n = len(keys)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SALT]))
    values, codes = np.unique(keys, return_inverse=True)
    counts = np.bincount(codes.reshape(-1), minlength=len(values))
    exact = counts * (size / n)
    take = np.floor(exact).astype(np.int64)
    short = size - int(take.sum())
    if short > 0:
        order = sorted(range(len(values)), key=lambda i: (-(exact[i] - take[i]), -counts[i], i))
        for i in order[:short]:
            take[i] += 1
    chosen = []
    for i in range(len(values)):
        members = np.flatnonzero(codes.reshape(-1) == i)
        if take[i]:
            chosen.append(rng.choice(members, size=int(take[i]), replace=False))
    validation = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[validation] = False
    return Holdout(validation.astype(np.int64), np.flatnonzero(mask).astype(np.int64), seed)
