"""`fedlora merge`: one-shot FedAvg of adapters that already exist."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import AggregationSpec, MergeConfig


def merge(
    adapters: Annotated[
        list[str],
        typer.Option("--adapters", help="adapter folders to merge (repeatable, or several after one flag)"),
    ],
    save_adapter: Annotated[str, typer.Option("--save-adapter", help="folder for the merged PEFT adapter")],
    weights: Annotated[
        list[float] | None, typer.Option("--weights", help="one weight per adapter \\[default: equal]")
    ] = None,
    shard_manifests: Annotated[
        list[str] | None,
        typer.Option(
            "--shard-manifests", help="one client_<i>.json per adapter: weights = its example count"
        ),
    ] = None,
    aggregation: c.AggregationOpt = c.Method("svd"),
    svd_rank: c.SvdRankOpt = None,
    alpha: c.AlphaOpt = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task", "-t", help="check the heads against this task", autocompletion=c.complete_task
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="check the merged adapter loads into this base model")
    ] = None,
    overwrite: c.OverwriteOpt = False,
) -> None:
    """Merge existing adapters (any label count; the head is merged too) into one PEFT adapter."""
    config = c.build(
        lambda: MergeConfig(
            adapters=tuple(adapters),
            save_adapter=save_adapter,
            weights=tuple(weights) if weights else None,
            shard_manifests=tuple(shard_manifests) if shard_manifests else None,
            aggregation=AggregationSpec(c.method_name(aggregation), svd_rank, alpha),
            task=task,
            model=model,
            overwrite=overwrite,
        )
    )
    from fedlora_cli.merging import FUSE_MANIFEST, run_merge

    result = run_merge(config, argv=c.argv())
    rows = [
        ("adapters", len(config.adapters)),
        ("weights", ", ".join(f"{w:.3f}" for w in result.weights)),
        ("aggregation", f"{config.aggregation.method} → r={result.rank}, alpha={result.alpha:g}"),
        ("aggregation error", result.error),
        ("labels", result.num_labels if result.num_labels is not None else "?"),
    ]
    out = c.console()
    out.print(c.summary_table("fedlora merge", rows))
    c.print_path("adapter", f"{result.adapter_dir} (with {FUSE_MANIFEST})")
