"""`fedlora download`: fill the cache with models and tasks on a machine with internet."""

from __future__ import annotations

from typing import Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import DownloadConfig

OPTIONS = c.Command(DownloadConfig)


def _download(ctx: Any, values: c.Values) -> None:
    """Download models and GLUE tasks into the Hugging Face cache; afterwards run with HF_HUB_OFFLINE=1."""
    config = values.config(DownloadConfig)
    models, tasks, cache_dir = list(config.models), list(config.tasks), config.cache_dir
    from fedlora_cli.download import run_download

    with c.reporter(transient=True) as progress:
        done = run_download(models, tasks, cache_dir, progress)
    from rich.table import Table

    table = Table(title="fedlora download", title_justify="left")
    for col in ("kind", "name", "what"):
        table.add_column(col)
    for d in done:
        table.add_row(d.kind, d.name, d.detail)
    out = c.console()
    out.print(table)
    for d in done:  # paths below the table, whole: a table cell would wrap them
        c.print_line(f"{d.name}: {d.location}")
    c.print_line(
        "offline from now on: export HF_HUB_OFFLINE=1"
        + (f" (and keep --cache-dir {cache_dir})" if cache_dir else ""),
    )


download = OPTIONS.wrap(_download)
