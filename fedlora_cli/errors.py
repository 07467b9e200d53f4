"""Expected failures: each carries a one-line message that names the bad value and the fix."""

from __future__ import annotations


class FedloraError(Exception):
    """A failure the user can act on; the CLI prints its message on one line and exits 1."""

    exit_code = 1


class InputError(FedloraError):
    """Bad input (paths, files, incompatible adapters): exit code 2, like a usage error."""

    exit_code = 2
