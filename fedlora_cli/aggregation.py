"""Server-side merging of client LoRA adapter states into one global adapter, and what the merge costs."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# PEFT's `get_peft_model_state_dict` strips the adapter name, so a module's factors end like this.
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained adapter and how much it counts in the merge.

    state: PEFT adapter state dict `{key: tensor}` (as `get_peft_model_state_dict` returns it).
    scaling: lora_alpha / r of this client's adapter, the factor PEFT applies to `B @ A`.
    weight: unnormalised weight, the number of training examples the client used. Never the number
        of batches: that over-weights clients with small batch sizes or a short last batch.
    """

    state: Mapping[str, torch.Tensor]
    scaling: float
    weight: float
    name: str = ""  # how messages name this client ("client 3", an adapter path); default: its position
    client: int | None = None  # the client's id when an engine made it (wrappers match an update to its plan)

    def __post_init__(self) -> None:
        if not _positive_number(self.scaling):
            raise ValueError(f"scaling must be a finite number > 0 (lora_alpha / r), got {self.scaling!r}")


def _who(clients: Sequence[ClientUpdate], i: int) -> str:
    """A client as messages name it: its own name (the engines give the client id), else its 1-based
    position."""
    return clients[i].name or f"client #{i + 1}"


@dataclass(frozen=True)
class AggregateResult:
    """The merged adapter and how far it is from the exact weighted sum of the clients' updates."""

    state: dict[str, torch.Tensor]  # same keys as the inputs, their dtype, on CPU, contiguous
    rank: int  # r of the result: what adapter_config.json must say
    alpha: float  # lora_alpha of the result; scaling = alpha / rank
    error: float  # ||ΔW_agg − Σ w_i ΔW_i||_F / ||Σ w_i ΔW_i||_F over all LoRA modules; 0.0 if target is 0
    module_errors: dict[str, float]  # the same ratio per LoRA module prefix
    scaling: (
        float  # what B·A is multiplied by: alpha / rank (alpha / √rank for an rsLoRA caller of aggregate_svd)
    )
    # Both errors describe the float64 merge, before the cast back to the inputs' dtype (for float32
    # that cast moves the product by ~1e-7 relative, far below any error worth reporting).


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """Client weights scaled to sum to 1: `w_i = n_i / Σ_j n_j`, in float64.

    `n_i` should be training examples (not batches). Raises ValueError if there are no weights or
    any weight is not a finite number > 0: a zero-example client has no update to contribute and
    must be dropped by the caller, not silently given weight 0.
    """
    if len(weights) == 0:
        raise ValueError("no client weights to normalise: need at least one client")
    for i, x in enumerate(weights):
        if not _positive_number(x):
            raise ValueError(f"client {i}: weight must be a finite number > 0 (training examples), got {x!r}")
    w = np.asarray(weights, dtype=np.float64)
    # Divide by the largest first so that huge counts cannot overflow the sum.
    w = w / w.max()
    return w / w.sum()


