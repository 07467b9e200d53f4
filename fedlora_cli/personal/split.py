"""Each client's shard split into local train / local test, before any training: clients never train on their
test.

The carve is `holdout.carve`'s (each stratum in proportion to its share, exact total), per client: strata are
the labels (regression: 0.2-wide score bins), the generator is seeded by (--seed, client id), so the server
and a Flower ClientApp that holds the same shard carve the same examples, and every method of a comparison at
one seed is scored on the same examples. A shard of one example keeps it for training (no local test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SALT = 0xC11E57  # keeps the local-test draw apart from every other use of the run seed


@dataclass(frozen=True)
class ClientSplit:
    """One client's examples (indices into the training split): what it trains on and what scores it."""

    client_id: int
    train: np.ndarray  # int64, in shard order
    test: np.ndarray  # int64, in shard order


def local_test_size(n: int, fraction: float) -> int:
    """Local test examples of a shard of `n`: round(fraction·n), at least 1 and at most n − 1 (0 when off
    or n < 2)."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(max(1, round(fraction * n)), n - 1))


def client_seed(seed: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, client_id, SALT]).generate_state(1, np.uint32)[0])


def split_client(
    client_id: int, indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, *, regression: bool
) -> ClientSplit:
    """Split one shard; `labels` are the whole training split's (class ids, or scores when `regression`)."""
    from fedlora_cli.holdout import carve
    from fedlora_cli.sharding.keys import bin_scores

    indices = np.asarray(indices, dtype=np.int64)
    size = local_test_size(len(indices), fraction)
    if size == 0:
        return ClientSplit(client_id, indices, indices[:0])
    keys = np.asarray(labels)[indices]
    keys = bin_scores(keys) if regression else keys.astype(np.int64)
    carved = carve(keys, size, client_seed(seed, client_id))  # positions within the shard, ascending
    return ClientSplit(client_id, indices[carved.train], indices[carved.validation])


@dataclass(frozen=True)
class ClientSplits:
    """Every client's split, by client id."""

    fraction: float
    seed: int
    splits: dict[int, ClientSplit]

    def train(self, client_id: int) -> np.ndarray:
        return self.splits[client_id].train

    def test(self, client_id: int) -> np.ndarray:
        return self.splits[client_id].test

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
        digest."""
        sizes = {str(c): [int(len(s.train)), int(len(s.test))] for c, s in sorted(self.splits.items())}
        return {"fraction": self.fraction, "seed": self.seed, "sizes": sizes, "sha256": self.digest}


def split_clients(
    client_ids: Sequence[int],
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    fraction: float,
    seed: int,
    *,
    regression: bool,
) -> ClientSplits:
    splits = {
        int(c): split_client(int(c), idx, labels, fraction, seed, regression=regression)
        for c, idx in zip(client_ids, shards, strict=True)
    }
    return ClientSplits(fraction, seed, splits)


def sizes_of(splits: Mapping[int, ClientSplit]) -> dict[int, int]:
    return {c: int(len(s.train)) for c, s in splits.items()}
