"""`rolora`: RoLoRA (Chen et al., NeurIPS 2025): rounds alternate which LoRA factor trains; every average is
exact."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedlora_cli.aggregation import ClientUpdate, aggregate_one_factor
from fedlora_cli.strategies.base import Aggregated, ClientPlan, GlobalAdapter, Strategy


def trained_factor(round_no: int) -> str:
    """B in odd rounds, A in even ones: B first, because it starts at zero (A's gradient is B^T·…, zero
    too)."""
    return "B" if round_no % 2 == 1 else "A"


class RoloraStrategy(Strategy):
    """Round t trains one factor on every client while the other stays frozen and identical everywhere
    (B in odd rounds, A in even rounds; the head every round); the server averages the trained factor.
    With one factor shared, the mean of the products is the product of the means: exact aggregation.

    This is RoLoRA's alternating scheme with one factor per communication round, so one RoLoRA
    iteration (update B, aggregate, update A, aggregate) takes two fedlora rounds. Caveat: each round
    trains half the LoRA parameters; compare methods at equal rounds *and* equal local compute.
    """

    name = "rolora"

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        plan = super().plan(round_no, client_id, current)
        return replace(plan, train=frozenset({trained_factor(round_no), "head"}))

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError("rolora needs rounds (a broadcast whose other factor stayed frozen)")
        trained = trained_factor(round_no)
        result = aggregate_one_factor(updates, trained=trained, frozen=previous.state)
        return Aggregated.of(self.name, result, self.lora, trained=trained)
