"""`fedlora clientapp`: fedlora's ClientApp for one SuperNode, in one long-lived process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.errors import InputError, Interrupted


def clientapp(
    supernode: Annotated[
        str,
        typer.Option(
            "--supernode",
            help="the SuperNode's local Runtime API, HOST:PORT (its --host and --port; Flower's default)",
        ),
    ] = "127.0.0.1:9094",
    root_certificates: Annotated[
        Path | None,
        typer.Option(
            "--root-certificates",
            help="CA certificate of the SuperNode's Runtime API when it serves TLS (its --ssl-ca-certfile); "
            "without it the API is spoken in plain HTTP, to a loopback address only",
        ),
    ] = None,
    superexec_auth_secret_file: Annotated[
        Path | None,
        typer.Option(
            "--superexec-auth-secret-file",
            help="the shared secret the SuperNode was given with --superexec-auth-secret-file (Flower's "
            "SuperExec authentication: only processes that know it may take the SuperNode's messages)",
        ),
    ] = None,
) -> None:
    """Answer a SuperNode's messages with fedlora's ClientApp in this one process, so the model and the
    tokenized data stay loaded from round to round. Start the SuperNode with `--isolation process`; stop with
    Ctrl-C."""
    from fedlora_cli.flower import require_flower

    require_flower("fedlora clientapp", simulation=False)
    from fedlora_cli.flower import worker

    if root_certificates is None and not worker.is_loopback(supernode):
        raise InputError(
            f"--supernode {supernode}: plain HTTP to another machine would carry the global adapter and this "
            "client's updates in clear text; run fedlora clientapp on the SuperNode's machine (127.0.0.1) or "
            "give --root-certificates"
        )
    secret = None
    if superexec_auth_secret_file is not None:
        try:
            secret = superexec_auth_secret_file.expanduser().read_bytes()
        except OSError as e:
            raise InputError(
                f"--superexec-auth-secret-file {superexec_auth_secret_file}: {e.strerror or e}"
            ) from None
    c.print_line(f"fedlora clientapp: serving the SuperNode at {supernode} (Ctrl-C stops)")
    answered = []

    def on_task(served: worker.Served) -> None:
        answered.append(served)
        c.print_line(served.line())

    try:
        worker.serve(
            supernode,
            root_certificates=str(root_certificates) if root_certificates else None,
            auth_secret=secret,
            on_task=on_task,
            on_wait=c.print_line,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way this service stops (a task in hand got its answer)
        raise Interrupted(
            f"interrupted: fedlora clientapp stopped after answering {len(answered)} messages"
        ) from None
