"""SIGTERM (scancel, docker stop, kill, a cluster's pre-emption) handled as Ctrl-C is.

Python's default for SIGTERM ends the process on the spot: no cleanup, so a `train` run left a stub
folder that blocked its name, and a `rounds` run left no message. While a command runs, SIGTERM
instead raises `Terminated` — a KeyboardInterrupt — in the main thread, so every cleanup written for
Ctrl-C runs (a failed `train` / `baseline` removes its run folder, `rounds` keeps its complete rounds
for --resume, the Flower simulation shuts Ray down), and the CLI prints one line and exits with 143
(128 + SIGTERM), the code schedulers expect. A second SIGTERM while stopping is ignored so the cleanup
can finish.

Only the console command's own process does this (`app.main` calls `enable`): importing fedlora, calling
its functions, or invoking the app in-process (Typer's CliRunner in a test suite) leaves SIGTERM to the
host process, so a `timeout` around a test suite still stops it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143

_received = threading.Event()
_enabled = False  # set by the console entry point only (enable), never at import


def enable() -> None:
    """Let SIGTERM stop the commands of this process as Ctrl-C does: for the `fedlora` command's own
    process."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    """Whether this process is the `fedlora` command's own (it handles SIGTERM)."""
    return _enabled


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as for Ctrl-C."""


def received() -> bool:
    """Whether SIGTERM arrived during the current command."""
    return _received.is_set()


def note() -> None:
    """Record a SIGTERM that a handler of its own (the Flower simulation's) turned into a stop."""
    _received.set()


def reword(message: str) -> str:
    """An interrupt message as the answer to SIGTERM: `terminated (SIGTERM): …` instead of
    `interrupted: …`."""
    rest = message.removeprefix("interrupted").removeprefix(":").strip()
    return "terminated (SIGTERM)" + (f": {rest}" if rest else "")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread of the command's own process: `enable`), SIGTERM raises
    Terminated there once. Elsewhere the block leaves SIGTERM alone."""
    _received.clear()
    if not _enabled or threading.current_thread() is not threading.main_thread():
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
