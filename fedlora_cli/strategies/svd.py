"""`svd`: the weighted mean of the clients' updates ΔW_i = s_i·B_i·A_i, truncated by SVD (FlexLoRA with mixed
ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedlora_cli.aggregation import ClientUpdate, aggregate_svd, lora_modules, lora_rank
from fedlora_cli.config import LoraSpec
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter, Strategy


class SvdStrategy(Strategy):
    """ΔW = Σ w_i s_i B_i A_i truncated to rank R (`--svd-rank`, default: the largest client rank), written
    as B = U_R Σ_R / s, A = V_R^T with s = alpha / R (default: the clients' scaling). Each client of the
    next round gets the leading r_i components (the best rank-r_i approximation of the global update).

    FlexLoRA's conventions (Bai et al., NeurIPS 2024) for mixed ranks: `--rank-scaling fixed-alpha` gives
    every rank the same lora_alpha (the scaling is alpha / r_i, as FlexLoRA's code trains every client at
    alpha 16), where the default `fixed-scale` keeps alpha / r the same at every rank; `--server-rank full`
    keeps the untruncated mean as the global model (rank Σ r_i, capped by the modules' size), so nothing is
    lost in `final/` and the error column is 0.

    Caveat: truncation drops the tail directions when Σ r_i > R; the error column says how much. `full`
    costs Σ r_i · (d_out + d_in) numbers per module on the server (and in `final/`).
    """

    name = "svd"
    update_space = "product"  # DP noise goes on the mean of the products, before the SVD

    @property
    def _fixed_alpha(self) -> bool:
        return self.spec.svd.rank_scaling == "fixed-alpha"

    def client_lora(self, client_id: int) -> LoraSpec:
        """fixed-alpha: --lora-alpha at every rank (scaling alpha / r_i); fixed-scale: the base class's."""
        if not self._fixed_alpha:
            return super().client_lora(client_id)
        return replace(self.lora, r=self.ranks.get(client_id, self.lora.r))

    def alpha_at(self, rank: int) -> float:
        """lora_alpha of an aggregated adapter of rank `rank`: --alpha, else the clients' convention."""
        if self.spec.svd.alpha is not None:
            return self.spec.svd.alpha
        return self.lora.alpha if self._fixed_alpha else self.lora.at_rank(rank).alpha

    @property
    def global_alpha(self) -> float:
        return self.alpha_at(self.global_rank)

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        full = self.spec.svd.server_rank == "full"
        rank = full_rank(updates) if full else self.global_rank
        alpha = self.alpha_at(rank)
        scaling = alpha / self.lora.rank_divisor(rank)
        result = aggregate_svd(updates, rank=rank, alpha=alpha, scaling=scaling)
        return Aggregated.of(
            self.name,
            result,
            self.lora,
            server_rank=self.spec.svd.server_rank,
            rank_scaling=self.spec.svd.rank_scaling,
        )


def full_rank(updates: Sequence[ClientUpdate]) -> int:
    """Σ r_i over the updates, capped by the smallest module's min(d_out, d_in): a rank at which the SVD of
    the mean drops nothing."""
    state = updates[0].state
    dims = [min(state[b].shape[0], state[a].shape[1]) for a, b in lora_modules(state).values()]
    return max(1, min(sum(lora_rank(u.state) for u in updates), *dims))
