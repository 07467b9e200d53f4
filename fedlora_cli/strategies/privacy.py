"""Client-level differential privacy around any method: DP-FedAvg (McMahan et al., ICLR 2018).

Per round, for the m clients sampled: each update (the client's state minus what it was sent, in the
method's `update_space`) is clipped to L2 norm C (by the server, or already by the client with
--dp-where client, which the server re-checks); N(0, (z·C)²) noise is added to the SUM of the clipped
updates, which is divided by m — the number sampled, not the number that replied, and unweighted (every
client counts 1, whatever its example count), as DP-FedAvg's sensitivity bound requires. The noisy mean
becomes ONE pseudo-update that the wrapped method aggregates as usual; everything the method computes
from it is post-processing, so the guarantee holds for every method. The accountant (fedlora_cli.privacy)
turns (clients, m, z, rounds, δ) into ε.

Spaces: "factors" (naive, ffa, rolora): the pseudo-update is Σ_i (1/m)·x̃_i + N/m over the trained keys,
with x̃_i = x_i clipped and replies that are missing counted as the broadcast (a zero update); frozen keys
are the broadcast, bit for bit. "product" (svd, exact): the pseudo-update's s·B·A is, per module,
Σ_i (1/m)·s_i·B̃_i·Ã_i + N/m with N a dense d_out x d_in Gaussian, kept as stacked factors (the clients'
blocks, then N/m times the identity), so the method's own SVD (or residual) works on the noised mean.
With z = 0 and C = inf the pseudo-update holds exactly the numbers the method would have computed from
the clients with equal weights: the result is bit-identical to the method without DP at equal shard sizes.
"""

from __future__ import annotations

import secrets
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedlora_cli import privacy
from fedlora_cli.aggregation import ClientUpdate, lora_modules, lora_rank, normalise_weights
from fedlora_cli.config import PrivacySpec
from fedlora_cli.strategies.base import (
    Aggregated,
    ClientPlan,
    GlobalAdapter,
    Strategy,
    Wrapper,
    part_of,
)

NORM_SLACK = 1e-6  # --dp-where client: a reply may exceed C by this share (float32 rounding on the client)
# δ above either bound is said to be weak at the start of a run (PrivacyStrategy.delta_warning)
SMALL_DELTA = 1e-3
MAX_NOISE_STD = float(torch.finfo(torch.float32).max)  # z·C beyond this is no number an adapter can hold
_KEY = "privacy.noise_key"  # the secret noise key in the saved server state (--dp-secret-noise)


