"""fedlora on Flower: a ServerApp and a ClientApp over the same round pieces as engine `local`.

This package is the only place that imports `flwr`; importing it (this file) does not, so the CLI
can say how to install Flower before anything tries to load it.
"""

from __future__ import annotations

from fedlora_cli.errors import InputError

INSTALL_HINT = "pip install 'fedlora[flower]'"


def require_flower(what: str = "--engine flower", *, simulation: bool = True) -> None:
    """Fail with one actionable line when Flower (or its simulation engine, Ray) is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs Flower: {INSTALL_HINT}") from None
    if not simulation:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError(f"--engine flower needs Flower's simulation engine (Ray): {INSTALL_HINT}") from None
