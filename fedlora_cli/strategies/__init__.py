"""Federated methods: one module per method, one registry of names (`registry.METHODS`).

Importing this package imports no torch; `build_strategy` imports the method's module on demand.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlora_cli.strategies.registry import METHODS, Method, get_method, method_names

if TYPE_CHECKING:
    from fedlora_cli.strategies.base import Strategy

__all__ = ["METHODS", "Method", "build_strategy", "get_method", "method_names", "strategy_class"]


def strategy_class(name: str) -> type[Strategy]:
    module, _, attr = get_method(name).target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_strategy(spec: Any, lora: Any, *, seed: int, client_ids: Any = ()) -> Strategy:
    """The Strategy for `spec.method`, for clients of LoRA shape `lora` (see strategies.base.Strategy)."""
    return strategy_class(spec.method)(spec, lora, seed=seed, client_ids=client_ids)
