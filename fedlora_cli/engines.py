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
from typing import Any

from fedlora_cli.config import RoundsConfig
from fedlora_cli.options import absolute_paths

ENGINES: dict[str, str] = {
    "local": "fedlora_cli.federation.local:run_local",  # one process, clients one after another
    "flower": "fedlora_cli.flower.simulation:run_flower_simulation",  # Flower's simulation engine (Ray)
}


def run_rounds(config: RoundsConfig, *, progress: Any = None, argv: list[str] | None = None) -> Any:
    """Run `fedlora rounds` on `config.engine`; returns a `federation.RoundsResult`."""
    config = absolute_paths(config)
    module, _, name = ENGINES[config.engine].partition(":")
    return getattr(importlib.import_module(module), name)(config, progress=progress, argv=argv)
