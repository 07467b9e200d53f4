"""Server-side norm bounding around any method without noise (Sun et al., 2019): no client's update counts
for more than a bound, so no single client can take the global adapter over by scaling its update.

Per round, each client's update (its adapter state minus what it was sent, in the method's `update_space`:
"factors" for naive/ffa/rolora, per module the dense ΔW = s·B·A plus the head for svd/exact; see
fedlora_cli.privacy) is measured, and every update above the round's bound is clipped to it before the
wrapped method aggregates the updates as usual (its own maths, example weights). The bound is --norm-bound C,
or K × the lower median of the round's update norms (--norm-bound-median K), or the smaller of the two.

Clipping is the DP clip (fedlora_cli.privacy.clip_client_update): in factor space `sent + δ·B/‖δ‖`, exact;
in product space the product is not linear in the factors, so the state moves back along the client's factor
update to the largest t in [0, 1] whose product-space update has norm <= B (bisection). Either way the
clipped update stays a LoRA adapter of the client's rank, which every method aggregates. An update within
the bound is passed on untouched: with a bound no client reaches, the run is bit-identical to the method
alone.

No state: the bound is recomputed every round from that round's norms, so --resume has nothing to restore.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

from fedlora_cli import privacy
from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import NormBoundSpec
from fedlora_cli.strategies.base import Aggregated, ClientPlan, GlobalAdapter, Strategy, Wrapper


def round_bound(
    norms: Sequence[float], *, fixed: float | None, multiple: float | None
) -> tuple[float, float]:
    """This round's bound and the lower median of `norms`: min(fixed, multiple × median), either part
    optional (inf when neither is given).

    The LOWER median (of an even count, the smaller of the two middle norms): with the usual mean of the
    two, one scaled update out of two clients would raise the bound with it.
    """
    if not norms:
        raise ValueError("no client updates to bound")
    median = float(statistics.median_low(norms))
    bound = math.inf
    if fixed is not None:
        bound = min(bound, float(fixed))
    if multiple is not None:
        bound = min(bound, float(multiple) * median)
    return bound, median


class NormBoundStrategy(Wrapper):
    """`inner` with every client update clipped to the round's bound first (see the module docstring)."""

    def __init__(self, inner: Strategy, bound: NormBoundSpec) -> None:
        if not bound.enabled:
            raise ValueError("NormBoundStrategy needs --norm-bound or --norm-bound-median")
        super().__init__(inner, spaces=privacy.SPACES)
        self.bound = bound
        # This round's plans by client id: each reply is measured against what that client was sent.
        self._round = 0
        self._plans: dict[int, ClientPlan] = {}

    def describe(self) -> str:
        """One line for the start of a run: the bound and where it is measured."""
        b = self.bound
        parts = [f"{b.fixed:g}"] if b.fixed is not None else []
        if b.median_multiple is not None:
            parts.append(f"{b.median_multiple:g} × the round's median update norm")
        bound = parts[0] if len(parts) == 1 else f"the smaller of {parts[0]} and {parts[1]}"
        return (
            f"norm bound: each client's update is clipped on the server to {bound}, in {self.update_space} "
            "space (no noise: this is not differential privacy)"
        )

    # --- what the wrapped method decides ------------------------------------------------------------

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        plan = self.inner.plan(round_no, client_id, current)
        if round_no != self._round:
            self._round, self._plans = round_no, {}
        self._plans[client_id] = plan
        return plan

    # --- the bound ---------------------------------------------------------------------------------

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError("norm bounding needs rounds (a broadcast to measure updates against)")
        if round_no != self._round:
            raise ValueError(f"round {round_no} was not planned by this strategy")
        plans: list[ClientPlan] = []
        for i, update in enumerate(updates):
            plan = self._plans.get(update.client) if update.client is not None else None
            if plan is None:
                who = update.name or f"update {i + 1}"
                raise ValueError(f"{who} is not from a client planned in round {round_no}")
            plans.append(plan)
        space = self.update_space
        norms = privacy.plan_update_norms(zip(updates, plans, strict=True), space=space)
        bound, median = round_bound(norms, fixed=self.bound.fixed, multiple=self.bound.median_multiple)
        bounded: list[ClientUpdate] = []
        clipped: list[int] = []
        for update, plan, norm in zip(updates, plans, norms, strict=True):
            if not norm > bound:
                bounded.append(update)  # untouched: the same tensors the method would have had
                continue
            state, _ = privacy.clip_client_update(
                update.state, plan.adapter.state, bound, space=space, scaling=update.scaling
            )
            bounded.append(replace(update, state=state))
            clipped.append(int(update.client))  # type: ignore[arg-type]  # matched to a plan above
        out = self.inner.aggregate(round_no, previous, bounded, sampled=sampled)
        record = dict(out.record)
        record["norm_bound"] = {
            "bound": bound,  # the bound this round: min(fixed, median_multiple × median)
            "fixed": self.bound.fixed,
            "median_multiple": self.bound.median_multiple,
            "median": median,  # the lower median of the norms
            "space": space,
            "clipped": clipped,  # client ids, ascending
            "norms": {str(u.client): n for u, n in zip(updates, norms, strict=True)},  # before clipping
        }
        return Aggregated(out.adapter, record)


def with_norm_bound(strategy: Strategy, spec: NormBoundSpec) -> Strategy:
    """`strategy` wrapped for norm bounding when `spec` is on; the strategy itself otherwise."""
    if not spec.enabled:
        return strategy
    return NormBoundStrategy(strategy, spec)
