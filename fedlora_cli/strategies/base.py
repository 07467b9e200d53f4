"""What a federated method is: a Strategy plans each selected client's work and turns the clients'
updates into the next global adapter. The types that cross between server and clients live here too.

A Strategy is pure server-side logic (no I/O, no engine): the round driver (`federation`) calls
`plan` for every selected client, lets an engine train them, and calls `aggregate` with their
updates. Whatever a method keeps between rounds (a residual, a frozen factor …) is in `state_dict()`,
saved with every complete round and given back by `load_state_dict()` on `--resume`, so a resumed run
is bit-identical for every method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedlora_cli.aggregation import AggregateResult, ClientUpdate, lora_modules, resize_rank
from fedlora_cli.config import AggregationSpec, LoraSpec

PARTS = ("A", "B", "head")  # what a client may train: LoRA A, LoRA B, the classification head
BaseDelta = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module prefix -> (P, Q): W0 += P @ Q, frozen


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def part_of(key: str) -> str:
    """Which part of an adapter state a key belongs to: "A", "B" or "head"."""
    if ".lora_A." in key:
        return "A"
    if ".lora_B." in key:
        return "B"
    return "head"


@dataclass(frozen=True)
class GlobalAdapter:
    """An adapter state (PEFT keys: LoRA A/B and the head) and the LoRA shape it has."""

    state: dict[str, torch.Tensor]
    lora: LoraSpec

    @property
    def num_bytes(self) -> int:
        return state_bytes(self.state)


@dataclass(frozen=True)
class ClientPlan:
    """One selected client's work in one round, as the server decides it."""

    client_id: int
    adapter: GlobalAdapter  # what the client loads and trains: its own LoRA shape
    train: frozenset[str] = frozenset(PARTS)  # the parts that train; the others stay bit-identical
    prox_mu: float = 0.0  # FedProx: μ/2·‖θ − θ_broadcast‖² over the trained parameters
    base_delta: BaseDelta = field(default_factory=dict)  # frozen low-rank change of the base weights
    base_delta_key: str = ""  # names `base_delta` (same key, same tensors) so a model applies it once
    clip_norm: float | None = None  # client-side DP: clip the update (state − adapter) to this L2 norm
    clip_space: str = "factors"  # ... measured in this space (Strategy.update_space; fedlora_cli.privacy)
    # HetLoRA's rank regulariser: λ·Σ_modules ‖B[:, k:]‖_F·‖A[k:, :]‖_F added to the loss (k = tail_from)
    tail_penalty: float = 0.0
    tail_from: int = 0
    # Personal parts (a method whose clients keep parts of the adapter, e.g. FedSA-LoRA's B and head): they
    # are not in `adapter` (what is sent holds the shared parts only) and the client reports them to no one;
    # it starts from its own, as they were after its turn in round `personal_round`, or from `personal_start`,
    # the run's initial values of those parts (the same for every client), sent for its first turn only.
    personal: frozenset[str] = frozenset()
    personal_round: int = 0  # the round of the client's last counted turn (0: it has none yet)
    personal_start: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_bytes(self) -> int:
        """What the server sends: the adapter, the factors of the base delta, a first turn's personal
        start."""
        return (
            self.adapter.num_bytes
            + sum(state_bytes({"p": p, "q": q}) for p, q in self.base_delta.values())
            + state_bytes(self.personal_start)
        )


@dataclass(frozen=True)
class ClientReport:
    """What a client sends back: its adapter state and LoRA shape, its example count (the FedAvg
    weight), its seed and training statistics."""

    client_id: int
    state: dict[str, torch.Tensor] = field(repr=False)
    lora: LoraSpec
    examples: int
    seed: int
    train: dict[str, Any]
    eval: dict[str, float] | None = None
    wire_bytes: int | None = None  # size of the record that actually carried the state (Flower), if known
    # The plan's personal parts after the turn: kept by the client (engine local: the run tree; Flower: the
    # ClientApp's Context.state), never sent (`state` holds only the shared parts), never aggregated.
    personal: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_bytes(self) -> int:
        return self.wire_bytes if self.wire_bytes is not None else state_bytes(self.state)

    def update(self) -> ClientUpdate:
        return ClientUpdate(
            self.state,
            scaling=self.lora.scaling,
            weight=self.examples,
            name=f"client {self.client_id}",
            client=self.client_id,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "client": self.client_id,
            "examples": self.examples,
            "seed": self.seed,
            "rank": self.lora.r,
            "bytes_up": self.num_bytes,
            **self.train,
            **({"eval": self.eval} if self.eval is not None else {}),
        }


