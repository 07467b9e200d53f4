"""Which engine runs `fedlora rounds`: chosen here, beside the commands, so the core never imports Flower.

Every engine takes a RoundsConfig and returns a `federation.RoundsResult`, driving the same
`federation.RoundDriver`. Names are those of `config.ENGINES`.

Paths are the user's: before any engine starts, every path of the config is made absolute against the
working directory of the command (`absolute_paths`). An engine may then run anywhere — the Flower
simulation's processes run in a temporary folder — and every engine writes the run to the same place,
reads the same data, and records paths that still name the same files from any other folder.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from typing import Any

from fedlora_cli.config import RoundsConfig

ENGINES: dict[str, str] = {
    "local": "fedlora_cli.federation.local:run_local",  # one process, clients one after another
    "flower": "fedlora_cli.flower.simulation:run_flower_simulation",  # Flower's simulation engine (Ray)
}


def run_rounds(config: RoundsConfig, *, progress: Any = None, argv: list[str] | None = None) -> Any:
    """Run `fedlora rounds` on `config.engine`; returns a `federation.RoundsResult`."""
    config = absolute_paths(config)
    module, _, name = ENGINES[config.engine].partition(":")
    return getattr(importlib.import_module(module), name)(config, progress=progress, argv=argv)


def absolute_paths(config: RoundsConfig) -> RoundsConfig:
    """`config` with every path in it absolute (`~` expanded), against this process's working directory.

    The paths: --data-dir, --shards, --output-root, --output-dir, --init-adapter, --cache-dir (models and the
    tokenized data), --client-ranks FILE.json, and --model when it names a local folder (a hub id stays one).
    """
    data, model, output, aggregation = config.data, config.model, config.output, config.aggregation
    ranks = aggregation.client_ranks
    return replace(
        config,
        data=replace(data, data_dir=_absolute(data.data_dir), cache_dir=_absolute(data.cache_dir)),
        shards=_absolute(config.shards) or "",
        model=replace(
            model,
            name=_absolute(model.name) if model.is_local else model.name,
            cache_dir=_absolute(model.cache_dir),
        ),
        output=replace(output, root=_absolute(output.root), output_dir=_absolute(output.output_dir)),
        init_adapter=_absolute(config.init_adapter),
        aggregation=replace(
            aggregation,
            client_ranks=_absolute(ranks) if ranks and ranks.strip().lower().endswith(".json") else ranks,
        ),
    )


def _absolute(path: str | None) -> Any:
    """An absolute path (`~` expanded, `..` folded, links kept as the user named them); None and "" unchanged."""
    if not path:
        return path
    return os.path.abspath(os.path.expanduser(path))
