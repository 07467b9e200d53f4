"""`fedlora download`: fill the cache with models and tasks on a machine with internet."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import ModelSpec, model_from_size
from fedlora_cli.errors import InputError
from fedlora_cli.tasks import get_task, task_names


def download(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="model to fetch (repeatable); roberta-base, a hub id …"),
    ] = None,
    model_size: Annotated[
        list[str] | None,
        typer.Option("--model-size", help="base and/or large: the RoBERTa models (repeatable)"),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task", "-t", help="GLUE task to fetch (repeatable), or 'all'", autocompletion=c.complete_task
        ),
    ] = None,
    cache_dir: c.CacheDirOpt = None,
) -> None:
    """Download models and GLUE tasks into the Hugging Face cache; afterwards run with HF_HUB_OFFLINE=1."""
    models = [
        *c.split_list(model),
        *(c.build(lambda s=s: model_from_size(s)) for s in c.split_list(model_size)),
    ]
    tasks = list(c.split_list(task))
    if "all" in tasks:
        tasks = task_names()
    for t in tasks:
        c.build(lambda t=t: get_task(t))
    for m in models:
        c.build(lambda m=m: ModelSpec(m, cache_dir))
    if not models and not tasks:
        raise InputError(
            "nothing to download: give --model and/or --task (e.g. --model roberta-base --task sst2)"
        )
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
