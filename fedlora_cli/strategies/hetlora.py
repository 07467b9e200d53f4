"""`hetlora`: HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", 2024): zero-padding, sparsity-weighted aggregation and local rank self-pruning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedlora_cli.aggregation import (
    ClientUpdate,
    aggregate_naive,
    lora_norm,
    lora_rank,
    resize_rank,
    tail_norm,
)
from fedlora_cli.config import LoraSpec
from fedlora_cli.strategies.base import Aggregated, ClientPlan, GlobalAdapter, Strategy, fit

_RANKS = "hetlora.ranks"  # the saved server state: [[client id, pruned rank], ...] (int64)


def kept_rank(rank: int, gamma: float) -> int:
    """The rank a client prunes to: ⌊γ·r⌋, never below 1 (r itself when γ = 1 or r = 1)."""
    return max(1, min(rank, math.floor(gamma * rank)))


def sparsity_weights(updates: Sequence[ClientUpdate]) -> list[float] | None:
    """HetLoRA's aggregation weights S_k / Z with S_k = ‖ΔW_k‖_F = ‖s_k·B_k·A_k‖_F over every LoRA module
    and Z = Σ_k S_k (sparsity-weighted aggregation, Fig. 2); None when every update is zero (then the
    example weights apply)."""
    norms = [lora_norm(u.state, u.scaling) for u in updates]
    total = math.fsum(norms)
    return [n / total for n in norms] if total > 0 else None


class HetloraStrategy(Strategy):
    """Clients train at their own ranks r_i (`--client-ranks`); the global adapter has the largest rank
    r_max and each client gets its leading r_i components (truncation, Fig. 2c).

    Aggregation (the paper's sparsity-weighted aggregation, Fig. 2a-b): every client's B_i and A_i are
    zero-padded to r_max and averaged with the sparsity weights S_i / Z, S_i = ‖s·B_i·A_i‖_F (the whole
    adapter's update, all modules), instead of the example counts — clients whose update is larger count
    more; the head keeps the example weights.

    Rank self-pruning (the paper's local training with rank self-pruning, §3): a client may add
    λ·Σ‖B_i[:, k:]‖·‖A_i[k:, :]‖ (k = ⌊γ·r_i⌋, `--hetlora-lambda`) to its loss; if after local training that
    tail norm is smaller than in the adapter the client started from, the client prunes its rank to k: its
    update is truncated to k before aggregation, and it trains at rank k from then on. The server applies the
    rule to what the client sent (the same numbers the client has), so the pruned ranks are server state,
    saved every round for --resume.

    Caveat: the paper states the rule for its on-device setting; the decay γ and λ are yours to tune (γ = 1
    turns pruning off). With differential privacy the server sees only the noised mean: no sparsity
    weights (DP-FedAvg's equal weights) and no pruning.
    """

    name = "hetlora"

    def __init__(self, spec, lora, *, seed, client_ids=()) -> None:
        super().__init__(spec, lora, seed=seed, client_ids=client_ids)
        self.options = spec.hetlora
        self.pruned: dict[int, int] = {}  # client id -> its rank after self-pruning

    def client_lora(self, client_id: int) -> LoraSpec:
        rank = self.pruned.get(client_id, self.ranks.get(client_id, self.lora.r))
        return self.lora.at_rank(rank)

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        plan = super().plan(round_no, client_id, current)
        r, penalty = plan.adapter.lora.r, self.options.penalty
        keep = kept_rank(r, self.options.gamma)
        if penalty > 0 and keep < r:
            plan = replace(plan, tail_penalty=penalty, tail_from=keep)
        return plan

    def prune(self, update: ClientUpdate, previous: GlobalAdapter) -> ClientUpdate:
        """The self-pruning rule for one client's update: truncated to ⌊γ·r⌋ (and the client's rank lowered)
        when its tail shrank during local training, else unchanged."""
        if update.client is None:
            return update
        r = lora_rank(update.state)
        keep = kept_rank(r, self.options.gamma)
        if keep == r:
            return update
        lora = self.client_lora(update.client)
        started = fit(previous, lora.r, lora.scaling, lora).state  # what the client was sent this round
        if lora.r != r or not tail_norm(update.state, keep) < tail_norm(started, keep):
            return update
        self.pruned[update.client] = keep
        return replace(update, state=resize_rank(update.state, keep))

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        before = dict(self.pruned)
        if previous is not None:
            updates = [self.prune(u, previous) for u in updates]
        weights = sparsity_weights(updates)
        result = aggregate_naive(updates, rank=self.global_rank, factor_weights=weights)
        pruned = {str(c): r for c, r in sorted(self.pruned.items()) if before.get(c) != r}
        return Aggregated.of(self.name, result, self.lora, weights=weights, pruned=pruned)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.pruned:
            return {}
        rows = [[c, r] for c, r in sorted(self.pruned.items())]
        return {_RANKS: torch.tensor(rows, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        extra = sorted(set(state) - {_RANKS})
        if extra:
            raise ValueError(f"hetlora keeps only its pruned ranks, but the state has {extra[:3]}")
        self.pruned = {}
        if _RANKS in state:
            table = state[_RANKS]
            if table.dtype != torch.int64 or table.ndim != 2 or table.shape[1] != 2:
                raise ValueError(f"{_RANKS} must be an int64 table [[client, rank], ...]")
            for c, r in table.tolist():
                if r < 1:
                    raise ValueError(f"{_RANKS}: client {c} has rank {r}")
                self.pruned[int(c)] = int(r)
