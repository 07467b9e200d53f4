"""Single-machine workflows: centralised LoRA (`train`), full fine-tuning / zero-shot (`baseline`), `eval`."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import __version__, atomic, ownership
from fedlora_cli.config import BaselineConfig, EvalConfig, TrainConfig
from fedlora_cli.errors import InputError, Interrupted
from fedlora_cli.evaluation import (
    EvalResult,
    evaluate,
    majority_metrics,
    predict,
    predictions_file,
    predictions_tsv,
    to_predictions,
)
from fedlora_cli.features import TaskData, load_test_splits, steps_per_epoch
from fedlora_cli.modeling import LoraModel, count_parameters, resolve_device, resolve_precision, save_adapter
from fedlora_cli.preamble import Start, load_model_and_data
from fedlora_cli.progress import NullProgress, Progress, as_tracker
from fedlora_cli.runlock import RunLock
from fedlora_cli.runs import (
    COMPLETE,
    METRICS,
    RUN_ENTRIES,
    RUN_OPTION,
    RUN_RECORD,
    TRACKER_DIRS,
    claim_run_dir,
    final_metrics,
    new_record,
    now,
    run_path,
    run_session,
    write_metrics,
    write_record,
)
from fedlora_cli.selection import Selection
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


def train_stats(training: TrainResult) -> dict[str, Any]:
    """The training statistics every final-metrics record carries."""
    return {
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


class _RunFolder:
    """Claims a run folder; if the run fails, removes its partial outputs and keeps run.json to say why.

    run.json (with status `failed` or `interrupted`, set by run_session) stays, with any tracker logs: the run
    shows up in `fedlora runs list`, and the same folder can be used again without --overwrite.
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
            for name in RUN_ENTRIES - {RUN_RECORD, *TRACKER_DIRS}:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            atomic.remove_stale_temporaries(self.path)
            if self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()


def _start_record(
    run_dir: Path, command: str, config, argv, data: TaskData, device, precision: str, progress: Progress
) -> None:
    """Write run.json (status running) and tell the trackers the run has begun."""
    record = new_record(
        command=command,
        config=config,
        argv=argv,
        seeds={"seed": config.train.seed},
        extra={
            "data_fingerprints": data.fingerprints,
            "sizes": data.sizes,
            "device": str(device),
            "precision": precision,
            **({"validation": data.holdout.record()} if data.holdout is not None else {}),
        },
    )
    write_record(run_dir, record)
    tracker = as_tracker(progress)
    tracker.start_run(run_dir, run_dir.name)
    tracker.log_params({"command": command, **record.config})


def _interrupted(run_dir: Path) -> Interrupted:
    return Interrupted(
        f"interrupted: {run_dir} is marked interrupted; run the same command again to "
        f"start it over (the folder is reused), or see `fedlora runs list`"
    )


def _claim_outputs(config: TrainConfig | BaselineConfig, out: Path) -> Path | None:
    """Check where the run (and a separate adapter folder) will go, before any work; see ownership.py."""
    if not (out.is_dir() and _dead_run(out)):
        ownership.claim(out, ownership.RUN, overwrite=config.output.overwrite, option=RUN_OPTION)
    adapter_dir = getattr(config, "adapter_output_dir", None)
    if adapter_dir is None:
        return None
    return ownership.claim(
        adapter_dir, ownership.ADAPTER, overwrite=config.output.overwrite, option="--adapter-output-dir"
    )


def _dead_run(path: Path) -> bool:
    from fedlora_cli.runs import _is_dead_run

    return _is_dead_run(path)


def _report_final(tracker, step: int, final, adapter_dir: Path | None) -> None:
    metrics = {f"eval/{k}": v for k, v in final.metrics.items() if isinstance(v, int | float)}
    if final.eval and final.eval.get("loss") is not None:
        metrics["eval/loss"] = final.eval["loss"]
    if metrics:
        tracker.log_metrics(step, metrics)
    if adapter_dir is not None:
        tracker.log_artifact(adapter_dir, "adapter")


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


@dataclass
class Kept:
    """One epoch's adapter state and scores, kept in memory while it is the best on validation."""

    epoch: int
    state: dict[str, Any]
    dev: EvalResult
    validation: EvalResult | None