def lora_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """LoRA modules of an adapter state: `{prefix: (A key, B key)}`, in the state's key order.

    A module is the common prefix of `<prefix>.lora_A.weight` and `<prefix>.lora_B.weight`. Every
    other key (classification head, `lora_magnitude_vector` of DoRA, embeddings' `lora_embedding_*`)
    is not a module here. Raises ValueError if an A key has no B key or vice versa.
    """
    a_keys = {k[: -len(_A_SUFFIX)]: k for k in state if k.endswith(_A_SUFFIX)}
    b_keys = {k[: -len(_B_SUFFIX)]: k for k in state if k.endswith(_B_SUFFIX)}
    for prefix in a_keys.keys() - b_keys.keys():
        raise ValueError(f"LoRA module {prefix!r} has {a_keys[prefix]!r} but no {prefix + _B_SUFFIX!r}")
    for prefix in b_keys.keys() - a_keys.keys():
        raise ValueError(f"LoRA module {prefix!r} has {b_keys[prefix]!r} but no {prefix + _A_SUFFIX!r}")
    return {prefix: (key, b_keys[prefix]) for prefix, key in a_keys.items()}


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank r shared by every LoRA module (rows of A = columns of B).

    Raises ValueError if the state has no LoRA module, if a module's A and B do not multiply, or if
    modules disagree (an adapter made with PEFT's `rank_pattern`): one adapter_config `r` cannot
    describe it.
    """
    ranks: dict[str, int] = {}
    for prefix, (a_key, b_key) in lora_modules(state).items():
        ranks[prefix] = _module_rank(prefix, state[a_key], state[b_key])
    if not ranks:
        raise ValueError(f"no LoRA modules: no key ends in {_A_SUFFIX!r}")
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        example = {r: next(p for p, q in ranks.items() if q == r) for r in distinct}
        raise ValueError(f"LoRA modules disagree on the rank: {distinct}, e.g. {example}")
    return distinct[0]


def aggregate_svd(
    clients: Sequence[ClientUpdate], rank: int, alpha: float, *, scaling: float | None = None
) -> AggregateResult:
    """Best rank-`rank` approximation of the weighted sum of the clients' updates, per LoRA module.

    Target `ΔW = Σ_i w_i s_i B_i A_i` (w_i normalised example counts, s_i the client's scaling),
    truncated by SVD to rank R = `rank` and written as `s B A` with `s = alpha / R` (or `scaling`, which
    an rsLoRA caller gives as alpha / √R). The d_out x d_in
    matrix is never formed: with `Bc = [w_1 s_1 B_1 … w_K s_K B_K]`, `Ac = [A_1; …; A_K]`,
    `Bc = Q_b R_b`, `Ac^T = Q_a R_a` and `R_b R_a^T = U Σ V^T`, the result is
    `B = Q_b U_R Σ_R / s`, `A = V_R^T Q_a^T` — O(d (Σr)^2) instead of O(d^3); clients may have
    different ranks and scalings. Maths in float64, cast back to the inputs' dtype. The relative
    error is `sqrt(Σ_{j>R} σ_j^2 / Σ_j σ_j^2)` (modules combined by summing both sums).

    Caveat: truncation (R < Σ r_i) loses the tail singular directions; the reported error says how
    much. When R exceeds Σ r_i (nothing to truncate; R must still fit min(d_out, d_in)), the result has
    exactly R rows/columns so that adapter_config's `r` is right: B gets zero columns and A gets
    extra rows orthonormal to the kept ones. Not zero rows: a zero row of A together with a zero
    column of B gets zero gradient in the next round of training and would stay dead forever.
    A's rows are orthonormal, so B carries the magnitude; the next round's training starts from that.
    Dense (non-LoRA) keys get the weighted mean `Σ_i w_i x_i`.
    """
    _check_rank_alpha(rank, alpha)
    checked = _check_clients(clients)
    for prefix, (d_out, d_in) in checked.module_dims.items():
        if rank > min(d_out, d_in):
            raise ValueError(
                f"rank {rank} is larger than LoRA module {prefix!r} allows: "
                f"d_out x d_in = {d_out} x {d_in}, so rank <= {min(d_out, d_in)}"
            )
    scaling = alpha / rank if scaling is None else scaling
    if not _positive_number(scaling):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    coeffs = [float(w) * c.scaling for w, c in zip(checked.weights, clients, strict=True)]

    state: dict[str, torch.Tensor] = {}
    sq_tail: dict[str, float] = {}
    sq_total: dict[str, float] = {}
    for prefix, (a_key, b_key) in checked.modules.items():
        bs = [_to64(c.state[b_key]) for c in clients]
        as_ = [_to64(c.state[a_key]) for c in clients]
        b, a, sq_tail[prefix], sq_total[prefix] = _truncated_factors(bs, as_, coeffs, rank)
        state[a_key] = a.to(checked.dtypes[a_key]).contiguous()
        state[b_key] = (b / scaling).to(checked.dtypes[b_key]).contiguous()
    for key in checked.dense_keys:
        state[key] = _weighted_mean(clients, key, checked.weights, checked.dtypes[key])
    return _result(checked, state, rank, float(alpha), sq_tail, sq_total, scaling)


def aggregate_naive(
    clients: Sequence[ClientUpdate],
    rank: int | None = None,
    alpha: float | None = None,
    *,
    factor_weights: Sequence[float] | None = None,
) -> AggregateResult:
    """Average each factor separately: `B = Σ_i w_i B_i`, `A = Σ_i w_i A_i` (the reference's `--skip_svd`).

    `factor_weights` (>= 0, not all 0; normalised here) replace w_i for the LoRA factors only (HetLoRA's
    sparsity weights); the dense keys and the error's target keep the clients' example weights.

    Every client must have the same scaling. Clients of different ranks are zero-padded to the largest
    rank R first (HetLoRA): rows r_i.. of A_i and columns r_i.. of B_i count as zeros. The result has
    rank R (or `rank`, which must be >= R) and the clients' scaling (`alpha`, if given, must keep it).
    Dense (non-LoRA) keys get the weighted mean `Σ_i w_i x_i`, in float64.

    Caveat: the mean of products is not the product of means, so `s B A ≠ Σ_i w_i s B_i A_i` in
    general; zero-padding also shrinks the directions only some clients have. The reported error
    measures the gap. It is computed in factored form, never forming the d_out x d_in matrix:
    `s B A − Σ_i w_i s B_i A_i = X Y` with `X = [s B, −w_1 s B_1, …]`, `Y = [A; A_1; …]`, and
    `||X Y||_F = ||R_x R_y^T||_F` from the QRs `X = Q_x R_x`, `Y^T = Q_y R_y` (more accurate than the
    trace of Gram matrices when the gap is tiny).
    """
    checked = _check_clients(clients)
    ranks = [lora_rank(c.state) for c in clients]
    scalings = [c.scaling for c in clients]
    if not all(math.isclose(s, scalings[0], rel_tol=1e-9) for s in scalings):
        raise ValueError(f"naive averaging needs one scaling for all clients, got {scalings}: use svd")
    r, s = max(ranks), scalings[0]
    if rank is not None and rank < r:
        raise ValueError(
            f"naive averaging keeps the clients' largest rank {r}, got rank={rank}: use svd to lower r"
        )
    r = rank if rank is not None else r
    if alpha is not None and not math.isclose(alpha, s * r, rel_tol=1e-9):
        raise ValueError(
            f"naive averaging keeps the clients' scaling {s:g} (lora_alpha {s * r:g} at rank {r}), got "
            f"alpha={alpha!r}: use svd to change it"
        )

    state: dict[str, torch.Tensor] = {}
    sq_err: dict[str, float] = {}
    sq_target: dict[str, float] = {}
    w = [float(x) for x in checked.weights]
    fw = w if factor_weights is None else _share(factor_weights, len(clients))
    for prefix, (a_key, b_key) in checked.modules.items():
        bs = [_to64(c.state[b_key]) for c in clients]
        as_ = [_to64(c.state[a_key]) for c in clients]
        b_mean = sum(fi * _pad_cols(b, r) for fi, b in zip(fw, bs, strict=True))
        a_mean = sum(fi * _pad_rows(a, r) for fi, a in zip(fw, as_, strict=True))
        target_b = [wi * s * b for wi, b in zip(w, bs, strict=True)]
        sq_err[prefix] = _frobenius_sq(
            torch.cat([s * b_mean, *(-tb for tb in target_b)], dim=1), torch.cat([a_mean, *as_], dim=0)
        )
        sq_target[prefix] = _frobenius_sq(torch.cat(target_b, dim=1), torch.cat(as_, dim=0))
        state[a_key] = a_mean.to(checked.dtypes[a_key]).contiguous()
        state[b_key] = b_mean.to(checked.dtypes[b_key]).contiguous()
    for key in checked.dense_keys:
        state[key] = _weighted_mean(clients, key, checked.weights, checked.dtypes[key])
    out_alpha = float(alpha) if alpha is not None else s * r
    return _result(checked, state, r, out_alpha, sq_err, sq_target, s)


def resize_rank(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The same adapter at another rank: keep the first `rank` rows of A and columns of B, or pad.

    Truncation keeps the leading components, which are the largest ones when the adapter came out of
    `aggregate_svd` (A's rows orthonormal, B's columns by decreasing singular value): the best
    rank-`rank` approximation of `B A` (FlexLoRA sends each client this). Padding adds zero columns
    to B (the product is unchanged) and rows of A orthonormal to the others (not zeros: a zero row
    of A with a zero column of B would get no gradient and stay dead). Dense keys are copied.
    """
    _check_rank_alpha(rank, 1.0)
    out: dict[str, torch.Tensor] = {}
    modules = lora_modules(state)
    for key, t in state.items():
        out[key] = t
    for prefix, (a_key, b_key) in modules.items():
        a, b = state[a_key], state[b_key]
        r = _module_rank(prefix, a, b)
        if rank <= r:
            out[a_key], out[b_key] = a[:rank].contiguous(), b[:, :rank].contiguous()
            continue
        if rank > a.shape[1]:
            raise ValueError(
                f"rank {rank} is larger than LoRA module {prefix!r} allows (d_in = {a.shape[1]})"
            )
        a64 = _to64(a)
        q, _ = torch.linalg.qr(a64.mT)  # orthonormal basis of A's rows (A itself need not be orthonormal)
        extra = _orthonormal_complement_rows(q.mT, rank - r)
        scale = (
            a64.norm(dim=1).mean() if r > 0 and a64.abs().sum() > 0 else torch.tensor(1.0, dtype=a64.dtype)
        )
        out[a_key] = torch.cat([a, (extra * scale).to(a.dtype)], dim=0).contiguous()
        out[b_key] = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1).contiguous()
    return out


def low_rank_factors(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    rtol: float = 1e-9,
    atol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact factors (B, A) of `Σ_i coeffs_i B_i A_i` with no loss beyond `rtol`: singular values below
    `max(rtol · σ_max, atol)` are dropped (they are float noise), everything else is kept. float64 in and
    out; A's rows are orthonormal. Rank 0 (empty factors) when the sum is zero."""
    b_cat = torch.cat([c * _to64(b) for c, b in zip(coeffs, bs, strict=True)], dim=1)
    a_cat = torch.cat([_to64(a) for a in as_], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.mT)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    keep = int((sigma > max(rtol * sigma[0], atol)).sum()) if sigma.numel() and sigma[0] > 0 else 0
    return (q_b @ u[:, :keep]) * sigma[:keep], vh[:keep] @ q_a.mT


def lora_norm(state: Mapping[str, torch.Tensor], scaling: float = 1.0) -> float:
    """‖s·B·A‖_F over every LoRA module of `state` (the modules' squares summed), without forming a d x d
    matrix (`_frobenius_sq`): the size of the update an adapter applies to the base model."""
    total = 0.0
    for prefix, (a_key, b_key) in lora_modules(state).items():
        a, b = _to64(state[a_key]), _to64(state[b_key])
        _module_rank(prefix, a, b)
        total += _frobenius_sq(scaling * b, a) if a.shape[0] else 0.0
    return math.sqrt(total)


def tail_norm(state: Mapping[str, torch.Tensor], keep: int) -> float:
    """Σ over LoRA modules of ‖B[:, keep:]‖_F · ‖A[keep:, :]‖_F: the size of the ranks after the first
    `keep` (HetLoRA's rank regulariser and its pruning test)."""
    total = 0.0
    for a_key, b_key in lora_modules(state).values():
        a, b = _to64(state[a_key]), _to64(state[b_key])
        total += float(b[:, keep:].norm()) * float(a[keep:].norm())
    return total


def clip_update(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """`reference + δ·min(1, max_norm / ‖δ‖)` with `δ = state − reference` over every key (LoRA factors
    and head alike) and ‖·‖ the L2 norm of all of δ; also returns ‖δ‖ before clipping. Keys and shapes
    must match. `max_norm = inf` returns the state unchanged (and its norm)."""
    if set(state) != set(reference):
        raise ValueError("clip_update: the state and the reference have different keys")
    deltas = {k: _to64(state[k]) - _to64(reference[k]) for k in reference}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    if not norm > max_norm:
        return dict(state), norm
    factor = max_norm / norm
    clipped = {
        k: (_to64(reference[k]) + factor * deltas[k]).to(state[k].dtype).contiguous() for k in reference
    }
    return {k: clipped[k] for k in state}, norm


def _share(weights: Sequence[float], n: int) -> list[float]:
    """Weights >= 0 (not all 0) scaled to sum to 1, in float64."""
    if len(weights) != n:
        raise ValueError(f"{len(weights)} factor weights for {n} clients")
    bad = [x for x in weights if not (isinstance(x, int | float) and math.isfinite(x) and x >= 0)]
    if bad or not sum(weights) > 0:
        raise ValueError(f"factor weights must be finite, >= 0 and not all 0, got {list(weights)}")
    total = math.fsum(float(x) for x in weights)
    return [float(x) / total for x in weights]


def _pad_cols(b: torch.Tensor, r: int) -> torch.Tensor:
    return b if b.shape[1] == r else torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)


def _pad_rows(a: torch.Tensor, r: int) -> torch.Tensor:
    return a if a.shape[0] == r else torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], dim=0)


def aggregate_one_factor(
    clients: Sequence[ClientUpdate], *, trained: str, frozen: Mapping[str, torch.Tensor]
) -> AggregateResult:
    """Average the factor that trained; keep the other one as it was (FFA-LoRA: A frozen; RoLoRA:
    alternating).

    trained: "B" (every client kept A = `frozen`'s A) or "A" (every client kept B = `frozen`'s B).
    `frozen` is the adapter the clients started from, at rank R >= every client's rank; a client of
    rank r_i trained the first r_i components. The trained factor is the weighted mean of the clients'
    (zero-padded to R), the frozen one is `frozen`'s, bit for bit, so with A frozen
    `s B̄ A = Σ_i w_i s B_i A[:r_i]` exactly (likewise with B frozen): the aggregation error is 0 up
    to float rounding, and is reported as computed. Dense keys get the weighted mean. Raises
    ValueError if a client's frozen factor is not the matching slice of `frozen`'s.
    """
    if trained not in ("A", "B"):
        raise ValueError(f"trained must be 'A' or 'B', got {trained!r}")
    checked = _check_clients(clients)
    scalings = [c.scaling for c in clients]
    if not all(math.isclose(s, scalings[0], rel_tol=1e-9) for s in scalings):
        raise ValueError(f"one-factor averaging needs one scaling for all clients, got {scalings}")
    s = scalings[0]
    rank = lora_rank(frozen)
    w = [float(x) for x in checked.weights]
    state: dict[str, torch.Tensor] = {}
    sq_err: dict[str, float] = {}
    sq_target: dict[str, float] = {}
    for prefix, (a_key, b_key) in checked.modules.items():
        fixed_key = a_key if trained == "B" else b_key
        fixed = frozen[fixed_key]
        for i, c in enumerate(clients):
            mine = c.state[fixed_key]
            r_i = mine.shape[0] if trained == "B" else mine.shape[1]
            expected = fixed[:r_i] if trained == "B" else fixed[:, :r_i]
            if r_i > rank or not torch.equal(mine.to(fixed.dtype), expected):
                raise ValueError(
                    f"{_who(clients, i)}: {fixed_key} is not the frozen factor the clients were sent"
                )
        bs = [_to64(c.state[b_key]) for c in clients]
        as_ = [_to64(c.state[a_key]) for c in clients]
        if trained == "B":
            b_new = sum(wi * _pad_cols(b, rank) for wi, b in zip(w, bs, strict=True))
            a_new = _to64(fixed)
        else:
            a_new = sum(wi * _pad_rows(a, rank) for wi, a in zip(w, as_, strict=True))
            b_new = _to64(fixed)
        target_b = [wi * s * b for wi, b in zip(w, bs, strict=True)]
        sq_err[prefix] = _frobenius_sq(
            torch.cat([s * b_new, *(-tb for tb in target_b)], dim=1), torch.cat([a_new, *as_], dim=0)
        )
        sq_target[prefix] = _frobenius_sq(torch.cat(target_b, dim=1), torch.cat(as_, dim=0))
        state[a_key] = fixed if trained == "B" else a_new.to(checked.dtypes[a_key]).contiguous()
        state[b_key] = fixed if trained == "A" else b_new.to(checked.dtypes[b_key]).contiguous()
    for key in checked.dense_keys:
        state[key] = _weighted_mean(clients, key, checked.weights, checked.dtypes[key])
    return _result(checked, state, rank, s * rank, sq_err, sq_target, s)


def accumulate_residual(
    residual: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    clients: Sequence[ClientUpdate],
    average: Mapping[str, torch.Tensor],
    scaling: float,
    rtol: float = 1e-9,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """FedEx-LoRA's residual: `R' = R + Σ_i w_i s_i B_i A_i − s B̄ Ā`, per LoRA module, kept factored.

    residual: `{prefix: (P, Q)}` with R = P Q (empty: R = 0); average: the adapter whose factors are
    B̄, Ā (the weighted means, `aggregate_naive`) at scaling `scaling`. The stacked factors are
    re-compressed by QR + SVD of the small core (`low_rank_factors`), dropping only singular values
    below rtol times the larger of σ_max and ‖this round's target‖ (float noise), so R' stays as small
    as its true rank (at most min(d_out, d_in)). Returns the
    new residual in float64 and what the compression dropped, relative to ‖Σ_i w_i s_i B_i A_i‖ over
    all modules (the aggregation error of the global model: ~rtol).
    """
    checked = _check_clients(clients)
    w = [float(x) for x in checked.weights]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dropped = target = 0.0
    for prefix, (a_key, b_key) in checked.modules.items():
        bs = [wi * c.scaling * _to64(c.state[b_key]) for wi, c in zip(w, clients, strict=True)]
        as_ = [_to64(c.state[a_key]) for c in clients]
        module_target = _frobenius_sq(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
        target += module_target
        bs.append(-scaling * _to64(average[b_key]))
        as_.append(_to64(average[a_key]))
        if prefix in residual:
            p, q = residual[prefix]
            bs.insert(0, _to64(p))
            as_.insert(0, _to64(q))
        b_cat, a_cat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        # The floor is relative to this round's update too: a residual that is zero up to float error
        # (identical clients) must come out as rank 0, not as its own rounding noise.
        floor = rtol * math.sqrt(module_target)
        p_new, q_new = low_rank_factors([b_cat], [a_cat], [1.0], rtol=rtol, atol=floor)
        out[prefix] = (p_new, q_new)
        full = _frobenius_sq(b_cat, a_cat)
        kept = float(p_new.square().sum())  # Q has orthonormal rows: ||P Q|| = ||P||
        dropped += max(full - kept, 0.0)
    return out, (math.sqrt(dropped / target) if target > 0 else 0.0)


# --- checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    """What the checks established about a list of clients, for the aggregators to use."""

    weights: np.ndarray  # normalised, float64
    keys: list[str]  # client 0's key order, kept in the output
    modules: dict[str, tuple[str, str]]  # prefix -> (A key, B key)
    module_dims: dict[str, tuple[int, int]]  # prefix -> (d_out, d_in)
    dense_keys: list[str]
    dtypes: dict[str, torch.dtype]  # output dtype per key


def _positive_number(x: object) -> bool:
    """A real, finite number > 0 (bools and strings are not numbers here)."""
    real = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
    return real and math.isfinite(x) and x > 0


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not _positive_number(alpha):
        raise ValueError(f"alpha (lora_alpha) must be a finite number > 0, got {alpha!r}")


def _module_rank(prefix: str, a: torch.Tensor, b: torch.Tensor) -> int:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"LoRA module {prefix!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
            "are not (r x d_in) and (d_out x r)"
        )
    return a.shape[0]


def _check_clients(clients: Sequence[ClientUpdate]) -> _Checked:
    """Keys, dtypes and shapes agree across clients; every message names the client and the key."""
    if len(clients) == 0:
        raise ValueError("no clients to aggregate")
    keys = list(clients[0].state)
    key_set = set(keys)
    for i, c in enumerate(clients):
        other = set(c.state)
        if other != key_set:
            missing, extra = sorted(key_set - other), sorted(other - key_set)
            raise ValueError(
                f"{_who(clients, i)} has different keys from {_who(clients, 0)}: missing {missing[:3]}, "
                f"extra {extra[:3]} ({len(missing)} missing, {len(extra)} extra)"
            )
        for key, t in c.state.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{_who(clients, i)}: {key!r} is {kind}; adapter tensors must be floating point"
                )

    modules = lora_modules(clients[0].state)
    if not modules:
        raise ValueError(f"{_who(clients, 0)} has no LoRA modules: no key ends in {_A_SUFFIX!r}")
    module_dims: dict[str, tuple[int, int]] = {}
    for prefix, (a_key, b_key) in modules.items():
        for i, c in enumerate(clients):
            a, b = c.state[a_key], c.state[b_key]
            _module_rank(f"{prefix} ({_who(clients, i)})", a, b)
            dims = (b.shape[0], a.shape[1])
            if i == 0:
                module_dims[prefix] = dims
            elif dims != module_dims[prefix]:
                raise ValueError(
                    f"LoRA module {prefix!r}: {_who(clients, i)} has d_out x d_in = {dims[0]} x {dims[1]}, "
                    f"{_who(clients, 0)} has {module_dims[prefix][0]} x {module_dims[prefix][1]}"
                )

    lora_keys = {k for pair in modules.values() for k in pair}
    dense_keys = [k for k in keys if k not in lora_keys]
    for key in dense_keys:
        shape = clients[0].state[key].shape
        for i, c in enumerate(clients):
            if c.state[key].shape != shape:
                raise ValueError(
                    f"{_who(clients, i)}: {key!r} has shape {tuple(c.state[key].shape)}, {_who(clients, 0)} "
                    f"has {tuple(shape)}"
                )

    for i, c in enumerate(clients):
        if not _positive_number(c.weight):
            raise ValueError(
                f"{_who(clients, i)}: weight must be a finite number > 0 (training examples), got "
                f"{c.weight!r}"
            )
    weights = normalise_weights([c.weight for c in clients])
    # Mixed precisions across clients resolve to the wider dtype, so nothing is rounded twice.
    dtypes = {k: functools.reduce(torch.promote_types, (c.state[k].dtype for c in clients)) for k in keys}
    return _Checked(weights, keys, modules, module_dims, dense_keys, dtypes)


# --- maths --------------------------------------------------------------------------------------


def _to64(t: torch.Tensor) -> torch.Tensor:
    # May return `t` itself (already float64 on CPU): callers only read it, never write in place.
    return t.detach().to(device="cpu", dtype=torch.float64)


def _weighted_mean(
    clients: Sequence[ClientUpdate], key: str, weights: np.ndarray, dtype: torch.dtype
) -> torch.Tensor:
    acc = torch.zeros(clients[0].state[key].shape, dtype=torch.float64)
    for w, c in zip(weights, clients, strict=True):
        acc += float(w) * _to64(c.state[key])
    return acc.to(dtype).contiguous()


def _truncated_factors(
    bs: list[torch.Tensor], as_: list[torch.Tensor], coeffs: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-`rank` factors (B, A) of `Σ_i coeffs_i B_i A_i` with orthonormal rows of A, plus the
    squared Frobenius norms of the discarded part and of the whole target."""
    b_cat = torch.cat([c * b for c, b in zip(coeffs, bs, strict=True)], dim=1)  # d_out x Σr
    a_cat = torch.cat(as_, dim=0)  # Σr x d_in
    q_b, r_b = torch.linalg.qr(b_cat)  # reduced: d_out x k_b, k_b x Σr
    q_a, r_a = torch.linalg.qr(a_cat.mT)  # reduced: d_in x k_a, k_a x Σr
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    k = min(rank, sigma.numel())
    b = (q_b @ u[:, :k]) * sigma[:k]
    a = vh[:k] @ q_a.mT
    sq_sigma = sigma.square()
    tail, total = float(sq_sigma[k:].sum()), float(sq_sigma.sum())
    if k < rank:
        # Keep exactly `rank` rows: zero columns of B (so the product is unchanged) and live rows of A.
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, _orthonormal_complement_rows(a, rank - k)], dim=0)
    return b, a, tail, total


def _orthonormal_complement_rows(a: torch.Tensor, m: int) -> torch.Tensor:
    """`m` orthonormal rows, orthogonal to the (orthonormal) rows of `a`; needs rows(a) + m <= cols(a).

    Deterministic: Householder QR of `[a^T, e_1 … e_n]` yields orthonormal columns whatever the
    candidates' rank, and its first rows(a) columns span a's rows, so the next `m` are the complement.
    """
    k, d = a.shape
    n = min(d - k, k + m)  # k + m identity columns: at least m of them survive projection
    candidates = torch.cat([a.mT, torch.eye(d, n, dtype=a.dtype)], dim=1)
    q, _ = torch.linalg.qr(candidates)
    return q[:, k : k + m].mT.contiguous()


def _frobenius_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X Y||_F^2 without forming X Y: X = Q_x R_x and Y^T = Q_y R_y give ||X Y|| = ||R_x R_y^T||."""
    _, r_x = torch.linalg.qr(x)
    _, r_y = torch.linalg.qr(y.mT)
    return float((r_x @ r_y.mT).square().sum())


def _result(
    checked: _Checked,
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    sq_err: dict[str, float],
    sq_target: dict[str, float],
    scaling: float,
) -> AggregateResult:
    def ratio(num: float, den: float) -> float:
        # A zero target (all B = 0, as right after LoRA init) is reproduced exactly: error 0, not NaN.
        return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0

    module_errors = {p: ratio(sq_err[p], sq_target[p]) for p in checked.modules}
    error = ratio(sum(sq_err.values()), sum(sq_target.values()))
    ordered = {k: state[k] for k in checked.keys}
    return AggregateResult(ordered, int(rank), alpha, error, module_errors, float(scaling))
