"""One row of history.jsonl: what a complete round did. A type, built once by the round driver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HistoryRow:
    """A complete round: who trained, what the aggregation did, the global adapter's metrics, costs.

    Written to `round_NNN/global/metrics.json` (last: it marks the round complete) and as one line of
    history.jsonl. `from_json` ignores keys it does not know, so rows of newer fedlora versions load.
    """

    round: int  # 0: the starting adapter, evaluated before any training (no clients, no aggregation)
    clients: list[int]  # client ids whose updates were aggregated
    failed: list[dict[str, Any]]  # {client, node, reason} of selected clients that did not count
    client_metrics: list[dict[str, Any]]  # ClientReport.summary() per aggregated client
    examples: int  # training examples behind the aggregated updates
    train_loss: float | None  # example-weighted mean of the clients' mean training loss (None: round 0)
    aggregation: dict[str, Any]  # method, rank, alpha, error, module_errors, and method-specific keys
    eval: dict[str, float] | None  # the global adapter on the dev split(s); None when not evaluated
    bytes_down: int  # server -> clients
    bytes_up: int  # clients -> server
    bytes_written: int  # to the run tree
    seconds: dict[str, float]  # wall, train, aggregate, eval, io
    time: str = ""  # ISO 8601, when the round completed
    learning_rate: float | None = (
        None  # the clients' peak learning rate this round (warmup, then linear decay)
    )
    eval_loss: float | None = None  # the global model's loss on the dev split(s), when evaluated
    extra: dict[str, Any] = field(default_factory=dict)  # optional sections (e.g. memory, privacy)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryRow:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)
