"""The one core call of `fedlora shard`: claim the output, load the train split, partition, write, plot."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora_cli import ownership
from fedlora_cli.config import ShardConfig
from fedlora_cli.data import load_split
from fedlora_cli.sharding.manifest import check_out_dir, write_shard_set
from fedlora_cli.sharding.partition import plan_shards, shard_set
from fedlora_cli.tasks import get_task


@dataclass(frozen=True)
class ShardResult:
    """What `run_shard` did: per-client sizes and label mixes, timing, and where it wrote."""

    out: Path
    task: str
    mode: str
    total_train: int
    sizes: list[int]
    label_counts: list[dict[str, Any]]  # per client {label: count}; STS-B {min, max, mean, histogram}
    notes: list[str]
    params: dict[str, Any]
    client_categories: list[list[str]] | None
    is_regression: bool
    train_fingerprint: str
    data_source: str
    seconds: float  # the partitioning itself
    load_seconds: float  # reading the train split
    write_seconds: float  # manifests (and plot)
    plot: Path | None = None

    @property
    def clients(self) -> int:
        return len(self.sizes)


def run_shard(config: ShardConfig, progress: Any = None) -> ShardResult:
    """Load the train split's labels, split them in memory, write the manifests (and the plot)."""
    from fedlora_cli.progress import NullProgress

    progress = progress or NullProgress()
    out = check_out_dir(config.out_dir, config.overwrite)  # fail before reading any data
    plot_path = None
    if config.plot:
        from fedlora_cli.plots import require_matplotlib

        require_matplotlib()
        plot_path = ownership.claim(
            Path(config.plot).expanduser().resolve(),
            ownership.PLOT,
            overwrite=config.overwrite,
            option="--plot",
        )
    glue = get_task(config.task)

    t0 = time.perf_counter()
    raw = load_split(
        glue,
        "train",
        data_dir=config.data_dir,
        cache_dir=config.cache_dir,
        max_samples=config.max_train_samples,
    )
    load_seconds = time.perf_counter() - t0
    progress.log(f"{glue.name}: {len(raw):,} training examples from {raw.source}")

    t1 = time.perf_counter()
    plan = plan_shards(raw, config)
    seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    shards = shard_set(raw, config, plan)
    summary = shards.summary or {}
    if plot_path is not None and plot_path.parent == out:
        # a plot drawn into the shard folder is part of it (ownership.shards_foreign)
        shards = replace(shards, summary={**summary, "plot": plot_path.name})
    write_shard_set(out, shards, overwrite=config.overwrite)
    result = ShardResult(
        out=out,
        task=glue.name,
        mode=config.mode,
        total_train=len(raw),
        sizes=plan.sizes,
        label_counts=summary["label_counts"],
        notes=plan.notes,
        params=plan.params,
        client_categories=plan.client_categories,
        is_regression=glue.is_regression,
        train_fingerprint=summary["train_fingerprint"],
        data_source=raw.source,
        seconds=seconds,
        load_seconds=load_seconds,
        write_seconds=0.0,
    )
    plot = None
    if plot_path is not None:
        from fedlora_cli.plots import plot_label_distribution

        plot = plot_label_distribution(result, plot_path)
    return replace(result, write_seconds=time.perf_counter() - t2, plot=plot)
