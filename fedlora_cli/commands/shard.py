"""`fedlora shard`: split a task's training set across K clients, in the reference's manifest format."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import ShardConfig

if TYPE_CHECKING:
    from fedlora_cli.sharding import ShardResult

MAX_ROWS = 40  # a longer table shows its head and tail; summary.json has every client
OPTIONS = c.Command(ShardConfig, required={"task", "clients"})


def _shard(ctx: Any, values: c.Values) -> None:
    """Split the training set across K clients: iid, overlapping, by category, or Dirichlet-skewed."""
    config = values.config(ShardConfig)
    from fedlora_cli.sharding import run_shard

    with c.reporter(transient=True) as progress:
        result = run_shard(config, progress=progress)
    show_shard_result(result, config)


shard = OPTIONS.wrap(_shard)


def _labels_cell(counts: dict[str, Any], regression: bool) -> str:
    if regression:
        if counts.get("min") is None:
            return "-"
        return f"{counts['min']:.2f}-{counts['max']:.2f}, mean {counts['mean']:.2f}"
    return " · ".join(f"{name} {n:,}" for name, n in counts.items())


def show_shard_result(result: ShardResult, config: ShardConfig) -> None:
    """The per-client table, the notes, and where the shards went."""
    from rich.table import Table

    k = result.clients
    title = f"fedlora shard: {result.task}, {result.mode}, {k} clients, seed {config.seed}"
    table = Table(title=title, title_justify="left")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    table.add_column("share", justify="right")
    table.add_column("score range" if result.is_regression else "labels")
    if result.client_categories is not None:
        table.add_column(config.category_key)
    rows = list(range(k))
    if k > MAX_ROWS:
        rows = rows[: MAX_ROWS - 5] + [-1] + rows[-5:]
        table.caption = f"{k - MAX_ROWS + 1} clients not shown: all are in summary.json"
    for i in rows:
        if i < 0:
            table.add_row("…", "", "", "", *([""] if result.client_categories is not None else []))
            continue
        cells = [
            str(i + 1),
            f"{result.sizes[i]:,}",
            f"{100 * result.sizes[i] / result.total_train:.1f}%",
            _labels_cell(result.label_counts[i], result.is_regression),
        ]
        if result.client_categories is not None:
            cells.append(", ".join(result.client_categories[i]))
        table.add_row(*cells)
    out = c.console()
    out.print(table)
    for note in result.notes:
        c.print_line(f"note: {note}")
    c.print_line(
        f"{result.total_train:,} examples split in {result.seconds:.3f} s "
        f"(data loaded in {result.load_seconds:.2f} s, written in {result.write_seconds:.2f} s)",
    )
    c.print_line(f"shards: {result.out}")
    if result.plot is not None:
        c.print_line(f"plot: {result.plot}")
