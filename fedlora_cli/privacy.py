"""Client-level differential privacy maths: update norms and clipping in factor or product space, the
seeded Gaussian noise, and the privacy accountant (Google's `dp-accounting`). Pure functions, no I/O.

Spaces (what one client's update is, see `strategies.base.Strategy.update_space`):
- "factors": δ = state − broadcast over every key a client sends (LoRA A and B, the head);
- "product": per LoRA module the dense ΔW = s·B·A − s_0·B_0·A_0 (d_out x d_in), plus the head's δ.
A norm is the L2 norm of all of it together. Maths in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora_cli.aggregation import clip_update, lora_modules

SPACES = ("factors", "product")
_NOISE_TAG = 0xD1FF  # keeps the noise stream apart from client selection's and the clients' seeds


# ---------------------------------------------------------------------------------------------------
# norms and clipping


def _to64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _product_sq(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """‖Σ_k X_k Y_k‖_F² without forming the product: QR of the stacked factors, then the small core."""
    _, r_x = torch.linalg.qr(torch.cat(list(xs), dim=1))
    _, r_y = torch.linalg.qr(torch.cat(list(ys), dim=0).mT)
    return float((r_x @ r_y.mT).square().sum())


def update_norm(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    space: str,
    scaling: float = 1.0,
    reference_scaling: float | None = None,
) -> float:
    """‖state − reference‖ in `space` ("factors" or "product"; scalings: the LoRA alpha/r of each)."""
    if set(state) != set(reference):
        raise ValueError("the update and its reference have different keys")
    if space == "factors":
        return math.sqrt(sum(float((_to64(state[k]) - _to64(reference[k])).square().sum()) for k in state))
    if space != "product":
        raise ValueError(f"unknown update space {space!r}: one of {SPACES}")
    s0 = scaling if reference_scaling is None else reference_scaling
    modules = lora_modules(reference)
    lora_keys = {k for pair in modules.values() for k in pair}
    total = 0.0
    for a_key, b_key in modules.values():
        total += _product_sq(
            [scaling * _to64(state[b_key]), -s0 * _to64(reference[b_key])],
            [_to64(state[a_key]), _to64(reference[a_key])],
        )
    for key in state.keys() - lora_keys:
        total += float((_to64(state[key]) - _to64(reference[key])).square().sum())
    return math.sqrt(total)


def plan_update_norms(pairs: Iterable[tuple[Any, Any]], *, space: str) -> list[float]:
    """‖update − what its plan broadcast‖ in `space` for each (ClientUpdate, ClientPlan) pair, each side at
    its own scaling: what the norm bound and DP measure a client's update by."""
    return [
        update_norm(
            u.state, p.adapter.state, space=space, scaling=u.scaling, reference_scaling=p.adapter.lora.scaling
        )
        for u, p in pairs
    ]


def clip_factor(norm: float, max_norm: float) -> float:
    """min(1, C / ‖δ‖): what an update is multiplied by so that its norm is at most C (1 when C = inf)."""
    return 1.0 if not norm > max_norm else max_norm / norm


def clip_client_update(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    max_norm: float,
    *,
    space: str,
    scaling: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """What a client sends under --dp-where client: its state with the update's norm (in `space`) at most
    `max_norm`, and the norm before clipping. The state stays a LoRA adapter of the client's rank.

    factors: `reference + δ·min(1, C/‖δ‖)` (aggregation.clip_update). product: the product of factors is
    not linear in them, so the client moves back along its factor update, `reference + t·δ`, to the
    largest t in [0, 1] (found by bisection, 60 halvings) whose product-space update has norm ≤ C.
    """
    if space == "factors":
        return clip_update(state, reference, max_norm)
    norm = update_norm(state, reference, space=space, scaling=scaling)
    if not norm > max_norm:
        return dict(state), norm
    delta = {k: _to64(state[k]) - _to64(reference[k]) for k in reference}

    def at(t: float) -> dict[str, torch.Tensor]:
        return {k: (_to64(reference[k]) + t * delta[k]).to(state[k].dtype).contiguous() for k in state}

    lo, hi = 0.0, 1.0  # the norm at lo is always <= max_norm (t = 0 is the reference itself)
    for _ in range(60):
        mid = (lo + hi) / 2
        if update_norm(at(mid), reference, space=space, scaling=scaling) <= max_norm:
            lo = mid
        else:
            hi = mid
    return at(lo), norm


# ---------------------------------------------------------------------------------------------------
# noise


def noise_generator(key: Sequence[int], round_no: int) -> np.random.Generator:
    """The round's noise stream: `SeedSequence([*key, round, tag])`, so reruns and resumes draw the same
    noise. `key` is the run seed (reproducible) or a secret drawn from the OS (--dp-secret-noise)."""
    return np.random.default_rng(np.random.SeedSequence([*map(int, key), int(round_no), _NOISE_TAG]))


def gaussian(rng: np.random.Generator, shape: Sequence[int], std: float) -> torch.Tensor:
    """N(0, std²) i.i.d., float64, drawn in C order from `rng` (numpy's generators give the same numbers
    on every platform)."""
    return torch.from_numpy(rng.standard_normal(tuple(shape))) * std


# ---------------------------------------------------------------------------------------------------
# accounting


def require_accounting() -> None:
    """dp-accounting is the optional extra `privacy`: one clear line when it is missing."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ValueError(
            "--dp-clip needs Google's dp-accounting for the privacy accountant: pip install "
            "'fedlora[privacy]'"
        ) from None


@functools.lru_cache(maxsize=1024)
def epsilon(*, clients: int, per_round: int, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at `delta` after `rounds` rounds of DP-FedAvg as fedlora runs it, from dp-accounting's RDP
    accountant.

    Each round samples exactly `per_round` of `clients` clients without replacement (data-independent,
    seeded), adds N(0, (z·C)²) to the sum of their updates clipped to norm C, and divides by `per_round`.
    With the number of clients public, the neighbouring relation that matches fixed-size sampling is
    "replace one client's data" (Wang, Balle & Kasiviswanathan, AISTATS 2019); replacing an update moves
    the sum by up to 2C, so the Gaussian event's noise multiplier is z/2. z = 0 gives ε = inf.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        clients, per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def rounds_within(
    target: float, *, clients: int, per_round: int, noise_multiplier: float, delta: float, rounds: int
) -> tuple[int, float, float]:
    """The most rounds (at most `rounds`) whose ε stays within `target`, that ε, and the ε one more round
    would reach (inf when all `rounds` fit). ε never decreases with rounds, so a bisection finds it."""

    def eps(t: int) -> float:
        return epsilon(
            clients=clients, per_round=per_round, noise_multiplier=noise_multiplier, rounds=t, delta=delta
        )

    if eps(rounds) <= target:
        return rounds, eps(rounds), math.inf
    lo, hi = 0, rounds  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
    return lo, eps(lo), eps(hi)
