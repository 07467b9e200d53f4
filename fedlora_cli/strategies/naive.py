"""`naive`: the weighted mean of A and of B, separately (the reference's `--skip_svd`; mixed ranks:
zero-padding only)."""

from __future__ import annotations

from collections.abc import Sequence

from fedlora_cli.aggregation import ClientUpdate, aggregate_naive
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter, Strategy


class NaiveStrategy(Strategy):
    """B = Σ w_i B_i, A = Σ w_i A_i at the largest client rank (smaller ranks zero-padded), same scaling.

    With mixed ranks this is HetLoRA's zero-padding only: example weights, no norm weighting, no rank
    pruning (`hetlora` is HetLoRA in full).

    Caveat: the mean of products is not the product of the means (the error column measures the
    gap), and zero-padding shrinks the components only the larger-rank clients have.
    """

    name = "naive"

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        result = aggregate_naive(updates, rank=self.global_rank)
        return Aggregated.of(self.name, result, self.lora)
