"""Each client's shard split into local train / local test (and, optionally, a local validation split), before
any training: clients never train on their test or validation examples.

The carve is `holdout.carve`'s (each stratum in proportion to its share, exact total), per client: strata are
the labels (regression: 0.2-wide score bins), the generator is seeded by (--seed, client id), so the server
and a Flower ClientApp that holds the same shard carve the same examples, and every method of a comparison at
one seed is scored on the same examples. A shard of one example keeps it for training (no local test).

The local validation split (--client-validation-fraction) is carved second, from what the test carve left,
with its own salt: the local tests are the same examples with or without it. It is what a sweep chooses a
personalised comparison's hyperparameters on (each client's own model on its own held-out examples), so the
local tests it reports never enter a choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SALT = 0xC11E57  # keeps the local-test draw apart from every other use of the run seed
VALIDATION_SALT = 0x7A11D  # and the local-validation draw apart from the local-test one


@dataclass(frozen=True)
class ClientSplit:
    """One client's examples (indices into the training split): what it trains on and what scores it."""

    client_id: int
    train: np.ndarray  # int64, in shard order
    test: np.ndarray  # int64, in shard order
    validation: np.ndarray | None = None  # int64, in shard order (None: no local validation split)

    @property
    def held(self) -> np.ndarray:
        """The local validation split (empty without one)."""
        return self.test[:0] if self.validation is None else self.validation


def local_test_size(n: int, fraction: float) -> int:
    """Local test examples of a shard of `n`: round(fraction·n), at least 1 and at most n − 1 (0 when off
    or n < 2)."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(max(1, round(fraction * n)), n - 1))


def client_seed(seed: int, client_id: int, salt: int = SALT) -> int:
    return int(np.random.SeedSequence([seed, client_id, salt]).generate_state(1, np.uint32)[0])


def split_client(
    client_id: int,
    indices: np.ndarray,
    labels: np.ndarray,
    fraction: float,
    seed: int,
    *,
    regression: bool,
    validation_fraction: float = 0.0,
) -> ClientSplit:
    """Split one shard; `labels` are the whole training split's (class ids, or scores when `regression`).

    `validation_fraction` of the shard (rounded, at least one example, never the last training one) is carved
    from what the local test left; 0: no local validation split (`validation` None)."""
    indices = np.asarray(indices, dtype=np.int64)
    size = local_test_size(len(indices), fraction)
    train, test = _carve(indices, labels, size, client_seed(seed, client_id), regression)
    if validation_fraction <= 0:
        return ClientSplit(client_id, train, test)
    size = min(local_test_size(len(indices), validation_fraction), max(len(train) - 1, 0))
    train, validation = _carve(train, labels, size, client_seed(seed, client_id, VALIDATION_SALT), regression)
    return ClientSplit(client_id, train, test, validation)


def _carve(
    indices: np.ndarray, labels: np.ndarray, size: int, seed: int, regression: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) of `indices`, both in their order: `size` examples carved, stratified."""
    from fedlora_cli.holdout import carve
    from fedlora_cli.sharding.keys import bin_scores

    if size <= 0:
        return indices, indices[:0]
    keys = np.asarray(labels)[indices]
    keys = bin_scores(keys) if regression else keys.astype(np.int64)
    carved = carve(keys, size, seed)  # positions within `indices`, ascending
    return indices[carved.train], indices[carved.validation]


@dataclass(frozen=True)
class ClientSplits:
    """Every client's split, by client id."""

    fraction: float
    seed: int
    splits: dict[int, ClientSplit]
    validation_fraction: float = 0.0

    def train(self, client_id: int) -> np.ndarray:
        return self.splits[client_id].train

    def test(self, client_id: int) -> np.ndarray:
        return self.splits[client_id].test

    def validation(self, client_id: int) -> np.ndarray:
        return self.splits[client_id].held

    @property
    def digest(self) -> str:
        """sha256 over (client id, local test indices): two runs scored their clients on the same examples iff
        equal."""
        h = hashlib.sha256()
        for cid in sorted(self.splits):
            h.update(np.int64(cid).tobytes())
            h.update(self.splits[cid].test.astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def record(self) -> dict[str, object]:
        """What run.json keeps (`client_test`): the fraction, the seed, each client's train/test sizes, the
        digest; with local validation splits, their fraction and each client's [train, test, validation]."""
        held = self.validation_fraction > 0
        out: dict[str, object] = {"fraction": self.fraction, "seed": self.seed}
        if held:
            out["validation_fraction"] = self.validation_fraction
        out["sizes"] = {
            str(c): [int(len(s.train)), int(len(s.test))] + ([int(len(s.held))] if held else [])
            for c, s in sorted(self.splits.items())
        }
        out["sha256"] = self.digest
        return out


def split_clients(
    client_ids: Sequence[int],
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    fraction: float,
    seed: int,
    *,
    regression: bool,
    validation_fraction: float = 0.0,
) -> ClientSplits:
    splits = {
        int(c): split_client(
            int(c),
            idx,
            labels,
            fraction,
            seed,
            regression=regression,
            validation_fraction=validation_fraction,
        )
        for c, idx in zip(client_ids, shards, strict=True)
    }
    return ClientSplits(fraction, seed, splits, validation_fraction)


def sizes_of(splits: Mapping[int, ClientSplit]) -> dict[int, int]:
    return {c: int(len(s.train)) for c, s in splits.items()}