class PrivacyStrategy(Wrapper):
    """`inner` with client-level DP (see the module docstring). `clients`: N, every client of the run;
    `per_round`: m, the clients sampled each round; `seed`: the run seed (the noise key unless
    `spec.secret_noise`)."""

    def __init__(
        self, inner: Strategy, spec: PrivacySpec, *, clients: int, per_round: int, seed: int
    ) -> None:
        if not spec.enabled or spec.clip is None or spec.noise_multiplier is None:
            raise ValueError("PrivacyStrategy needs a PrivacySpec with --dp-clip and --dp-noise-multiplier")
        super().__init__(inner, spaces=privacy.SPACES)
        privacy.require_accounting()
        self.dp = spec
        self.clients, self.per_round = clients, per_round
        self.delta = spec.delta_for(clients)
        self.noise_key = [secrets.randbits(63), secrets.randbits(63)] if spec.secret_noise else [seed]
        # This round's plans: each client's LoRA shape (rank, scaling), and the plan of each shape (every
        # client of one shape is sent the same adapter): a reply is measured against what it was sent.
        self._round = 0
        self._shapes: dict[int, tuple[int, float]] = {}
        self._plans: dict[tuple[int, float], ClientPlan] = {}
        z = spec.noise_multiplier
        if not self.noise_std <= MAX_NOISE_STD:
            raise ValueError(
                f"--dp-noise-multiplier {z:g}: the noise std z·C = {self.noise_std:g} is beyond any number "
                f"an adapter holds (float32 ends at {MAX_NOISE_STD:.3g}); noise that size drowns every "
                "update: use a multiplier of a few units (z = 1 is common)"
            )
        try:  # the accountant once, before any work: a z it cannot take fails here, not after round 1
            self.epsilon(1)
        except (OverflowError, ArithmeticError) as e:
            raise ValueError(
                f"--dp-noise-multiplier {z:g}: the privacy accountant cannot compute ε for it "
                f"({type(e).__name__}: {e}); use a multiplier of a few units (z = 1 is common)"
            ) from None
        if spec.target_epsilon is not None and self.epsilon(1) > spec.target_epsilon:
            raise ValueError(
                f"--dp-target-epsilon {spec.target_epsilon:g}: one round already spends ε = "
                f"{self.epsilon(1):.3g} at δ = {self.delta:.3g}; raise --dp-noise-multiplier, sample fewer "
                "clients per round, or raise the target"
            )

    def describe(self) -> str:
        """What the start of a run says: one line for the mechanism, the accountant's inputs and the noise
        seed, and a second one, a warning, when δ is too large to mean much (delta_warning)."""
        d = self.dp
        noise = (
            "the noise is drawn from a secret key (--dp-secret-noise)"
            if d.secret_noise
            else "the noise is derived from --seed (reproducible: anyone who knows the seed can remove it; "
            "use --dp-secret-noise when the adapters leave your hands)"
        )
        line = (
            f"differential privacy: clip {d.clip:g} on the {d.where} in {self.update_space} space, noise "
            f"std {self.noise_std:g} on the sum of {self.per_round} of {self.clients} clients per round, "
            f"ε at δ = {self.delta:.3g}; {noise}"
        )
        warning = self.delta_warning()
        return line if warning is None else f"{line}\n{warning}"

    def delta_warning(self) -> str | None:
        """A warning when δ is not small. (ε, δ)-DP lets the guarantee fail outright with probability δ, so δ
        must be small in two senses: below 1/N (publishing one randomly chosen client's update in the clear is
        (0, 1/N)-DP, so δ >= 1/N promises nothing), and small in absolute terms (SMALL_DELTA: more than a 1 in
        1000 chance of no guarantee at all is not one worth reporting). The default 1/N² meets the first bound
        always and the second only from N = 32 clients: with N = 3 it is 0.11."""
        n, delta = self.clients, self.delta
        if delta <= SMALL_DELTA and delta < 1 / n:
            return None
        source = (
            f"the default 1/N² for N = {n} clients"
            if self.dp.delta is None
            else f"--dp-delta, N = {n} clients"
        )
        why = (
            f"at least 1/N = {1 / n:.3g}, which a mechanism that publishes one client's update in the clear "
            "also meets"
            if delta >= 1 / n
            else f"above {SMALL_DELTA:g}: the guarantee may fail outright with probability δ"
        )
        return (
            f"warning: δ = {delta:.3g} ({source}) is not small: it is {why}; the ε reported at this δ means "
            f"little. Client-level DP needs many clients (the default δ is at most {SMALL_DELTA:g} from "
            "N = 32) or a smaller --dp-delta"
        )

    # --- accounting --------------------------------------------------------------------------------

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the SUM of the clipped updates: z·C (0 when z = 0)."""
        z, c = self.dp.noise_multiplier or 0.0, self.dp.clip or 0.0
        return 0.0 if z == 0 else z * c

    def epsilon(self, rounds: int) -> float:
        return privacy.epsilon(
            clients=self.clients,
            per_round=self.per_round,
            noise_multiplier=self.dp.noise_multiplier or 0.0,
            rounds=rounds,
            delta=self.delta,
        )

    def rounds_allowed(self, rounds: int) -> tuple[int, str | None]:
        """How many of `rounds` fit in --dp-target-epsilon, and the line that says why the run stops early."""
        target = self.dp.target_epsilon
        if target is None:
            return rounds, None
        last, spent, next_eps = privacy.rounds_within(
            target,
            clients=self.clients,
            per_round=self.per_round,
            noise_multiplier=self.dp.noise_multiplier or 0.0,
            delta=self.delta,
            rounds=rounds,
        )
        if last >= rounds:
            return rounds, None
        return last, (
            f"--dp-target-epsilon {target:g}: stopping after round {last} of {rounds} (ε = {spent:.3f} at "
            f"δ = {self.delta:.3g}; round {last + 1} would reach ε = {next_eps:.3f})"
        )

    # --- what the wrapped method decides ------------------------------------------------------------

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        """The method's plan; with --dp-where client it also tells the client to clip (norm C, this space).
        The plan is kept: a reply's update is measured against what that client was sent."""
        plan = self.inner.plan(round_no, client_id, current)
        if self.dp.where == "client":
            plan = replace(plan, clip_norm=self.dp.clip, clip_space=self.update_space)
        if round_no != self._round:
            self._round, self._shapes, self._plans = round_no, {}, {}
        shape = (plan.adapter.lora.r, plan.adapter.lora.scaling)
        first = self._plans.setdefault(shape, plan)
        if first is not plan and (
            first.train != plan.train or not _same_state(first.adapter.state, plan.adapter.state)
        ):
            raise ValueError(
                f"{self.inner.name} plans clients of one LoRA shape differently: differential "
                "privacy needs one broadcast per shape"
            )
        self._shapes[client_id] = shape
        return plan

    def check_update(self, plan: ClientPlan, update: ClientUpdate) -> str | None:
        reason = self.inner.check_update(plan, update)
        if reason is not None or self.dp.where != "client":
            return reason
        norm = privacy.update_norm(
            update.state,
            plan.adapter.state,
            space=self.update_space,
            scaling=update.scaling,
            reference_scaling=plan.adapter.lora.scaling,
        )
        clip = self.dp.clip or 0.0
        if norm > clip * (1 + NORM_SLACK):
            return f"its update has norm {norm:.6g} > --dp-clip {clip:g}: it did not clip (--dp-where client)"
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.inner.state_dict())
        if self.dp.secret_noise:
            state[_KEY] = torch.tensor(self.noise_key, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        state = dict(state)
        key = state.pop(_KEY, None)
        if self.dp.secret_noise:
            if key is None:
                raise ValueError("--dp-secret-noise: the saved state has no noise key")
            self.noise_key = [int(k) for k in key.tolist()]
        elif key is not None:
            raise ValueError("the run was made with --dp-secret-noise: resume with it")
        self.inner.load_state_dict(state)

    # --- the mechanism -----------------------------------------------------------------------------

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError("differential privacy needs rounds (a broadcast to measure updates against)")
        if sampled != self.per_round:
            raise ValueError(
                f"round {round_no}: {sampled} clients sampled, the accountant assumes {self.per_round}"
            )
        if round_no != self._round:
            raise ValueError(f"round {round_no} was not planned by this strategy")
        plans = self._plans
        replied: list[tuple[ClientUpdate, ClientPlan]] = []
        for i, update in enumerate(updates):
            shape = (lora_rank(update.state), update.scaling)
            if shape not in plans:
                raise ValueError(
                    f"update {i} has LoRA r={shape[0]}, alpha/r={shape[1]:g}: no client was sent that"
                )
            replied.append((update, plans[shape]))
        planned = Counter(self._shapes.values())
        missing = planned - Counter((lora_rank(u.state), u.scaling) for u in updates)
        failed = [plans[shape] for shape in sorted(missing.elements())]  # count as zero updates

        space, clip = self.update_space, self.dp.clip or 0.0
        norms = privacy.plan_update_norms(replied, space=space)
        factors = [privacy.clip_factor(n, clip) for n in norms]
        trained = frozenset().union(*(p.train for p in plans.values()))
        # Equal weights 1/m, computed as the methods compute normalised weights (bit-identical arithmetic).
        w = float(normalise_weights([1.0] * sampled)[0])
        rng = privacy.noise_generator(self.noise_key, round_no) if self.noise_std > 0 else None
        build = _pseudo_factors if space == "factors" else _pseudo_product
        pseudo = build(previous, replied, factors, failed, w, trained, rng, self.noise_std)
        out = self.inner.aggregate(round_no, previous, [pseudo], sampled=sampled)

        # The method computed in float64 from the pseudo-update: back to the clients' dtypes.
        dtypes = {k: t.dtype for k, t in previous.state.items()}
        state = {
            k: (v if v.dtype == dtypes.get(k, v.dtype) else v.to(dtypes[k]).contiguous())
            for k, v in out.adapter.state.items()
        }
        record = dict(out.record)
        record["privacy"] = {
            "epsilon": self.epsilon(round_no),
            "delta": self.delta,
            "noise_std": self.noise_std,  # on the sum; the mean gets noise_std / sampled
            "noise_multiplier": self.dp.noise_multiplier,
            "clip": clip,
            "clipped": sum(f < 1.0 for f in factors),
            "norms": {
                "min": min(norms, default=0.0),
                "median": statistics.median(norms) if norms else 0.0,
                "max": max(norms, default=0.0),
            },
            "sampled": sampled,
            "clients": self.clients,
            "where": self.dp.where,
            "space": space,
            "noise": "secret" if self.dp.secret_noise else "seeded",
        }
        return Aggregated(GlobalAdapter(state, out.adapter.lora), record)


def _same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def _to64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _pad(key: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A client's factor at the broadcast's rank: zero rows of A / zero columns of B (HetLoRA), as the
    factor-averaging methods pad smaller ranks."""
    if t.shape == shape:
        return t
    if part_of(key) == "A" and t.shape[1] == shape[1] and t.shape[0] <= shape[0]:
        return torch.cat([t, t.new_zeros(shape[0] - t.shape[0], t.shape[1])], dim=0)
    if part_of(key) == "B" and t.shape[0] == shape[0] and t.shape[1] <= shape[1]:
        return torch.cat([t, t.new_zeros(t.shape[0], shape[1] - t.shape[1])], dim=1)
    raise ValueError(f"{key}: a client's shape {tuple(t.shape)} does not fit the broadcast's {tuple(shape)}")


def _clipped(update: ClientUpdate, plan: ClientPlan, key: str, factor: float) -> torch.Tensor:
    """One key of the clipped state `sent + factor·(state − sent)`; the client's own tensor when
    factor = 1."""
    if factor == 1.0:
        return _to64(update.state[key])
    sent = _to64(plan.adapter.state[key])
    return sent + factor * (_to64(update.state[key]) - sent)


def _pseudo_factors(
    previous: GlobalAdapter,
    replied: Sequence[tuple[ClientUpdate, ClientPlan]],
    factors: Sequence[float],
    failed: Sequence[ClientPlan],
    w: float,
    trained: frozenset[str],
    rng: Any,
    noise_std: float,
) -> ClientUpdate:
    """Factor space: per trained key Σ_i w·pad(x̃_i) + Σ_failed w·pad(sent) + w·N(0, noise_std²); frozen
    keys are the broadcast's tensors. At the broadcast's LoRA shape and scaling."""
    noisy = {k: tuple(t.shape) for k, t in previous.state.items() if part_of(k) in trained}
    noise = _draw(rng, noisy, noise_std)
    state: dict[str, torch.Tensor] = {}
    for key, ref in previous.state.items():
        if key not in noisy:
            state[key] = ref
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for (update, plan), factor in zip(replied, factors, strict=True):
            acc += w * _pad(key, _clipped(update, plan, key, factor), ref.shape)
        for plan in failed:
            acc += w * _pad(key, _to64(plan.adapter.state[key]), ref.shape)
        if key in noise:
            acc += w * noise[key]
        state[key] = acc
    return ClientUpdate(state, scaling=previous.lora.scaling, weight=1.0)


def _draw(rng: Any, shapes: Mapping[str, tuple[int, ...]], std: float) -> dict[str, torch.Tensor]:
    """N(0, std²) for each named block, drawn in sorted name order: the noise a key gets does not depend on
    the order of the state's keys (a state read back from disk for --resume has them sorted). None: no
    noise."""
    if rng is None:
        return {}
    return {name: privacy.gaussian(rng, shapes[name], std) for name in sorted(shapes)}


def _pseudo_product(
    previous: GlobalAdapter,
    replied: Sequence[tuple[ClientUpdate, ClientPlan]],
    factors: Sequence[float],
    failed: Sequence[ClientPlan],
    w: float,
    trained: frozenset[str],
    rng: Any,
    noise_std: float,
) -> ClientUpdate:
    """Product space: per module, stacked factors whose product is Σ_i w·s_i·B̃_i·Ã_i (+ the failed clients'
    broadcasts) + w·N (N dense d_out x d_in, A block = identity), at scaling 1; the head as in factor space.
    A clipped client contributes two blocks: factor·s·B·A + (1 − factor)·s_0·B_0·A_0."""
    modules = lora_modules(previous.state)
    lora_keys = {k for pair in modules.values() for k in pair}
    noisy = {
        k: tuple(t.shape) for k, t in previous.state.items() if k not in lora_keys and part_of(k) in trained
    }
    if trained & {"A", "B"}:  # the module's dense ΔW, named after its B key
        noisy.update(
            {b: (previous.state[b].shape[0], previous.state[a].shape[1]) for a, b in modules.values()}
        )
    noise = _draw(rng, noisy, noise_std)
    state: dict[str, torch.Tensor] = {}
    for a_key, b_key in modules.values():
        bs: list[torch.Tensor] = []
        as_: list[torch.Tensor] = []
        for (update, plan), factor in zip(replied, factors, strict=True):
            if factor == 1.0:
                bs.append(w * update.scaling * _to64(update.state[b_key]))
                as_.append(_to64(update.state[a_key]))
            else:
                s0 = plan.adapter.lora.scaling
                bs += [
                    w * factor * update.scaling * _to64(update.state[b_key]),
                    w * (1.0 - factor) * s0 * _to64(plan.adapter.state[b_key]),
                ]
                as_ += [_to64(update.state[a_key]), _to64(plan.adapter.state[a_key])]
        for plan in failed:
            bs.append(w * plan.adapter.lora.scaling * _to64(plan.adapter.state[b_key]))
            as_.append(_to64(plan.adapter.state[a_key]))
        if b_key in noise:
            bs.append(w * noise[b_key])
            as_.append(torch.eye(noise[b_key].shape[1], dtype=torch.float64))
        state[b_key], state[a_key] = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
    for key, ref in previous.state.items():
        if key in lora_keys:
            continue
        if key not in noisy:
            state[key] = ref
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for (update, plan), factor in zip(replied, factors, strict=True):
            acc += w * _clipped(update, plan, key, factor)
        for plan in failed:
            acc += w * _to64(plan.adapter.state[key])
        if key in noise:
            acc += w * noise[key]
        state[key] = acc
    ordered = {k: state[k] for k in previous.state}
    return ClientUpdate(ordered, scaling=1.0, weight=1.0)


def with_privacy(
    strategy: Strategy, spec: PrivacySpec, *, clients: int, per_round: int, seed: int
) -> Strategy:
    """`strategy` wrapped for DP when `spec` is on; the strategy itself otherwise."""
    if not spec.enabled:
        return strategy
    return PrivacyStrategy(strategy, spec, clients=clients, per_round=per_round, seed=seed)
