"""One-shot FedAvg of adapters that already exist (`fedlora merge`): read, check, aggregate, write."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli import __version__
from fedlora_cli.aggregation import ClientUpdate, aggregate, normalise_weights
from fedlora_cli.config import LoraSpec, MergeConfig, ModelSpec
from fedlora_cli.errors import InputError
from fedlora_cli.modeling import Adapter, check_adapter_task, head_num_labels, read_adapter, save_adapter
from fedlora_cli.runs import METRICS, RUN_RECORD
from fedlora_cli.runs.record import COMPLETE, FinalMetrics, new_record, now, state_digest
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
    """Training examples of one client, from its `client_<i>.json` (`{"dataset", "indices"}`)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise InputError(f"--shard-manifests {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--shard-manifests {path} is not valid JSON ({e})") from None
    indices = data.get("indices") if isinstance(data, dict) else None
    if not isinstance(indices, list):
        raise InputError(f"--shard-manifests {path} has no 'indices' list: is it a client_<i>.json manifest?")
    if not indices:
        raise InputError(f"--shard-manifests {path} lists zero examples: that client cannot be weighted")
    return len(indices)


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
    out = Path(config.save_adapter).expanduser()
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise InputError(f"--save-adapter {out} already exists: choose another folder or pass --overwrite")
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

    # Clients may have different ranks (svd handles it); the merged adapter's default rank is the largest.
    lora = max((a.lora for a in adapters), key=lambda spec: spec.r)
    updates = [
        ClientUpdate(a.state, scaling=a.lora.scaling, weight=w) for a, w in zip(adapters, raw, strict=True)
    ]
    spec = config.aggregation
    rank = lora.r if spec.method == "naive" else spec.resolved_rank(lora.r)
    alpha = lora.alpha if spec.method == "naive" else spec.resolved_alpha(lora.r)
    try:
        result = aggregate(spec.method, updates, rank=rank, alpha=alpha)
    except ValueError as e:
        raise InputError(f"cannot merge: {e}") from None
    merged_lora = LoraSpec(
        r=result.rank, alpha=result.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )

    if config.model is not None:
        _check_against_model(config.model, config.task, result.state, merged_lora)

    weights = normalise_weights(raw).tolist()
    manifest = {
        # the reference's keys
        "adapters": [str(Path(p)) for p in config.adapters],
        "weights": weights,
        "svd_rank": result.rank,
        "alpha": result.alpha,
        "skip_svd": spec.method == "naive",
        "save_adapter": config.save_adapter,
        # fedlora's
        "aggregation": spec.method,
        "raw_weights": raw,
        "weight_source": source,
        "shard_manifests": list(config.shard_manifests) if config.shard_manifests else None,
        "client_ranks": [a.lora.r for a in adapters],
        "client_alphas": [a.lora.alpha for a in adapters],
        "aggregation_error": result.error,
        "module_errors": result.module_errors,
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
    final = FinalMetrics(command="merge", task=config.task, main_metric=None,
                         metrics={"aggregation_error": result.error}, adapter=str(out),
                         adapter_sha256=state_digest(result.state))  # fmt: skip
    save_adapter(out, result.state, merged_lora, base_model=adapters[0].base_model, meta=meta,
                 extra_json={FUSE_MANIFEST: manifest, RUN_RECORD: record.to_json(), METRICS: final.to_json()})  # fmt: skip
    return MergeResult(out, weights, result.rank, result.alpha, result.error, num_labels, manifest)


def _check_against_model(model: str, task: str | None, state, lora) -> None:
    """Build the base model once and check the merged adapter fits it (shapes, modules, head)."""
    import torch

    from fedlora_cli.modeling import LoraModel, load_base_model

    if task is None:
        raise InputError("--model needs --task too (the head's label count comes from the task)")
    spec = ModelSpec(model)
    base = load_base_model(spec, get_task(task), seed=0)
    LoraModel(base, lora, torch.device("cpu"), base_name=spec.resolved).load_state(state, lora)
