"""Expected failures: each carries a one-line message that names the bad value and the fix."""

from __future__ import annotations

import errno
import os


class FedloraError(Exception):
    """A failure the user can act on; the CLI prints its message on one line and exits 1."""

    exit_code = 1


class InputError(FedloraError):
    """Bad input (paths, files, incompatible adapters): exit code 2, like a usage error."""

    exit_code = 2


class OutputError(FedloraError):
    """A file or folder could not be written (disk full, read-only file system, no permission): exit 1."""


class Interrupted(FedloraError):
    """Ctrl-C: the command stopped; its message says what was kept and how to go on."""

    exit_code = 130


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type): enough to quote inside a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# errno -> (cause, what to do); anything else is quoted with the system's own words
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free some space or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write somewhere else"),
    errno.EROFS: ("read-only file system", "write somewhere else"),
    errno.EACCES: ("permission denied", "write somewhere you may write, or fix the permissions"),
    errno.EPERM: ("operation not permitted", "write somewhere you may write, or fix the permissions"),
}


def io_message(action: str, path: str | os.PathLike | None, error: OSError) -> str:
    """`cannot write PATH: no space left on device; free some space …`: one line, the path and the cause."""
    cause, fix = _CAUSES.get(error.errno or -1, (None, None))
    cause = cause or error.strerror or first_line(error)
    where = f" {path}" if path is not None else ""
    return f"cannot {action}{where}: {cause}" + (f"; {fix}" if fix else "")
