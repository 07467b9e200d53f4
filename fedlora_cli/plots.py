"""Figures of a shard split; matplotlib is an optional extra, imported only when a plot is asked for."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from fedlora_cli.atomic import write_bytes
from fedlora_cli.errors import InputError

INSTALL_HINT = "--plot needs matplotlib: pip install 'fedlora[plot]'"


def require_matplotlib() -> None:
    """Fail early, before anything is written, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(INSTALL_HINT) from None


def _fields(source: Any) -> tuple[str, str, list[int], list[dict[str, Any]]]:
    """task, mode, sizes and label counts from a ShardResult or a fedlora summary.json dict."""
    if isinstance(source, dict):
        if "label_counts" not in source:
            raise InputError(
                "this summary.json has no label_counts (not written by fedlora): re-run `fedlora shard`"
            )
        return (
            str(source.get("task")),
            str(source.get("mode")),
            list(source["size_per_client"]),
            source["label_counts"],
        )
    return source.task, source.mode, list(source.sizes), source.label_counts


def plot_label_distribution(summary_or_result: Any, path: str | os.PathLike) -> Path:
    """Stacked bars, one per client: height = client size, segments = labels (STS-B: 1-point score bins).

    Written atomically; the format follows the file's suffix (png, pdf, svg).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never pick up an interactive backend
    import matplotlib.pyplot as plt

    task, mode, sizes, counts = _fields(summary_or_result)
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
    ax.set_title(f"{task}: {mode} split into {k} clients ({sum(sizes):,} examples)")
    if k <= 30:
        ax.set_xticks(x)
    ax.legend(title="score" if rows and "histogram" in counts[0] else "label", fontsize="small")
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    return write_bytes(Path(path).expanduser(), buf.getvalue())
