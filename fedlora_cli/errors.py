"""Expected failures: each carries a one-line message that names the bad value and the fix."""

from __future__ import annotations


class FedloraError(Exception):
    """A failure the user can act on; the CLI prints its message on one line and exits 1."""

    exit_code = 1


class InputError(FedloraError):
    """Bad input (paths, files, incompatible adapters): exit code 2, like a usage error."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type): enough to quote inside a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Interrupted(FedloraError):
    """Ctrl-C (or SIGTERM) stopped a run: the run is marked `interrupted`; the message says how to go on."""

    exit_code = 130
