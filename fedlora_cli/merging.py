"""One-shot FedAvg of adapters that already exist (`fedlora merge`): read, check, aggregate, write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli import __version__
from fedlora_cli.aggregation import ClientUpdate, normalise_weights
from fedlora_cli.config import MergeConfig, ModelSpec
from fedlora_cli.errors import InputError
from fedlora_cli.modeling import Adapter, check_adapter_task, head_num_labels, read_adapter, save_adapter
from fedlora_cli.ownership import ADAPTER, claim
from fedlora_cli.runs import METRICS, RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FinalMetrics, new_record, now, state_digest
from fedlora_cli.strategies import build_strategy, get_method
from fedlora_cli.tasks import get_task

FUSE_MANIFEST = "fuse_manifest.json"


@dataclass(frozen=True)
class MergeResult:
    adapter_dir: Path
    weights: list[float]  # normalised
    rank: int
    alpha: float
    error: float
    num_labels: int | None
    manifest: dict[str, Any]


def manifest_examples(path: str) -> int:
    """Training examples of one client, from its `client_<i>.json`, read by the one manifest reader."""
    from fedlora_cli.sharding import read_manifest

    indices = read_manifest(Path(path).expanduser(), option="--shard-manifests").indices
    if indices.size == 0:
        raise InputError(f"--shard-manifests {path} lists zero examples: that client cannot be weighted")
    return int(indices.size)


def _check_compatible(adapters: list[Adapter], paths: tuple[str, ...]) -> None:
    first = adapters[0]
    for path, a in zip(paths[1:], adapters[1:], strict=True):
        if set(a.lora.target_modules) != set(first.lora.target_modules):
            raise InputError(
                f"adapters target different modules: {paths[0]} has {','.join(first.lora.target_modules)}, "
                f"{path} has {','.join(a.lora.target_modules)}"
            )
        if first.base_model and a.base_model and first.base_model != a.base_model:
            raise InputError(
                f"adapters come from different base models: {paths[0]} from {first.base_model}, {path} from "
                f"{a.base_model}"
            )
        n0, n = head_num_labels(first.state), head_num_labels(a.state)
        if n0 != n:
            raise InputError(f"adapters have heads for different label counts: {paths[0]} {n0}, {path} {n}")
        if set(a.state) != set(first.state):
            missing = sorted(set(first.state) ^ set(a.state))[:2]
            raise InputError(f"adapters {paths[0]} and {path} hold different tensors (e.g. {missing})")


def run_merge(config: MergeConfig, *, argv: list[str] | None = None) -> MergeResult:
    """FedAvg of the given adapters with example-count (or explicit, or equal) weights; any label count.

    The output folder is the merged adapter and a run folder at once: run.json and metrics.json go in
    the same atomic step as the weights (a merge is all or nothing).
    """
    started = time.monotonic()
    out = claim(config.save_adapter, ADAPTER, overwrite=config.overwrite, option="--save-adapter")
    adapters = [read_adapter(p) for p in config.adapters]
    _check_compatible(adapters, config.adapters)
    num_labels = head_num_labels(adapters[0].state)
    if config.task is not None:
        check_adapter_task(adapters[0], get_task(config.task), config.adapters[0])
    if config.weights is not None:
        raw, source = list(config.weights), "weights"
    elif config.shard_manifests is not None:
        raw, source = [float(manifest_examples(p)) for p in config.shard_manifests], "shard_manifests"
    else:
        raw, source = [1.0] * len(adapters), "equal"

    # Adapters may have different ranks; the merged adapter's default rank is the largest, at its scaling.
    lora = max((a.lora for a in adapters), key=lambda spec: spec.r)
    updates = [
        ClientUpdate(a.state, scaling=a.lora.scaling, weight=w, name=f"adapter {path}")
        for a, w, path in zip(adapters, raw, config.adapters, strict=True)
    ]
    spec = config.aggregation
    why_not = get_method(spec.method).merge
    if why_not:
        raise InputError(f"--aggregation {spec.method} cannot merge existing adapters: {why_not}")
    try:
        strategy = build_strategy(spec, lora, seed=0)
        outcome = strategy.aggregate(1, None, updates)
        merged = strategy.export(outcome.adapter)
    except ValueError as e:
        raise InputError(f"cannot merge with --aggregation {spec.method}: {e}") from None
    record_agg = outcome.record
    if config.model is not None:
        _check_against_model(config.model, config.task, merged.state, merged.lora)

    weights = normalise_weights(raw).tolist()
    manifest = {
        # the reference's keys
        "adapters": [str(Path(p)) for p in config.adapters],
        "weights": weights,
        "svd_rank": merged.lora.r,
        "alpha": merged.lora.alpha,
        "skip_svd": spec.method == "naive",
        "save_adapter": config.save_adapter,
        # fedlora's
        "aggregation": spec.method,
        "raw_weights": raw,
        "weight_source": source,
        "shard_manifests": list(config.shard_manifests) if config.shard_manifests else None,
        "client_ranks": [a.lora.r for a in adapters],
        "client_alphas": [a.lora.alpha for a in adapters],
        "aggregation_error": record_agg["error"],
        "module_errors": record_agg["module_errors"],
        "aggregation_record": {k: v for k, v in record_agg.items() if k not in ("error", "module_errors")},
        "num_labels": num_labels,
        "task": config.task,
        "base_model": adapters[0].base_model,
        "fedlora_version": __version__,
    }
    meta = {"origin": "merge", "task": config.task, "num_labels": num_labels}
    record = new_record(
        command="merge", config=config, argv=argv, extra={"base_model": adapters[0].base_model}
    )
    record.status, record.ended, record.duration_s = COMPLETE, now(), round(time.monotonic() - started, 3)
    final = FinalMetrics(
        command="merge",
        task=config.task,
        main_metric=None,
        metrics={"aggregation_error": record_agg["error"]},
        adapter=str(out),
        adapter_sha256=state_digest(merged.state),
    )
    save_adapter(
        out,
        merged.state,
        merged.lora,
        base_model=adapters[0].base_model,
        meta=meta,
        option="--save-adapter",
        extra_json={FUSE_MANIFEST: manifest, RUN_RECORD: record.to_json(), METRICS: final.to_json()},
    )
    return MergeResult(
        out, weights, merged.lora.r, merged.lora.alpha, record_agg["error"], num_labels, manifest
    )


def _check_against_model(model: str, task: str | None, state, lora) -> None:
    """Build the base model once and check the merged adapter fits it (shapes, modules, head)."""
    import torch

    from fedlora_cli.modeling import LoraModel, load_base_model

    if task is None:
        raise InputError("--model needs --task too (the head's label count comes from the task)")
    spec = ModelSpec(model)
    base = load_base_model(spec, get_task(task), seed=0)
    LoraModel(base, lora, torch.device("cpu"), base_name=spec.resolved).load_state(state, lora)