class EpochWatch:
    """`train --select best / --early-stop`: scores every epoch on the validation split (chooses) and the dev
    split (reported), keeps the best epoch's adapter, and says when to stop. Without them, one evaluation
    at the end scores both splits."""

    def __init__(self, config: TrainConfig, model: Any, data: TaskData, device: Any, precision: str) -> None:
        self.config, self.model, self.data, self.device, self.precision = (
            config,
            model,
            data,
            device,
            precision,
        )
        self.selection = Selection(config.select, config.data.glue_task.main_metric, config.early_stop)
        self.every_epoch = config.select == "best" or config.early_stop is not None
        self.best: Kept | None = None
        self.epochs: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.last: tuple[EvalResult, EvalResult | None] | None = None

    def scores(self) -> tuple[EvalResult, EvalResult | None]:
        task, c = self.config.data.glue_task, self.config
        dev = evaluate(
            self.model.module, task, self.data.evals, c.eval_batch_size, self.device, self.precision
        )
        held = self.data.validation_splits
        val = (
            evaluate(self.model.module, task, held, c.eval_batch_size, self.device, self.precision)
            if held
            else None
        )
        return dev, val

    def on_epoch(self, epoch: int) -> bool:
        dev, val = self.scores()
        self.last = (dev, val)
        self.selection.observe(epoch, val.metrics if val is not None else None)
        self.epochs.append({"epoch": epoch, "dev": dev.metrics, "validation": val.metrics if val else None})
        if self.config.select == "best" and self.selection.best_step == epoch:
            state = {k: v.detach().clone() for k, v in self.model.state().items()}
            self.best = Kept(epoch, state, dev, val)
        if self.selection.stop:
            sel = self.selection
            self.stopped = (
                f"--early-stop {sel.patience}: no better validation {sel.metric} for {sel.since_best} "
                f"epochs after epoch {sel.best_step}; stopped after epoch {epoch}"
            )
        return self.selection.stop

    def final(self) -> tuple[EvalResult, EvalResult | None]:
        """The last state's scores (already taken when the last epoch was watched)."""
        return self.last if self.last is not None else self.scores()

    def record(self, validation: EvalResult | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "validation": validation.metrics if validation is not None else None,
            "majority": majority_metrics(self.config.data.glue_task, self.data.evals),
        }
        if self.every_epoch:
            chosen = self.selection.chosen
            out["selected"] = {"rule": self.config.select, "metric": self.selection.metric, "epoch": chosen}
            out["epochs"] = self.epochs
        if self.stopped:
            out["stopped"] = self.stopped
        return out


