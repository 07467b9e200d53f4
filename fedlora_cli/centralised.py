"""Single-machine workflows: centralised LoRA (`train`), full fine-tuning / zero-shot (`baseline`), `eval`."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import __version__, atomic, ownership
from fedlora_cli.config import BaselineConfig, EvalConfig, LoraSpec, ModelSpec, TrainConfig
from fedlora_cli.errors import Interrupted
from fedlora_cli.evaluation import EvalResult, evaluate
from fedlora_cli.features import TaskData, load_task_data, steps_per_epoch
from fedlora_cli.modeling import (
    LoraModel,
    check_adapter_task,
    check_model_limits,
    count_parameters,
    load_base_model,
    load_tokenizer,
    read_adapter,
    resolve_device,
    resolve_precision,
    save_adapter,
)
from fedlora_cli.progress import NullProgress, Progress
from fedlora_cli.runlock import RunLock
from fedlora_cli.runs import (
    METRICS,
    RUN_ENTRIES,
    RUN_OPTION,
    claim_run_dir,
    run_path,
    run_record,
    write_record,
)
from fedlora_cli.training import TrainResult, planned_steps, train_model


@dataclass(frozen=True)
class RunResult:
    """What a single-machine command produced; the CLI renders it."""

    task: str
    run_dir: Path | None
    metrics: dict[str, float]
    evaluation: EvalResult | None
    training: TrainResult | None = None
    adapter_dir: Path | None = None
    trainable_params: int = 0
    total_params: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    precision: str = "fp32"
    device: str = "cpu"


def _train_and_eval_metrics(training: TrainResult | None, evaluation: EvalResult | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if training is not None:
        out["train"] = {
            "loss": training.loss,
            "last_loss": training.last_loss,
            "steps": training.steps,
            "examples": training.examples,
            "seconds": training.seconds,
            "samples_per_second": training.samples_per_second,
            "tokens_per_second": training.tokens_per_second,
            "padded_tokens_per_second": training.padded_tokens_per_second,
            "real_tokens": training.real_tokens,
            "padded_tokens": training.padded_tokens,
            "precision": training.precision,
            "peak_memory_mb": training.peak_memory_mb,
        }
    if evaluation is not None:
        out["eval"] = {
            **evaluation.metrics,
            "per_split": evaluation.per_split,
            "examples": evaluation.examples,
            "seconds": evaluation.seconds,
            "samples_per_second": evaluation.samples_per_second,
        }
    return out


class _RunFolder:
    """Claims a run folder; if the run fails, removes what it wrote (nothing half-written stays).

    The caller holds the folder's RunLock, which creates the folder and removes it again when it stays empty.
    """

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path = path
        claim_run_dir(path, overwrite=overwrite)  # empty now, whether new or overwritten

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, *rest: object) -> None:
        if exc_type is None:
            return
        with contextlib.suppress(OSError):  # a read-only or vanished folder: nothing more to undo
            for name in RUN_ENTRIES:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            atomic.remove_stale_temporaries(self.path)
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C or SIGTERM
            raise Interrupted(
                f"interrupted: the unfinished run {self.path} was removed; nothing else changed"
            )


def _write_record(run_dir: Path, command: str, config, argv, data: TaskData, device, precision: str) -> None:
    record = run_record(
        command=command,
        config=config,
        argv=argv,
        seeds={"seed": config.train.seed},
        extra={
            "data_fingerprints": data.fingerprints,
            "sizes": data.sizes,
            "device": str(device),
            "precision": precision,
        },  # fmt: skip
    )
    write_record(run_dir, record)


def load_model_and_data(
    model_spec: ModelSpec,
    data_spec,
    seed: int,
    *,
    train: bool,
    progress: Progress,
    lora: LoraSpec | None = None,
) -> tuple[Any, TaskData, Any]:
    """The pieces every workflow starts from: base model (seeded head), tokenizer, tokenized splits.

    The model comes first so that the options it bounds (`--max-seq-length`, the LoRA rank) are
    checked before any data is read or tokenized.
    """
    task = data_spec.glue_task
    tokenizer = load_tokenizer(model_spec)
    base = load_base_model(model_spec, task, seed)
    check_model_limits(base, data_spec, lora)
    data = load_task_data(
        data_spec, tokenizer, train=train, hub_cache_dir=model_spec.cache_dir, progress=progress
    )
    return base, data, tokenizer


def _claim_outputs(config: TrainConfig | BaselineConfig, out: Path) -> Path | None:
    """Check where the run (and a separate adapter folder) will go, before any work; see ownership.py."""
    ownership.claim(out, ownership.RUN, overwrite=config.output.overwrite, option=RUN_OPTION)
    adapter_dir = getattr(config, "adapter_output_dir", None)
    if adapter_dir is None:
        return None
    return ownership.claim(
        adapter_dir, ownership.ADAPTER, overwrite=config.output.overwrite, option="--adapter-output-dir"
    )


def run_train(
    config: TrainConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RunResult:
    """Centralised LoRA: train the adapter (A/B and the head) on the whole training split, evaluate, save."""
    progress = progress or NullProgress()
    task = config.data.glue_task
    out = run_path(config.output, task.name, config.model.short_name, prefix="train-")
    external_adapter = _claim_outputs(config, out)
    with RunLock(out, "train"):  # before any work: a second process on this folder stops here
        return _train(config, out, external_adapter, progress, argv)


def _train(
    config: TrainConfig, out: Path, external_adapter: Path | None, progress: Progress, argv
) -> RunResult:
    task = config.data.glue_task
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.train.precision, device)
    init = read_adapter(config.init_adapter) if config.init_adapter else None
    if init is not None and (note := check_adapter_task(init, task, config.init_adapter)):
        progress.log(note)
    lora_spec = init.lora if init is not None else config.lora
    base, data, _ = load_model_and_data(
        config.model, config.data, config.train.seed, train=True, progress=progress, lora=lora_spec
    )
    planned_steps(len(data.train), config.train)
    model = LoraModel(base, lora_spec, device, base_name=config.model.resolved)
    if init is not None:
        model.load_state(init.state, init.lora)
    trainable, total = count_parameters(model.module)
    progress.log(
        f"{task.name}: {len(data.train):,} training examples, "
        f"{steps_per_epoch(len(data.train), config.train.batch_size)} steps/epoch; LoRA r={lora_spec.r} alpha={lora_spec.alpha:g} on {','.join(lora_spec.target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters; {device.type}, {precision}"
    )
    with _RunFolder(out, config.output.overwrite) as run_dir:
        _write_record(run_dir, "train", config, argv, data, device, precision)
        training = train_model(
            model.module, data.train, config.train, device=device, precision=precision,
            seed=config.train.seed, progress=progress, description="training",
        )  # fmt: skip
        evaluation = (
            evaluate(model.module, task, data.evals, config.eval_batch_size, device, precision)
            if config.do_eval
            else None
        )
        adapter_dir = external_adapter or run_dir / "adapter"
        metrics = _train_and_eval_metrics(training, evaluation)
        metrics["adapter"] = str(adapter_dir)
        atomic.write_json(run_dir / METRICS, metrics)
        # Last: once an adapter outside the run folder is written, nothing can fail and remove the run.
        meta = {"task": task.name, "label_names": list(task.label_names), "origin": "train"}
        save_adapter(adapter_dir, model.state(), lora_spec, base_model=config.model.resolved, meta=meta,
                     option="--adapter-output-dir")  # fmt: skip
    return RunResult(
        task=task.name,
        run_dir=run_dir,
        metrics=evaluation.metrics if evaluation else {},
        evaluation=evaluation,
        training=training,
        adapter_dir=adapter_dir,
        trainable_params=trainable,
        total_params=total,
        sizes=data.sizes,
        precision=precision,
        device=str(device),
    )


def run_baseline(
    config: BaselineConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RunResult:
    """Full fine-tuning of every weight (the upper reference point), or zero-shot evaluation."""
    progress = progress or NullProgress()
    task = config.data.glue_task
    out = run_path(config.output, task.name, config.model.short_name, prefix="baseline-")
    _claim_outputs(config, out)
    with RunLock(out, "baseline"):  # before any work: a second process on this folder stops here
        return _baseline(config, out, progress, argv)


def _baseline(config: BaselineConfig, out: Path, progress: Progress, argv) -> RunResult:
    task = config.data.glue_task
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.train.precision, device)
    base, data, tokenizer = load_model_and_data(
        config.model, config.data, config.train.seed, train=config.do_train, progress=progress
    )
    if config.do_train:
        planned_steps(len(data.train), config.train)
    base.to(device)
    trainable, total = count_parameters(base)
    mode = "full fine-tuning" if config.do_train else "zero-shot evaluation (untrained head)"
    progress.log(f"{task.name}: {mode}; {total:,} parameters; {device.type}, {precision}")
    with _RunFolder(out, config.output.overwrite) as run_dir:
        _write_record(run_dir, "baseline", config, argv, data, device, precision)
        training = None
        if config.do_train:
            training = train_model(
                base, data.train, config.train, device=device, precision=precision,
                seed=config.train.seed, progress=progress, description="full fine-tuning",
            )  # fmt: skip
        evaluation = evaluate(base, task, data.evals, config.eval_batch_size, device, precision)
        if config.save_model:
            with atomic.staged_dir(run_dir / "model") as tmp:
                base.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
        metrics = _train_and_eval_metrics(training, evaluation)
        atomic.write_json(run_dir / METRICS, metrics)
    return RunResult(
        task=task.name,
        run_dir=run_dir,
        metrics=evaluation.metrics,
        evaluation=evaluation,
        training=training,
        trainable_params=trainable if config.do_train else 0,
        total_params=total,
        sizes=data.sizes,
        precision=precision,
        device=str(device),
    )


def run_eval(config: EvalConfig, *, progress: Progress | None = None) -> RunResult:
    """An adapter (LoRA A/B and its head) on the task's dev split(s); without one, the plain model."""
    progress = progress or NullProgress()
    task = config.data.glue_task
    output_json = None
    if config.output_json:
        output_json = ownership.claim(
            config.output_json, ownership.METRICS_JSON, overwrite=config.overwrite, option="--output-json"
        )
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.precision, device)
    adapter = read_adapter(config.adapter) if config.adapter else None
    if adapter is not None and (note := check_adapter_task(adapter, task, config.adapter)):
        progress.log(note)
    base, data, _ = load_model_and_data(
        config.model, config.data, config.seed, train=False, progress=progress,
        lora=adapter.lora if adapter is not None else None,
    )  # fmt: skip
    if adapter is not None:
        lora = LoraModel(base, adapter.lora, device, base_name=config.model.resolved)
        lora.load_state(adapter.state, adapter.lora)
        model = lora.module
    else:
        model = base.to(device)
    evaluation = evaluate(model, task, data.evals, config.eval_batch_size, device, precision)
    if output_json is not None:
        atomic.write_json(
            output_json,
            {"task": task.name, "adapter": config.adapter, "model": config.model.name, **evaluation.metrics,
             "per_split": evaluation.per_split, "examples": evaluation.examples, "fedlora_version": __version__},
        )  # fmt: skip
    return RunResult(
        task=task.name,
        run_dir=None,
        metrics=evaluation.metrics,
        evaluation=evaluation,
        adapter_dir=Path(config.adapter) if config.adapter else None,
        sizes=data.sizes,
        precision=precision,
        device=str(device),
    )
