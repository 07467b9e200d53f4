"""`local`: no federation. Each client trains its own adapter alone, the lower bound of personalisation
papers."""

from __future__ import annotations

from collections.abc import Sequence

from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter, Strategy


class LocalStrategy(Strategy):
    """Every part of the adapter is the client's own: each client starts from the run's initial adapter (the
    same for all, from --seed or --init-adapter), trains it on its local training split in each round it is
    selected, and ends with it (final/clients/client_NNN/adapter). Nothing is sent after a client's first
    turn and nothing is averaged: the global state stays the initial adapter. With the same --rounds and
    --local-epochs as a federated run, each client gets the same training budget alone.

    Caveat: the lower bound of what federation buys each client (or the upper bound, under strong skew): no
    client learns from another. There is no global model; the run reports each client's own model on its
    local test split (--client-test-fraction).
    """

    name = "local"

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError("local trains each client alone: there is nothing to merge")
        record = {
            "method": self.name,
            "rank": previous.lora.r,
            "alpha": previous.lora.alpha,
            "error": None,
            "module_errors": {},
            "shared": [],
        }
        return Aggregated(previous, record)
