"""`fedlora merge`: one-shot FedAvg of adapters that already exist."""

from __future__ import annotations

from typing import Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import MergeConfig

OPTIONS = c.Command(
    MergeConfig,
    required={"adapters", "save_adapter"},
    skip={
        "aggregation.client_ranks",
        "aggregation.prox_mu",
        "aggregation.hetlora.gamma",
        "aggregation.hetlora.penalty",
    },
)


def _merge(ctx: Any, values: c.Values) -> None:
    """Merge existing adapters (any label count; the head is merged too) into one PEFT adapter."""
    config = values.config(MergeConfig)
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


merge = OPTIONS.wrap(_merge)
