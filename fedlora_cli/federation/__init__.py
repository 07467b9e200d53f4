"""Federated rounds for every engine: set a run up, drive its rounds, train one client, run it end to end.

    setup.py      prepare -> Setup: shards, data, model + adapter, strategy, the claimed run folder
    driver.py     RoundDriver: select -> plan -> (the engine trains) -> close the round; finish -> final/
    client.py     train_client: one client's turn (engine local here, a Flower ClientApp on its SuperNode)
    lifecycle.py  run_federated: prepare -> session -> driver -> the engine's round loop -> finish -> release
    local.py      engine `local`: the round loop with every client in this process
    personal.py   personal parts kept per client, per-client evaluation, each client's own final model
    stacked.py    engine `local`'s --clients-at-once K: a group of clients trained together over one frozen
                  base

The package knows no engine beyond `local`: the command picks one (`fedlora_cli.engines`), and the Flower
ServerApp brings its own round loop to the same `run_federated`.
"""

from fedlora_cli.errors import Interrupted
from fedlora_cli.federation.client import train_client
from fedlora_cli.federation.driver import (
    RoundDriver,
    RoundFailed,
    RoundPlan,
    RoundsResult,
    derive_seed,
    round_info,
    select_clients,
)
from fedlora_cli.federation.lifecycle import RoundLoop, run_federated
from fedlora_cli.federation.local import run_local
from fedlora_cli.federation.setup import Setup, check_run_folder, cli_resume_hint, client_count, prepare
from fedlora_cli.strategies.base import ClientPlan, ClientReport, GlobalAdapter

__all__ = [
    "ClientPlan",
    "ClientReport",
    "GlobalAdapter",
    "Interrupted",
    "RoundDriver",
    "RoundFailed",
    "RoundLoop",
    "RoundPlan",
    "RoundsResult",
    "Setup",
    "check_run_folder",
    "cli_resume_hint",
    "client_count",
    "derive_seed",
    "prepare",
    "round_info",
    "run_federated",
    "run_local",
    "select_clients",
    "train_client",
]