def _train(
    config: TrainConfig, out: Path, external_adapter: Path | None, progress: Progress, argv
) -> RunResult:
    task = config.data.glue_task
    start = Start.resolve(config.model, config.train.precision, config.init_adapter, task, progress)
    device, precision, lora_spec = start.device, start.precision, start.lora(config.lora)
    model, data = start.build(config.model, config.data, config.train.seed, lora_spec, progress=progress)
    n_train = len(data.train_indices)
    planned_steps(n_train, config.train)
    trainable, total = count_parameters(model.module)
    held = f" ({len(data.holdout.validation):,} held out for validation)" if data.holdout is not None else ""
    progress.log(
        f"{task.name}: {n_train:,} training examples{held}, "
        f"{steps_per_epoch(n_train, config.train.batch_size)} steps/epoch; LoRA r={lora_spec.r} "
        f"alpha={lora_spec.alpha:g} on {','.join(lora_spec.target_modules)}: {trainable:,} trainable of "
        f"{total:,} parameters; {device.type}, {precision}"
    )
    tracker = as_tracker(progress)
    watch = EpochWatch(config, model, data, device, precision)
    try:
        with _RunFolder(out, config.output.overwrite) as run_dir:
            _start_record(run_dir, "train", config, argv, data, device, precision, progress)
            with run_session(run_dir):
                training = train_model(
                    model.module,
                    data.train,
                    config.train,
                    device=device,
                    precision=precision,
                    seed=config.train.seed,
                    progress=progress,
                    description="training",
                    indices=data.train_indices,
                    on_epoch=watch.on_epoch if watch.every_epoch else None,
                )
                if watch.stopped:
                    progress.log(watch.stopped)
                evaluation, validation = watch.final() if config.do_eval else (None, None)
                adapter_dir = external_adapter or run_dir / "adapter"
                meta = {"task": task.name, "label_names": list(task.label_names), "origin": "train"}
                save_adapter(
                    adapter_dir,
                    model.state(),
                    lora_spec,
                    base_model=config.model.resolved,
                    meta=meta,
                    option="--adapter-output-dir",
                )
                reported = adapter_dir
                if watch.best is not None:  # --select best: the chosen epoch's adapter beside the last one
                    reported = run_dir / "best" / "adapter"
                    save_adapter(
                        reported,
                        watch.best.state,
                        lora_spec,
                        base_model=config.model.resolved,
                        meta={**meta, "epoch": watch.best.epoch},
                    )
                    evaluation, validation = watch.best.dev, watch.best.validation
                final = final_metrics(
                    "train",
                    task,
                    evaluation,
                    train=train_stats(training),
                    adapter=reported,
                    extra=watch.record(validation),
                )
                write_metrics(run_dir / METRICS, final)
                _report_final(tracker, training.steps, final, reported)
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    return RunResult(
        task=task.name,
        run_dir=run_dir,
        metrics=evaluation.metrics if evaluation else {},
        evaluation=evaluation,
        training=training,
        adapter_dir=reported,
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
        planned_steps(len(data.train_indices), config.train)
    base.to(device)
    trainable, total = count_parameters(base)
    mode = "full fine-tuning" if config.do_train else "zero-shot evaluation (untrained head)"
    progress.log(f"{task.name}: {mode}; {total:,} parameters; {device.type}, {precision}")
    tracker = as_tracker(progress)
    try:
        with _RunFolder(out, config.output.overwrite) as run_dir:
            _start_record(run_dir, "baseline", config, argv, data, device, precision, progress)
            with run_session(run_dir):
                training = None
                if config.do_train:
                    training = train_model(
                        base,
                        data.train,
                        config.train,
                        device=device,
                        precision=precision,
                        seed=config.train.seed,
                        progress=progress,
                        description="full fine-tuning",
                        indices=data.train_indices,
                    )
                evaluation = evaluate(base, task, data.evals, config.eval_batch_size, device, precision)
                held = data.validation_splits
                validation = (
                    evaluate(base, task, held, config.eval_batch_size, device, precision) if held else None
                )
                if config.save_model:
                    with atomic.staged_dir(run_dir / "model") as tmp:
                        base.save_pretrained(str(tmp))
                        tokenizer.save_pretrained(str(tmp))
                        atomic.honour_umask(tmp)  # model.safetensors comes 0600 from save_pretrained
                stats = train_stats(training) if training is not None else None
                extra = {
                    "validation": validation.metrics if validation is not None else None,
                    "majority": majority_metrics(task, data.evals),
                }
                final = final_metrics("baseline", task, evaluation, train=stats, extra=extra)
                write_metrics(run_dir / METRICS, final)
                _report_final(tracker, training.steps if training else 0, final, None)
    except KeyboardInterrupt:
        raise _interrupted(out) from None
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


def _prediction_targets(config: EvalConfig) -> dict[str, Path]:
    """split -> file; checked before any work, so an existing file is never replaced."""
    task = config.data.glue_task
    folder = Path(config.predictions).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--predictions {folder} is a file: give a folder (one file per split goes in it)")
    targets = {
        split: folder / predictions_file(task, split) for split in (*task.eval_splits, *task.test_splits)
    }
    existing = [p for p in targets.values() if p.exists()]
    if existing:
        raise InputError(f"{existing[0]} already exists: choose another --predictions folder")
    return targets


def _write_predictions(
    model,
    task,
    config: EvalConfig,
    data: TaskData,
    evaluation: EvalResult,
    tokenizer,
    targets: dict[str, Path],
    device,
    precision: str,
    progress: Progress,
) -> list[str]:
    """Dev predictions (with labels) from the evaluation just made; test predictions computed here."""
    written = []
    for split, preds in evaluation.predictions.items():
        text = predictions_tsv(task, preds, data.evals[split].labels)
        written.append(str(atomic.write_text(targets[split], text)))
    tests, missing = load_test_splits(
        config.data, tokenizer, hub_cache_dir=config.model.cache_dir, progress=progress
    )
    for split, split_data in tests.items():
        logits, _, _ = predict(model, split_data, config.eval_batch_size, device, precision)
        text = predictions_tsv(task, to_predictions(task, logits), None)
        written.append(str(atomic.write_text(targets[split], text)))
    for split in missing:
        name = task.local.files[split]
        progress.log(f"note: no {task.local.folder}/{name} in --data-dir: no predictions for {split}")
    return written


def run_eval(
    config: EvalConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RunResult:
    """An adapter (LoRA A/B and its head) on the task's dev split(s); without one, the plain model.

    `eval` makes no run folder: with `output_json` it writes the final metrics in the shape every
    command shares, with the run record (command line, config, versions) inside; with `predictions`
    it writes per-example predictions of the dev and test splits (see evaluation.predictions_file).
    """
    started = time.monotonic()
    progress = progress or NullProgress()
    task = config.data.glue_task
    targets = _prediction_targets(config) if config.predictions else {}
    output_json = None
    if config.output_json:
        output_json = ownership.claim(
            config.output_json, ownership.METRICS_JSON, overwrite=config.overwrite, option="--output-json"
        )
    start = Start.resolve(config.model, config.precision, config.adapter, task, progress)
    device, precision, adapter = start.device, start.precision, start.adapter
    base, data, tokenizer = load_model_and_data(
        config.model,
        config.data,
        config.seed,
        train=False,
        progress=progress,
        lora=adapter.lora if adapter is not None else None,
    )
    if adapter is not None:
        lora = LoraModel(base, adapter.lora, device, base_name=config.model.resolved)
        lora.load_state(adapter.state, adapter.lora)
        model = lora.module
    else:
        model = base.to(device)
    evaluation = evaluate(model, task, data.evals, config.eval_batch_size, device, precision)
    written: list[str] = []
    if config.predictions:
        written = _write_predictions(
            model, task, config, data, evaluation, tokenizer, targets, device, precision, progress
        )
    if output_json is not None:
        final = final_metrics(
            "eval",
            task,
            evaluation,
            adapter=config.adapter,
            extra={"model": config.model.name, "predictions": written},
        )
        record = new_record(
            command="eval",
            config=config,
            argv=argv,
            seeds={"seed": config.seed},
            extra={
                "data_fingerprints": data.fingerprints,
                "sizes": data.sizes,
                "device": str(device),
                "precision": precision,
            },
        )
        record.status, record.ended = COMPLETE, now()
        record.duration_s = round(time.monotonic() - started, 3)
        atomic.write_json(
            output_json, {**final.to_json(), "fedlora_version": __version__, "record": record.to_json()}
        )
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
