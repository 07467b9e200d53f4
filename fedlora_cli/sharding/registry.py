"""The ONE registry of partitioners: `--mode` / `--partition` choices, config checks, `-h` and the docs.

Kept free of numpy (the CLI's `--help` reads it); each entry names the function that implements the
mode, imported only when a split is made. Adding a partitioner = one module under `sharding/` + one
line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partitioner:
    name: str
    # "module:function", called as function(rng, keys, k, **{option: value for each listed option})
    target: str
    summary: str  # one line for `-h` and the docs
    # The options of make_client_splits the function takes, by name; "category_key" marks the category
    # modes: it is not passed on, it says which column gives `keys.categories`. --min-size is checked
    # for every mode; the modes that list it use it to redraw.
    options: tuple[str, ...] = ()

    @property
    def uses_categories(self) -> bool:
        return "category_key" in self.options

    @property
    def uses_overlap(self) -> bool:
        return "overlap_ratio" in self.options


PARTITIONERS: dict[str, Partitioner] = {
    p.name: p
    for p in (
        Partitioner("iid", "fedlora_cli.sharding.iid:split",
                    "stratified; every client gets the floor or ceil of each stratum's share"),
        Partitioner("overlap", "fedlora_cli.sharding.overlap:split",
                    "a disjoint iid part plus ~--overlap-ratio of each shard from a shared pool",
                    ("overlap_ratio",)),
        Partitioner("category", "fedlora_cli.sharding.category:split",
                    "whole categories of --category-key per client (split when clients outnumber them)",
                    ("category_key",)),
        Partitioner("category_overlap", "fedlora_cli.sharding.category_overlap:split",
                    "category plus ~--overlap-ratio of each shard from a pool of all the data",
                    ("category_key", "overlap_ratio")),
        Partitioner("dirichlet", "fedlora_cli.sharding.dirichlet:split",
                    "label skew, per-label client shares from Dir(--dirichlet-alpha); "
                    "smaller alpha, more skew",
                    ("dirichlet_alpha", "min_size", "max_redraws")),
        Partitioner("quantity", "fedlora_cli.sharding.quantity:split",
                    "size skew, client sizes from Dir(--dirichlet-alpha); labels balanced within each",
                    ("dirichlet_alpha", "min_size", "max_redraws")),
    )
}  # fmt: skip


def partitioner_names() -> tuple[str, ...]:
    return tuple(PARTITIONERS)


def get_partitioner(name: str) -> Partitioner:
    try:
        return PARTITIONERS[name]
    except KeyError:
        raise ValueError(f"unknown sharding mode {name!r}: choose one of {', '.join(PARTITIONERS)}") from None
