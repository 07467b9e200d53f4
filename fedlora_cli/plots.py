"""Figures of a shard split; matplotlib is an optional extra, imported only when a plot is asked for."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from fedlora_cli.atomic import write_bytes
from fedlora_cli.errors import InputError
from fedlora_cli.ownership import PLOT_TITLE

INSTALL_HINT = "--plot needs matplotlib: pip install 'fedlora[plot]'"


def require_matplotlib() -> None:
    """Fail early, before anything is written, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(INSTALL_HINT) from None


def _fields(source: Any) -> tuple[str, str, int, list[dict[str, Any]]]:
    """task, mode, training examples and label counts from a ShardResult or a fedlora summary.json dict."""
    if isinstance(source, dict):
        if "label_counts" not in source:
            raise InputError(
                "this summary.json has no label_counts (not written by fedlora): re-run `fedlora shard`"
            )
        return (
            str(source.get("task")),
            str(source.get("mode")),
            int(source["total_train"]),
            source["label_counts"],
        )
    return source.task, source.mode, source.total_train, source.label_counts


def plot_label_distribution(summary_or_result: Any, path: str | os.PathLike) -> Path:
    """Stacked bars, one per client: height = client size, segments = labels (STS-B: 1-point score bins).

    Written atomically; the format follows the file's suffix (png, pdf, svg). The file's metadata
    carries PLOT_TITLE, by which `--overwrite` later knows the plot is fedlora's to replace.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never pick up an interactive backend
    import matplotlib.pyplot as plt

    task, mode, total_train, counts = _fields(summary_or_result)
    # regression summaries carry {min, max, mean, histogram}; classification ones {label: count}
    rows = [c.get("histogram", c) for c in counts]
    names = list(rows[0]) if rows else []
    k = len(rows)
    x = list(range(1, k + 1))
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * k, 24), 4.5), constrained_layout=True)
    bottom = [0] * k
    for name in names:
        heights = [r.get(name, 0) for r in rows]
        ax.bar(x, heights, bottom=bottom, label=name, width=0.85 if k > 1 else 0.5)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    # The same count as the table's "N examples split" (overlap modes give clients more in total), on two
    # lines so that a narrow figure never clips it.
    ax.set_title(
        f"{task}: {mode} split\n{total_train:,} training examples, {k} client{'' if k == 1 else 's'}"
    )
    if k <= 30:
        ax.set_xticks(x)
    ax.legend(title="score" if rows and "histogram" in counts[0] else "label", fontsize="small")
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120, metadata={"Title": PLOT_TITLE})
    plt.close(fig)
    return write_bytes(Path(path).expanduser(), buf.getvalue())
