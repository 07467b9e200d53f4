"""`svd`: the weighted mean of the clients' updates ΔW_i = s_i·B_i·A_i, truncated by SVD (FlexLoRA with mixed ranks)."""

from __future__ import annotations

from collections.abc import Sequence

from fedlora_cli.aggregation import ClientUpdate, aggregate_svd
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter, Strategy


class SvdStrategy(Strategy):
    """ΔW = Σ w_i s_i B_i A_i truncated to rank R (`--svd-rank`, default: the largest client rank), written
    as B = U_R Σ_R / s, A = V_R^T with s = alpha / R (default: the clients' scaling). Each client of the
    next round gets the leading r_i components (the best rank-r_i approximation of the global update).

    Caveat: truncation drops the tail directions when Σ r_i > R; the error column says how much.
    """

    name = "svd"
    update_space = "product"  # DP noise goes on the mean of the products, before the SVD

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        result = aggregate_svd(
            updates, rank=self.global_rank, alpha=self.global_alpha, scaling=self.global_scaling
        )
        return Aggregated.of(self.name, result, self.lora)