@dataclass(frozen=True)
class Aggregated:
    """The next global adapter and a record of what the aggregation did (history.jsonl's `aggregation`)."""

    adapter: GlobalAdapter
    record: dict[str, Any]

    @classmethod
    def of(cls, method: str, result: AggregateResult, lora: LoraSpec, **extra: Any) -> Aggregated:
        new_lora = lora.at_rank(
            result.rank, result.scaling
        )  # alpha in the clients' convention (rsLoRA or not)
        record = {
            "method": method,
            "rank": result.rank,
            "alpha": new_lora.alpha,
            "error": result.error,
            "module_errors": result.module_errors,
            **extra,
        }
        return cls(GlobalAdapter(result.state, new_lora), record)


class Strategy:
    """A federated method. Subclasses implement `aggregate` and may override the other hooks.

    spec: the method and its options; lora: the clients' LoRA shape as the user chose it
    (`--lora-r`, `--lora-alpha`, …); seed: the run seed; client_ids: every client of the run (for
    per-client ranks).
    """

    name: ClassVar[str] = ""
    # Where differential privacy (strategies/privacy.py) clips and noises a client's update: "factors"
    # (the deltas of what clients send: A, B, head) when the method averages factors, or "product" (per
    # module the dense ΔW = s·B·A, plus the head) when it aggregates the products (svd, exact). Privacy is
    # the same either way (the method only ever sees one noised pseudo-update); the space decides which
    # aggregation the method still performs on it.
    update_space: ClassVar[str] = "factors"

    def __init__(
        self, spec: AggregationSpec, lora: LoraSpec, *, seed: int, client_ids: Sequence[int] = ()
    ) -> None:
        self.spec = spec
        self.lora = lora
        self.seed = seed
        self.ranks = spec.ranks_for(list(client_ids), lora.r)

    # --- the shapes ------------------------------------------------------------------------------

    def client_lora(self, client_id: int) -> LoraSpec:
        """The client's LoRA shape: its rank, at the scaling the user chose (alpha_i = s·r_i; s·√r_i with
        rsLoRA)."""
        return self.lora.at_rank(self.ranks.get(client_id, self.lora.r))

    @property
    def global_rank(self) -> int:
        """Rank of the aggregated adapter: --svd-rank, else the largest client rank."""
        if self.spec.svd.rank is not None:  # svd's own option (config refuses it for the other methods)
            return self.spec.svd.rank
        return max(self.ranks.values(), default=self.lora.r)

    @property
    def global_alpha(self) -> float:
        """lora_alpha of the aggregated adapter: --alpha, else the clients' scaling at the global rank."""
        alpha = self.spec.svd.alpha
        return alpha if alpha is not None else self.lora.at_rank(self.global_rank).alpha

    @property
    def global_scaling(self) -> float:
        """What the aggregated adapter's B·A is multiplied by: `global_alpha` in the clients' convention."""
        return self.global_alpha / self.lora.rank_divisor(self.global_rank)

    # --- the hooks -------------------------------------------------------------------------------

    @property
    def personal_parts(self) -> frozenset[str]:
        """The parts each client keeps as its own (the registry's `Method.personal`); empty: a global
        method."""
        from fedlora_cli.strategies.registry import METHODS

        method = METHODS.get(self.name)
        return frozenset(method.personal) if method is not None else frozenset()

    def initial(self, adapter: GlobalAdapter) -> GlobalAdapter:
        """Round 1's broadcast, from the fresh (seeded) or --init-adapter adapter. Default: as it is;
        each client gets it at its own rank (`plan`)."""
        return adapter

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        """Default: the global adapter at the client's rank, everything trains; the personal parts are not
        sent."""
        lora = self.client_lora(client_id)
        plan = ClientPlan(
            client_id,
            fit(current, lora.r, lora.scaling, lora),
            prox_mu=self.spec.prox_mu,
            base_delta=self.base_delta(),
            base_delta_key=self.base_delta_key(),
        )
        return keep_personal(plan, self.personal_parts)

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        """The next global adapter from the clients' updates (weights: training examples).

        `previous` is the adapter broadcast this round (None for `fedlora merge`, one-shot); `sampled`
        is how many clients were selected this round (updates may be fewer when some failed), for
        wrappers that need a fixed denominator (differential privacy).
        """
        raise NotImplementedError

    def base_delta(self) -> BaseDelta:
        """The frozen change of the base weights the global model carries (none for most methods)."""
        return {}

    def base_delta_key(self) -> str:
        """A name for the current `base_delta()`: equal names mean equal tensors (models apply it once)."""
        return ""

    def export(self, adapter: GlobalAdapter) -> GlobalAdapter:
        """The global model as ONE plain PEFT adapter (for `final/`): the adapter itself by default."""
        return adapter

    def check_update(self, plan: ClientPlan, update: ClientUpdate) -> str | None:
        """Why a client's update cannot be used (None: it can). Parts that were frozen must come back
        bit-identical: a client that changed them did not follow the plan."""
        for key, sent in plan.adapter.state.items():
            if part_of(key) not in plan.train and not torch.equal(update.state[key], sent):
                return f"{key} was frozen this round but came back changed"
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server state to save with each complete round (empty: nothing beyond the adapter)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no server state, but the run has {sorted(state)[:3]}")


