"""Figures (a shard split, learning curves, per-client results); matplotlib is an optional extra, imported
only when a plot is asked for."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Curve:
    """One line of a learning-curve figure: a run, or a sweep cell's mean over seeds (std: the band)."""

    label: str
    rounds: list[int] = field(default_factory=list)
    metric: list[float | None] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    metric_std: list[float | None] | None = None
    loss_std: list[float | None] | None = None
    final: float | None = None  # a run without rounds (train, baseline): its final metric, drawn flat
    final_std: float | None = None
    error: list[float | None] = field(default_factory=list)  # the aggregation error per round, if known
    error_std: list[float | None] | None = None


def _band(
    ax: Any,
    xs: list[int],
    mean: list[float | None],
    std: list[float | None] | None,
    label: str,
    color: Any = None,
) -> None:
    points = [
        (x, m, (std[i] if std else None))
        for i, (x, m) in enumerate(zip(xs, mean, strict=True))
        if m is not None
    ]
    if not points:
        return
    x = [p[0] for p in points]
    y = [p[1] for p in points]
    (line,) = ax.plot(x, y, marker="o", markersize=3, label=label, color=color)
    if std and any(p[2] for p in points):
        lo = [p[1] - (p[2] or 0.0) for p in points]
        hi = [p[1] + (p[2] or 0.0) for p in points]
        ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())


LEGEND_INSIDE = 6  # curves whose legend fits inside the metric's axes
LEGEND_COLUMNS = 3


def plot_curves(curves: list[Curve], path: str | os.PathLike, *, metric: str, title: str) -> Path:
    """The metric (left), the training loss and, where curves carry it, the aggregation error per round of
    every curve, on one figure: what a method's approximation costs, beside what it reaches.

    Runs without rounds (centralised `train`) are drawn as a dashed horizontal line at their final
    metric, with their band over seeds if any: the reference the federated curves are read against.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = len(curves)
    below = labels > LEGEND_INSIDE  # many curves: the legend goes under the axes, in columns
    rows = -(-labels // LEGEND_COLUMNS) if below else 0
    errors = any(any(e is not None for e in c.error) for c in curves)
    panels = 3 if errors else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2 + 0.22 * rows), constrained_layout=True)
    left, right = axes[0], axes[1]
    if labels > 10:  # matplotlib's default cycle repeats after 10 colours
        pairs = plt.get_cmap("tab20").colors  # dark/light pairs: the ten dark hues first, then the light
        palette = [*pairs[0::2], *pairs[1::2]]
    else:
        palette = plt.get_cmap("tab10").colors
    # each curve its own colour, the same in every panel (a flat reference is drawn on the left only)
    for i, curve in enumerate(curves):
        color = palette[i % len(palette)]
        if curve.rounds:
            _band(left, curve.rounds, curve.metric, curve.metric_std, curve.label, color)
            _band(right, curve.rounds, curve.loss, curve.loss_std, curve.label, color)
            if errors:
                error = curve.error or [None] * len(curve.rounds)
                _band(axes[2], curve.rounds, error, curve.error_std, curve.label, color)
            continue
        if curve.final is not None:
            line = left.axhline(curve.final, linestyle="--", label=f"{curve.label} (final)", color=color)
            if curve.final_std:
                left.axhspan(
                    curve.final - curve.final_std,
                    curve.final + curve.final_std,
                    alpha=0.15,
                    color=line.get_color(),
                )
    left.set_xlabel("round")
    left.set_ylabel(metric)
    left.set_title(f"{metric} per round")
    right.set_xlabel("round")
    right.set_ylabel("train loss")
    right.set_title("training loss per round")
    if errors:
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("‖ΔW_agg − Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖")
        axes[2].set_title("aggregation error per round")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves and below:
        fig.legend(
            *left.get_legend_handles_labels(),
            loc="outside lower center",
            ncol=LEGEND_COLUMNS,
            fontsize="small",
        )
    elif curves:
        left.legend(fontsize="small")
    fig.suptitle(title)
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    return write_bytes(Path(path).expanduser(), buf.getvalue())


def plot_client_distribution(
    groups: list[tuple[str, list[float]]], path: str | os.PathLike, *, metric: str, title: str
) -> Path:
    """One box per run (or method) of its clients' metric, every client drawn as a point over it (jittered
    sideways, seeded), the mean as a diamond: where the clients lie, and how far the worst are from the
    rest."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = len(groups)
    fig, ax = plt.subplots(figsize=(min(3 + 1.3 * k, 20), 4.5), constrained_layout=True)
    positions = list(range(1, k + 1))
    values = [list(v) for _, v in groups]
    drawn = [(p, v) for p, v in zip(positions, values, strict=True) if v]
    if drawn:
        ax.boxplot([v for _, v in drawn], positions=[p for p, _ in drawn], widths=0.55, showfliers=False)
    rng = np.random.default_rng(0)
    for p, v in drawn:
        ax.scatter(p + rng.uniform(-0.15, 0.15, len(v)), v, s=14, alpha=0.6, zorder=3)
        ax.scatter([p], [float(np.mean(v))], marker="D", color="black", s=28, zorder=4)
    ax.set_xticks(positions)
    ax.set_xticklabels(
        [name for name, _ in groups], rotation=20 if k > 4 else 0, ha="right" if k > 4 else "center"
    )
    ax.set_ylabel(f"{metric} on the client's local test split")
    ax.set_title(f"{title}: one point per client (◆ mean)")
    ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    return write_bytes(Path(path).expanduser(), buf.getvalue())
