"""What every partitioner takes (the examples' keys) and returns (a ShardPlan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ShardPlan:
    """K index arrays into the train split (client 1..K), what happened, and the parameters used."""

    clients: list[np.ndarray]  # sorted int64 index arrays, client 1..K
    notes: list[str] = field(default_factory=list)  # e.g. "category 'positive' split across clients 3, 4, 5"
    params: dict[str, Any] = field(default_factory=dict)  # the mode's parameters actually used
    client_categories: list[list[str]] | None = None  # category modes: the categories each client holds

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


@dataclass(frozen=True)
class PartitionKeys:
    """Per-example keys of examples 0..N-1, as the partitioners read them."""

    labels: np.ndarray  # class ids, or scores for regression
    strata: np.ndarray  # dense codes 0..S-1 of what iid-style splits balance (label, label|genre, score bin)
    categories: np.ndarray | None = None  # category modes: each example's category

    @property
    def items(self) -> np.ndarray:
        """The examples to split: 0..N-1 (int64)."""
        return np.arange(len(self.labels), dtype=np.int64)

    @property
    def label_groups(self) -> np.ndarray:
        """What label skew skews: the labels; for regression the stratum (score bin) stands in for one."""
        return self.labels if self.labels.dtype.kind in "iub" else self.strata


class Split(Protocol):
    """A partitioner (`registry.Partitioner.target`): a pure function of a seeded rng and the keys.

    It consumes `rng` in a fixed order, so a seed always gives the same plan; it takes the options its
    registry entry lists as keywords.
    """

    def __call__(
        self, rng: np.random.Generator, keys: PartitionKeys, k: int, **options: Any
    ) -> ShardPlan: ...
