"""Server optimisers on a round's pseudo-gradient Δ (the aggregated change): pure tensor maths, no state.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, and server momentum (FedAvgM,
Hsu et al., 2019), elementwise, with m_{−1} = 0 and v_{−1} = τ² (the smallest start Algorithm 2 allows):

    m_t = β1·m_{t−1} + (1 − β1)·Δ_t                      adam, yogi, adagrad
    m_t = β·m_{t−1} + Δ_t                                momentum (FedAvgM)
    m_t = Δ_t                                            avg
    v_t = v_{t−1} + Δ_t²                                 adagrad
    v_t = v_{t−1} − (1 − β2)·Δ_t²·sign(v_{t−1} − Δ_t²)   yogi
    v_t = β2·v_{t−1} + (1 − β2)·Δ_t²                     adam
    x_{t+1} = x_t + η·m_t / (√v_t + τ)                   adam, yogi, adagrad (no bias correction: Algorithm 2)
    x_{t+1} = x_t + η·m_t                                avg, momentum

The first moment is linear in Δ, so it can be kept factored when Δ is low-rank (`factored_first_moment`);
the second moment is elementwise and needs the dense tensor. Everything in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora_cli.aggregation import low_rank_factors
from fedlora_cli.config import ADAPTIVE_OPTIMIZERS, ServerOptSpec


@dataclass(frozen=True)
class Rule:
    """One optimiser's constants: its name, η, the first-moment decay and gain, β2 and τ."""

    name: str
    lr: float
    decay: float = 0.0  # m_t = decay·m_{t−1} + gain·Δ_t
    gain: float = 1.0
    beta2: float = 0.0
    tau: float = 0.0

    @classmethod
    def of(cls, spec: ServerOptSpec) -> Rule:
        name, lr = spec.optimizer, spec.effective_lr
        if name == "momentum":
            return cls(name, lr, decay=spec.momentum, gain=1.0)
        if name in ADAPTIVE_OPTIMIZERS:
            beta1, beta2 = spec.betas
            return cls(name, lr, decay=beta1, gain=1.0 - beta1, beta2=beta2, tau=spec.tau)
        return cls(name, lr)

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE_OPTIMIZERS

    @property
    def keeps_momentum(self) -> bool:
        """Whether m_t depends on m_{t−1} (and is server state): not for avg, nor for β1 = 0."""
        return self.decay != 0.0


def first_moment(rule: Rule, m: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """m_t = decay·m_{t−1} + gain·Δ_t (m_{−1} = 0)."""
    out = rule.gain * delta
    return out if m is None else rule.decay * m.double() + out


def second_moment(rule: Rule, v: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """v_t from v_{t−1} (τ² when None) and Δ_t, by the rule's name (adagrad, yogi, adam)."""
    v = torch.full_like(delta, rule.tau**2) if v is None else v.double()
    sq = delta.square()
    if rule.name == "adagrad":
        return v + sq
    if rule.name == "yogi":
        return v - (1.0 - rule.beta2) * sq * torch.sign(v - sq)
    if rule.name == "adam":
        return rule.beta2 * v + (1.0 - rule.beta2) * sq
    raise ValueError(f"{rule.name} keeps no second moment")


def step(rule: Rule, m: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """What x moves by: η·m / (√v + τ) (adaptive), else η·m."""
    return rule.lr * m / (v.sqrt() + rule.tau) if rule.adaptive else rule.lr * m


def factored_first_moment(
    rule: Rule,
    m: tuple[torch.Tensor, torch.Tensor] | None,
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """m_t = decay·m_{t−1} + gain·Δ_t as factors (P, Q), m = P·Q, where Δ_t = Σ_i bs_i·as_i and
    m_{t−1} = P'·Q'.

    The stacked factors are re-compressed losslessly (`low_rank_factors`: QR of each side, SVD of the small
    core, singular values below 1e-9 of the largest dropped), so P has as many columns as m has rank: at most
    min(d_out, d_in), and much less while few rounds have passed."""
    coeffs = [rule.gain] * len(bs)
    if m is not None and rule.decay != 0.0:
        bs, as_, coeffs = [m[0], *bs], [m[1], *as_], [rule.decay, *coeffs]
    return low_rank_factors(bs, as_, coeffs)
