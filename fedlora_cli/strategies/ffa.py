"""`ffa`: FFA-LoRA (Sun et al., ICLR 2024): A drawn once from the run seed and frozen everywhere; only B and
the head train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedlora_cli.aggregation import ClientUpdate, aggregate_one_factor
from fedlora_cli.strategies.base import Aggregated, ClientPlan, GlobalAdapter, Strategy


class FfaStrategy(Strategy):
    """A is the fresh LoRA initialisation (seeded by the run seed; or --init-adapter's A), frozen on every
    client and in every round; clients train B and the head; the server averages B. Because every
    client multiplies by the same A, `s·B̄·A = Σ w_i s·B_i·A` exactly: the aggregation error is 0.

    Caveat: half the LoRA parameters never train, so at a given rank it can learn less than the
    methods that train both (the FFA-LoRA paper doubles r to compensate).
    """

    name = "ffa"

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        return replace(super().plan(round_no, client_id, current), train=frozenset({"B", "head"}))

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        # One-shot merge: the adapters must already share A (trained with ffa from one run).
        frozen = previous.state if previous is not None else max(updates, key=_rank).state
        result = aggregate_one_factor(updates, trained="B", frozen=frozen)
        return Aggregated.of(self.name, result, self.lora, trained="B")


def _rank(update: ClientUpdate) -> int:
    from fedlora_cli.aggregation import lora_rank

    return lora_rank(update.state)
