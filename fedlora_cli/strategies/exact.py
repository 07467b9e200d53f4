"""`exact`: FedEx-LoRA (Singhal et al., 2024): average A and B, and fold what that misses into a frozen base
delta."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedlora_cli.aggregation import (
    ClientUpdate,
    accumulate_residual,
    aggregate_naive,
    aggregate_svd,
    lora_modules,
    lora_rank,
    low_rank_factors,
    resize_rank,
)
from fedlora_cli.strategies.base import Aggregated, BaseDelta, GlobalAdapter, Strategy


class ExactStrategy(Strategy):
    """The adapter is the naive mean (B̄, Ā), and the residual `Σ w_i s B_i A_i − s B̄ Ā` is added to a
    frozen per-module base delta R, so the global model `W0 + R + s B̄ Ā` carries exactly the weighted
    mean of the clients' updates. R is low-rank and kept factored (P·Q, re-compressed every round by
    QR + SVD, dropping only singular values below 1e-9 of the largest); clients receive P and Q with
    the adapter (counted in bytes_down) and train on top of `W0 + R`. `final/` is ONE plain PEFT adapter:
    a lossless factorisation of `R + s B̄ Ā` at the largest rank any module needs (reported).

    Caveat: the residual's rank grows with rounds × clients × r (up to the module's dimension), and so
    do the bytes each client downloads and the rank of the final adapter. The history's aggregation record
    gives both protocols' bytes per client: `residual_bytes` (stateless clients receive the whole residual
    every round, as here: counted in bytes_down) and `increment_bytes` (clients that keep it, as in the
    FedEx-LoRA paper, receive only this round's change, at its exact rank, next round).
    """

    name = "exact"
    update_space = "product"  # differential privacy noises the dense ΔW (the mean it makes exact)

    def __init__(self, spec, lora, *, seed, client_ids=()) -> None:
        super().__init__(spec, lora, seed=seed, client_ids=client_ids)
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (P, Q), float32
        self._key = ""

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        scaling = self.lora.scaling
        if max(lora_rank(u.state) for u in updates) > self.global_rank:
            # A (noised, DP) pseudo-update of a rank above the adapter's: its best rank-R part goes in
            # the adapter, the rest in the residual — the global model is still exactly the mean.
            mean = aggregate_svd(
                updates,
                rank=self.global_rank,
                alpha=self.lora.at_rank(self.global_rank).alpha,
                scaling=scaling,
            )
        else:
            mean = aggregate_naive(updates, rank=self.global_rank)
        new, error = accumulate_residual(self.residual, updates, mean.state, scaling)
        sent = {p: (pq[0].float(), pq[1].float()) for p, pq in new.items()}
        increment = increment_bytes(self.residual, sent)
        self._set_residual(sent)
        return Aggregated.of(
            self.name,
            replace(mean, error=error, module_errors={}),
            self.lora,
            adapter_error=mean.error,
            residual_rank=self.residual_rank,
            residual_bytes=factor_bytes(self.residual),
            increment_bytes=increment,
        )

    @property
    def residual_rank(self) -> int:
        return max((p.shape[1] for p, _ in self.residual.values()), default=0)

    def base_delta(self) -> BaseDelta:
        return self.residual

    def base_delta_key(self) -> str:
        return self._key

    def export(self, adapter: GlobalAdapter) -> GlobalAdapter:
        """`R + s B̄ Ā` as one adapter: per module a lossless factorisation, all at the largest rank k."""
        s = adapter.lora.scaling
        factors = {}
        for prefix, (a_key, b_key) in lora_modules(adapter.state).items():
            bs, as_ = [adapter.state[b_key].double()], [adapter.state[a_key].double()]
            if prefix in self.residual:
                p, q = self.residual[prefix]
                bs.append(p.double() / s)
                as_.append(q.double())
            factors[prefix] = low_rank_factors(bs, as_, [1.0] * len(bs))
        k = max(1, max(b.shape[1] for b, _ in factors.values()))
        state = dict(adapter.state)
        for prefix, (a_key, b_key) in lora_modules(adapter.state).items():
            b, a = factors[prefix]
            dtype = adapter.state[b_key].dtype
            one = resize_rank({a_key: a, b_key: b}, k) if b.shape[1] else _zero_module(a_key, b_key, a, b, k)
            state[a_key], state[b_key] = one[a_key].to(dtype).contiguous(), one[b_key].to(dtype).contiguous()
        return GlobalAdapter(state, adapter.lora.at_rank(k, s))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, (p, q) in self.residual.items():
            out[f"{prefix}|P"], out[f"{prefix}|Q"] = p, q
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        residual = {}
        for key, p in state.items():
            if key.endswith("|P"):
                prefix = key[:-2]
                if f"{prefix}|Q" not in state:
                    raise ValueError(f"the residual of {prefix} has P but no Q")
                residual[prefix] = (p, state[f"{prefix}|Q"])
        if len(residual) * 2 != len(state):
            raise ValueError("the saved residual has keys that are not <module>|P / <module>|Q pairs")
        self._set_residual(residual)

    def _set_residual(self, residual: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.residual = residual
        digest = hashlib.sha256()
        for prefix in sorted(residual):
            for t in residual[prefix]:
                digest.update(prefix.encode())
                digest.update(t.contiguous().numpy().tobytes())
        self._key = f"exact-{digest.hexdigest()[:16]}" if residual else ""


def factor_bytes(residual: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of a factored residual as clients receive it (float32 P and Q): what a client without state
    downloads each round beside the adapter (today's protocol, counted in bytes_down)."""
    return sum(4 * (p.numel() + q.numel()) for p, q in residual.values())


def increment_bytes(
    old: Mapping[str, tuple[torch.Tensor, torch.Tensor]], new: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> int:
    """Bytes of this round's change of the residual, factored at its exact rank (float32): what a client that
    keeps the residual from round to round (FedEx-LoRA's protocol) downloads next round instead."""
    total = 0
    for prefix, (p, q) in new.items():
        bs, as_, coeffs = [p], [q], [1.0]
        if prefix in old:
            bs.append(old[prefix][0])
            as_.append(old[prefix][1])
            coeffs.append(-1.0)
        b, a = low_rank_factors(bs, as_, coeffs)
        total += 4 * (b.numel() + a.numel())
    for prefix, (p, q) in old.items():  # a module whose residual vanished: its whole removal
        if prefix not in new:
            total += 4 * (p.numel() + q.numel())
    return total


def _zero_module(a_key: str, b_key: str, a: torch.Tensor, b: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """A module whose update is exactly zero, at rank k: B = 0 and orthonormal rows of A."""
    d_in, d_out = a.shape[1], b.shape[0]
    q, _ = torch.linalg.qr(torch.eye(d_in, k, dtype=torch.float64))
    return {a_key: q.mT.contiguous(), b_key: torch.zeros(d_out, k, dtype=torch.float64)}
