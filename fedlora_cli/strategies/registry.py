"""The ONE registry of federated method names: `--aggregation` choices, config checks, merge, Flower, README.

Kept free of torch (the CLI's `--help` reads it); each entry names the module that implements the
method, imported only when a run needs it. Adding a method = one module under `strategies/` + one
line here; a method with hyperparameters of its own also declares them in a spec here (`options`),
held by `config.AggregationSpec` in a field named after the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedlora_cli.options import Spec, at_least, every, integer, number, one_of, option, optional

RANK_SCALINGS = ("fixed-scale", "fixed-alpha")
SERVER_RANKS = ("truncated", "full")


@dataclass(frozen=True)
class SvdOptions(Spec):
    """svd's own options: the shape of the aggregated adapter, and FlexLoRA's conventions for mixed ranks."""

    panel: ClassVar[str] = "Method"

    rank: int | None = option(
        None,
        "--svd-rank",
        check=optional(every(at_least(1), integer(1))),
        help="svd: rank of the aggregated adapter",
        default_text="the largest client rank",
    )
    alpha: float | None = option(
        None,
        "--alpha",
        check=optional(number(0, low_open=True)),
        help="svd: lora_alpha of the aggregated adapter",
        default_text="keeps the clients' alpha/r",
    )
    rank_scaling: str = option(
        "fixed-scale",
        "--rank-scaling",
        choices=RANK_SCALINGS,
        check=one_of(RANK_SCALINGS),
        help="svd with mixed ranks: fixed-scale keeps alpha/r the same at every rank (alpha_i = s·r_i); "
        "fixed-alpha keeps --lora-alpha at every rank, as FlexLoRA's code does (scaling alpha/r_i)",
    )
    server_rank: str = option(
        "truncated",
        "--server-rank",
        choices=SERVER_RANKS,
        check=one_of(SERVER_RANKS),
        help="svd: truncated (to --svd-rank) or full: keep the untruncated mean of the updates as the "
        "global model (rank Σ r_i, lossless; FlexLoRA's full-size ΔW), each client still gets its "
        "best rank-r_i part",
    )

    def validate(self) -> None:
        if self.server_rank == "full" and self.rank is not None:
            raise ValueError("--server-rank full keeps every rank the clients send: drop --svd-rank")


@dataclass(frozen=True)
class HetloraOptions(Spec):
    """hetlora's own options: the local rank self-pruning of Cho et al. (2024), §3."""

    panel: ClassVar[str] = "Method"

    gamma: float = option(
        0.99,
        "--hetlora-gamma",
        check=number(0, 1, low_open=True),
        help="hetlora: rank decay factor γ; a client whose last (1−γ)·r_i ranks shrank in local training "
        "is pruned to ⌊γ·r_i⌋ (never below 1; 1: no pruning)",
    )
    penalty: float = option(
        0.0,
        "--hetlora-lambda",
        check=number(0),
        help="hetlora: λ of the clients' rank regulariser λ·Σ‖B[:, ⌊γr⌋:]‖·‖A[⌊γr⌋:, :]‖ over the LoRA "
        "modules (0: none)",
    )


@dataclass(frozen=True)
class Method:
    name: str
    target: str  # "module:Class" of the Strategy
    summary: str  # one line for the docs' method table
    label: str = ""  # the name papers give it, for `-h`
    merge: str | None = None  # why `fedlora merge` cannot use it (None: it can)
    options: Any = None  # the Spec class of the method's own options (None: it has none)
    one_factor: bool = False  # trains one factor per round: --equal-trainable doubles its rank
    # Recommended values of other options (config paths: {"lora.alpha": 64.0}), applied by the CLI only where
    # the user gave none, said in the run header and recorded; each is measured (docs: methods, results).
    defaults: Any = None
    # The parts of the adapter each client keeps as its own ("A", "B", "head"): never sent, never averaged,
    # kept per client between its turns (engine local: in the run tree; Flower: the ClientApp's
    # Context.state). A method with personal parts has no global model: each client ends with its own
    # (final/clients/).
    personal: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", "fedlora_cli.strategies.svd:SvdStrategy",
               "mean of the updates ΔW_i = s·B_i·A_i, truncated by SVD to --svd-rank "
               "(FlexLoRA with mixed ranks)",
               label="ΔW+SVD; FlexLoRA with mixed ranks", options=SvdOptions),
        Method("naive", "fedlora_cli.strategies.naive:NaiveStrategy",
               "mean of A and mean of B with example weights (mixed ranks: zero-padding only); "
               "not the mean of the products",
               label="FedIT: mean A, mean B"),
        Method("hetlora", "fedlora_cli.strategies.hetlora:HetloraStrategy",
               "HetLoRA: zero-padding, factors weighted by each client's ‖B_i A_i‖_F, "
               "local rank self-pruning",
               label="HetLoRA", options=HetloraOptions),
        Method("exact", "fedlora_cli.strategies.exact:ExactStrategy",
               "FedEx-LoRA: mean of A and of B, plus the residual folded into a frozen low-rank base delta",
               label="FedEx-LoRA"),
        Method("ffa", "fedlora_cli.strategies.ffa:FfaStrategy",
               "FFA-LoRA: A frozen from the seed, only B (and the head) train; averaging B is exact",
               label="FFA-LoRA", one_factor=True,
               # chosen on validation in benchmarks/regime.toml (alpha 16 or 64 at r=8, both settings): with A
               # frozen at its random start, B's steps move ΔW less than LoRA's at one alpha (docs/results.md)
               defaults={"lora.alpha": 64.0}),
        Method("rolora", "fedlora_cli.strategies.rolora:RoloraStrategy",
               "RoLoRA: rounds alternate training B and A (the other frozen); every average is exact",
               label="RoLoRA", one_factor=True,
               merge="it alternates factors over rounds; merge with svd, naive, exact or ffa"),
        Method("fedsa", "fedlora_cli.strategies.fedsa:FedsaStrategy",
               "FedSA-LoRA: A shared and averaged (A = Σ w_i A_i), B and the head kept by each client; "
               "personalised",
               label="FedSA-LoRA: shared A, personal B and head", personal=("B", "head"),
               merge="its clients keep B and the head: there is no one adapter to merge",
               defaults={"personal.client_test_fraction": 0.2}),
        Method("local", "fedlora_cli.strategies.local_only:LocalStrategy",
               "no federation: each client trains its own adapter alone, for the same rounds × local epochs",
               label="local-only training, the lower bound", personal=("A", "B", "head"),
               merge="nothing is shared: each client has its own adapter",
               defaults={"personal.client_test_fraction": 0.2}),
    )
}  # fmt: skip


def recommended(method: str, given: set[str]) -> dict[str, Any]:
    """The method's recommended option values (dotted config paths) that the user did not give."""
    defaults = get_method(method).defaults or {}
    return {path: value for path, value in defaults.items() if path not in given}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--aggregation must be one of {', '.join(METHODS)}, got {name!r}") from None
