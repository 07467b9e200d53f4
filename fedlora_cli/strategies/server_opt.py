"""A server optimiser around any method: the round's aggregated change is a pseudo-gradient Δ, and the server
steps on it with avg / momentum (FedAvgM) / adam / yogi / adagrad (Reddi et al., ICLR 2021, Algorithm 2).

Where Δ lives is the method's `update_space` (the same ClassVar differential privacy uses):

- "factors" (naive, hetlora, ffa, rolora): the method aggregates as usual; Δ = its new adapter − the
  broadcast, key by key (A, B, head); the moments have the adapter's own shapes and x_{t+1} = x_t + step.
  A factor that stayed frozen has Δ = 0 and, without history, stays bit-identical (ffa's A).
- "product" (svd, exact): per LoRA module Δ = Σ_i w_i s_i B_i A_i − s_0 B_0 A_0 (the mean of the clients'
  products minus the broadcast's), the head as above. The first moment is kept factored (P, Q; re-compressed
  losslessly each round), so momentum needs no d_out × d_in matrix; the adaptive optimisers' second moment v
  is elementwise and dense: one d_out × d_in float32 tensor per module (see docs/methods.md for the bytes).
  The stepped model s_0 B_0 A_0 + step is handed to the method as ONE pseudo-update (stacked factors at
  scaling 1), and the method does what it always does with it: svd truncates it to its rank, exact folds
  what the adapter cannot hold into its residual.

The moments are server state: saved with every complete round (`state_dict`, keys `server_opt.m.*` and
`server_opt.v.*`, float32) and restored on --resume, so a resumed run is bit-identical. With differential
privacy the DP wrapper goes outside this one: it noises the clients' mean first and this step runs on the
noised pseudo-update (DP-FedAdam); the step is post-processing, so the guarantee is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora_cli import server_optim
from fedlora_cli.aggregation import ClientUpdate, lora_modules, normalise_weights
from fedlora_cli.config import ServerOptSpec
from fedlora_cli.server_optim import Rule
from fedlora_cli.strategies.base import (
    Aggregated,
    GlobalAdapter,
    Strategy,
    Wrapper,
    state_bytes,
)

_M, _V = "server_opt.m.", "server_opt.v."  # the moments in the saved server state


class ServerOptStrategy(Wrapper):
    """`inner` with a server optimiser (see the module docstring)."""

    def __init__(self, inner: Strategy, spec: ServerOptSpec) -> None:
        super().__init__(inner, spaces=("factors", "product"))
        self.opt, self.rule = spec, Rule.of(spec)
        self.m: dict[str, torch.Tensor] = {}  # dense keys: the key; factored modules: "<prefix>|P" / "|Q"
        self.v: dict[str, torch.Tensor] = {}  # dense keys and (product space) modules by prefix

    def describe(self) -> str:
        """One line for the start of a run: the optimiser, its constants, its space and what it keeps."""
        r, o = self.rule, self.opt
        consts = (
            f"β {o.momentum:g}" if r.name == "momentum" else f"β {o.betas[0]:g}/{o.betas[1]:g}, τ {o.tau:g}"
        )
        if self.update_space == "factors":
            keeps = "moments of the adapter's shapes"
        else:
            keeps = "a factored first moment" + (
                ", a dense d_out × d_in second moment per module" if r.adaptive else ""
            )
        if not (r.keeps_momentum or r.adaptive):
            consts, keeps = "", "no state"
        space = self.update_space.removesuffix("s")
        return (
            f"server optimizer: {r.name} (η {r.lr:g}{', ' + consts if consts else ''}) in {space} "
            f"space; {keeps}"
        )

    # --- what the wrapped method decides ------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.inner.state_dict())
        state.update({_M + k: t for k, t in self.m.items()})
        state.update({_V + k: t for k, t in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = {k: t for k, t in state.items() if k.startswith(("server_opt.",))}
        unknown = [k for k in mine if not k.startswith((_M, _V))]
        if unknown:
            raise ValueError(f"unknown server optimiser state {unknown[:3]}")
        if mine and not self.rule.keeps_momentum and not self.rule.adaptive:
            raise ValueError(
                f"the run kept server optimiser moments, but --server-optimizer is {self.opt.optimizer}"
            )
        self.m = {k[len(_M) :]: t for k, t in mine.items() if k.startswith(_M)}
        self.v = {k[len(_V) :]: t for k, t in mine.items() if k.startswith(_V)}
        self.inner.load_state_dict({k: t for k, t in state.items() if k not in mine})

    # --- the step ------------------------------------------------------------------------------------

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError("a server optimiser needs rounds (a broadcast to measure the change against)")
        if self.update_space == "factors":
            out, info = self._factors(round_no, previous, updates, sampled)
        else:
            out, info = self._product(round_no, previous, updates, sampled)
        info["state_bytes"] = state_bytes(self.m) + state_bytes(self.v)
        return Aggregated(out.adapter, {**out.record, "server_optimizer": info})

    def _info(self, delta_sq: float, step_sq: float) -> dict[str, Any]:
        return {
            "name": self.rule.name,
            "lr": self.rule.lr,
            "delta_norm": math.sqrt(delta_sq),
            "step_norm": math.sqrt(step_sq),
        }

    def _dense(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The step of one dense tensor (a factor, the head), updating its moments."""
        m = server_optim.first_moment(self.rule, self.m.get(key), delta)
        v = server_optim.second_moment(self.rule, self.v.get(key), delta) if self.rule.adaptive else None
        if self.rule.keeps_momentum:
            self.m[key] = m.float().contiguous()
        if v is not None:
            self.v[key] = v.float().contiguous()
        return server_optim.step(self.rule, m, v)

    def _module_moment(
        self, prefix: str, bs: list[torch.Tensor], as_: list[torch.Tensor]
    ) -> tuple[Any, Any, Any]:
        """m_t of one module whose Δ = Σ bs_i·as_i: (None, P, Q) while factors are cheaper than the
        d_out x d_in matrix, else (m, None, None) dense — from then on it stays dense (its rank only grows).
        Kept as state when the optimiser has momentum: `<prefix>|P` and `<prefix>|Q`, or `<prefix>`."""
        rule, d_out, d_in = self.rule, bs[0].shape[0], as_[0].shape[1]
        if prefix in self.m:
            m = server_optim.first_moment(rule, self.m[prefix], torch.cat(bs, dim=1) @ torch.cat(as_, dim=0))
            self.m[prefix] = m.float().contiguous()
            return m, None, None
        old = (self.m.pop(f"{prefix}|P"), self.m.pop(f"{prefix}|Q")) if f"{prefix}|P" in self.m else None
        p, q = server_optim.factored_first_moment(rule, old, bs, as_)
        if not rule.keeps_momentum:
            return None, p, q
        if p.shape[1] * (d_out + d_in) >= d_out * d_in:
            m = p @ q
            self.m[prefix] = m.float().contiguous()
            return m, None, None
        self.m[f"{prefix}|P"], self.m[f"{prefix}|Q"] = p.float().contiguous(), q.float().contiguous()
        return None, p, q

    def _factors(self, round_no, previous, updates, sampled) -> tuple[Aggregated, dict[str, Any]]:
        out = self.inner.aggregate(round_no, previous, updates, sampled=sampled)
        new = out.adapter.state
        if set(new) != set(previous.state) or any(new[k].shape != t.shape for k, t in previous.state.items()):
            raise ValueError(
                f"{self.inner.name} changed the global adapter's shape (r {previous.lora.r} -> "
                f"{out.adapter.lora.r}): a server optimiser in factor space needs it fixed"
            )
        state, delta_sq, step_sq = {}, 0.0, 0.0
        for key, x in previous.state.items():
            delta = _to64(new[key]) - _to64(x)
            move = self._dense(key, delta)
            state[key] = (_to64(x) + move).to(x.dtype).contiguous()
            delta_sq += float(delta.square().sum())
            step_sq += float(move.square().sum())
        return Aggregated(GlobalAdapter(state, out.adapter.lora), out.record), self._info(delta_sq, step_sq)

    def _product(self, round_no, previous, updates, sampled) -> tuple[Aggregated, dict[str, Any]]:
        w = [float(x) for x in normalise_weights([u.weight for u in updates])]
        s0 = previous.lora.scaling
        modules = lora_modules(previous.state)
        lora_keys = {k for pair in modules.values() for k in pair}
        pseudo: dict[str, torch.Tensor] = {}
        delta_sq = step_sq = 0.0
        for prefix, (a_key, b_key) in modules.items():
            b0, a0 = _to64(previous.state[b_key]), _to64(previous.state[a_key])
            bs = [wi * u.scaling * _to64(u.state[b_key]) for wi, u in zip(w, updates, strict=True)] + [
                -s0 * b0
            ]
            as_ = [_to64(u.state[a_key]) for u in updates] + [a0]
            delta_sq += _frobenius_sq(bs, as_)
            m_dense, p, q = self._module_moment(prefix, bs, as_)
            if self.rule.adaptive:
                dense_delta = torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)
                v = server_optim.second_moment(self.rule, self.v.get(prefix), dense_delta)
                self.v[prefix] = v.float().contiguous()
                m_dense = m_dense if m_dense is not None else p @ q
            else:
                v = None
            if m_dense is not None:  # the step is a dense d_out x d_in matrix: B = step, A = I
                step_b = server_optim.step(self.rule, m_dense, v)
                step_a = torch.eye(step_b.shape[1], dtype=torch.float64)
                step_sq += float(step_b.square().sum())
            else:  # momentum / avg, still factored: B = η·P, A = Q
                step_b, step_a = self.rule.lr * p, q
                step_sq += _frobenius_sq([step_b], [step_a])
            pseudo[b_key] = torch.cat([s0 * b0, step_b], dim=1)
            pseudo[a_key] = torch.cat([a0, step_a], dim=0)
        for key, x in previous.state.items():
            if key in lora_keys:
                continue
            delta = sum(wi * _to64(u.state[key]) for wi, u in zip(w, updates, strict=True)) - _to64(x)
            move = self._dense(key, delta)
            pseudo[key] = _to64(x) + move
            delta_sq += float(delta.square().sum())
            step_sq += float(move.square().sum())
        stepped = ClientUpdate({k: pseudo[k] for k in previous.state}, scaling=1.0, weight=1.0)
        out = self.inner.aggregate(round_no, previous, [stepped], sampled=sampled)
        dtypes = {k: t.dtype for k, t in previous.state.items()}  # the method computed in float64
        state = {k: v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in out.adapter.state.items()}
        return Aggregated(GlobalAdapter(state, out.adapter.lora), out.record), self._info(delta_sq, step_sq)


def _to64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _frobenius_sq(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> float:
    """‖Σ_i bs_i·as_i‖_F² without the d_out x d_in matrix: ‖R_b·R_aᵀ‖ from the QRs of the stacked factors."""
    _, r_b = torch.linalg.qr(torch.cat(list(bs), dim=1))
    _, r_a = torch.linalg.qr(torch.cat(list(as_), dim=0).mT)
    return float((r_b @ r_a.mT).square().sum())


def with_server_optimizer(strategy: Strategy, spec: ServerOptSpec) -> Strategy:
    """`strategy` wrapped with the server optimiser `spec` asks for; the strategy itself for plain `avg`
    at η = 1."""
    if not spec.enabled:
        return strategy
    return ServerOptStrategy(strategy, spec)
