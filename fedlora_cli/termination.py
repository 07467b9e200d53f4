"""SIGTERM (scancel, docker stop, kill, a cluster's pre-emption) handled as Ctrl-C is.

Python's default for SIGTERM ends the process on the spot: no cleanup, so a `train` run left a stub
folder that blocked its name, and a `rounds` run left no message. While a command runs, SIGTERM
instead raises `Terminated` — a KeyboardInterrupt — in the main thread, so every cleanup written for
Ctrl-C runs (a failed `train` / `baseline` removes its run folder, `rounds` keeps its complete rounds
for --resume, the Flower simulation shuts Ray down), and the CLI prints one line and exits with 143
(128 + SIGTERM), the code schedulers expect. A second SIGTERM while stopping is ignored so the cleanup
can finish.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143

_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as for Ctrl-C."""


def received() -> bool:
    """Whether SIGTERM arrived during the current command."""
    return _received.is_set()


def note() -> None:
    """Record a SIGTERM that a handler of its own (the Flower simulation's) turned into a stop."""
    _received.set()


def reword(message: str) -> str:
    """An interrupt message as the answer to SIGTERM: `terminated (SIGTERM): …` instead of `interrupted: …`."""
    rest = message.removeprefix("interrupted").removeprefix(":").strip()
    return "terminated (SIGTERM)" + (f": {rest}" if rest else "")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises Terminated there once."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _received.is_set():
            return  # already stopping: let the cleanup finish
        _received.set()
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