class Wrapper(Strategy):
    """A strategy around another (norm bounding, differential privacy, a server optimiser): it takes the
    wrapped method's name, shapes, update space and plans, and changes only what it overrides. `aggregate`
    and the state methods are delegated too; a wrapper that keeps state of its own extends them."""

    def __init__(self, inner: Strategy, *, spaces: Sequence[str]) -> None:
        if inner.update_space not in spaces:
            raise ValueError(
                f"{inner.name}: update_space must be one of {tuple(spaces)}, got {inner.update_space!r}"
            )
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # messages name the method
        self.spec, self.lora, self.seed, self.ranks = inner.spec, inner.lora, inner.seed, inner.ranks
        self.update_space = inner.update_space  # type: ignore[misc]

    def client_lora(self, client_id: int) -> LoraSpec:
        return self.inner.client_lora(client_id)

    @property
    def global_rank(self) -> int:
        return self.inner.global_rank

    @property
    def global_alpha(self) -> float:
        return self.inner.global_alpha

    def initial(self, adapter: GlobalAdapter) -> GlobalAdapter:
        return self.inner.initial(adapter)

    def plan(self, round_no: int, client_id: int, current: GlobalAdapter) -> ClientPlan:
        return self.inner.plan(round_no, client_id, current)

    def check_update(self, plan: ClientPlan, update: ClientUpdate) -> str | None:
        return self.inner.check_update(plan, update)

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        return self.inner.aggregate(round_no, previous, updates, sampled=sampled)

    def base_delta(self) -> BaseDelta:
        return self.inner.base_delta()

    def base_delta_key(self) -> str:
        return self.inner.base_delta_key()

    def export(self, adapter: GlobalAdapter) -> GlobalAdapter:
        return self.inner.export(adapter)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


def split_parts(
    state: Mapping[str, torch.Tensor], personal: frozenset[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, personal) halves of an adapter state: the keys of the `personal` parts and the others."""
    shared = {k: v for k, v in state.items() if part_of(k) not in personal}
    own = {k: v for k, v in state.items() if part_of(k) in personal}
    return shared, own


def keep_personal(plan: ClientPlan, personal: frozenset[str]) -> ClientPlan:
    """`plan` with the `personal` parts taken out of what is sent (and marked as the client's own)."""
    if not personal:
        return plan
    shared, _ = split_parts(plan.adapter.state, personal)
    return replace(plan, adapter=GlobalAdapter(shared, plan.adapter.lora), personal=frozenset(personal))


def fit(adapter: GlobalAdapter, rank: int, scaling: float, lora: LoraSpec | None = None) -> GlobalAdapter:
    """`adapter` at `rank`, keeping the product s·B·A: the factors are resized (`resize_rank`) and B is
    rescaled when the adapter's scaling differs from `scaling`, so what the model computes is unchanged
    (up to the dropped components when the rank shrinks)."""
    target = lora or adapter.lora.at_rank(rank, scaling)
    if target.r == adapter.lora.r and math.isclose(target.scaling, adapter.lora.scaling, rel_tol=1e-12):
        return adapter if target == adapter.lora else GlobalAdapter(adapter.state, target)
    state = resize_rank(adapter.state, rank) if rank != adapter.lora.r else dict(adapter.state)
    ratio = adapter.lora.scaling / target.scaling
    if not math.isclose(ratio, 1.0, rel_tol=1e-12):
        for _, b_key in lora_modules(state).values():
            state[b_key] = (state[b_key].double() * ratio).to(state[b_key].dtype)
    return GlobalAdapter(state, target)
