"""The ONE registry of federated method names: `--aggregation` choices, config checks, merge, Flower, README.

Kept free of torch (the CLI's `--help` reads it); each entry names the module that implements the
method, imported only when a run needs it. Adding a method = one module under `strategies/` + one
line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    target: str  # "module:Class" of the Strategy
    summary: str  # one line for `-h` and the README
    merge: str | None = None  # why `fedlora merge` cannot use it (None: it can)
    shapes_output: bool = False  # takes --svd-rank / --alpha (the aggregated adapter's rank and alpha)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", "fedlora_cli.strategies.svd:SvdStrategy",
               "mean of the updates ΔW_i = s·B_i·A_i, truncated by SVD to --svd-rank (FlexLoRA with mixed ranks)",
               shapes_output=True),
        Method("naive", "fedlora_cli.strategies.naive:NaiveStrategy",
               "mean of A and mean of B (zero-padded for mixed ranks: HetLoRA); not the mean of the products"),
        Method("exact", "fedlora_cli.strategies.exact:ExactStrategy",
               "FedEx-LoRA: mean of A and of B, plus the residual folded into a frozen low-rank base delta"),
        Method("ffa", "fedlora_cli.strategies.ffa:FfaStrategy",
               "FFA-LoRA: A frozen from the seed, only B (and the head) train; averaging B is exact"),
        Method("rolora", "fedlora_cli.strategies.rolora:RoloraStrategy",
               "RoLoRA: rounds alternate training B and A (the other frozen); every average is exact",
               merge="it alternates factors over rounds; merge with svd, naive, exact or ffa"),
    )
}  # fmt: skip


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--aggregation must be one of {', '.join(METHODS)}, got {name!r}") from None
