"""`fedlora baseline`: full fine-tuning, or zero-shot evaluation with --no-train."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import BaselineConfig, DataSpec, OutputSpec, TrainSpec

_BASE_TRAIN = BaselineConfig(data=c._DATA).train  # full fine-tuning wants a smaller learning rate than LoRA


def baseline(
    task: c.TaskOpt,
    model: c.ModelOpt = None,
    model_size: c.ModelSizeOpt = None,
    data_dir: c.DataDirOpt = None,
    cache_dir: c.CacheDirOpt = None,
    device: c.DeviceOpt = c._MODEL.device,
    max_seq_length: c.MaxSeqLenOpt = c._DATA.max_seq_length,
    max_train_samples: c.MaxTrainOpt = None,
    max_eval_samples: c.MaxEvalOpt = None,
    do_train: Annotated[
        bool,
        typer.Option("--train/--no-train", help="full fine-tuning, or only evaluate the untrained model"),
    ] = True,
    epochs: c.EpochsOpt = _BASE_TRAIN.epochs,
    batch_size: c.BatchSizeOpt = _BASE_TRAIN.batch_size,
    learning_rate: c.LearningRateOpt = _BASE_TRAIN.learning_rate,
    weight_decay: c.WeightDecayOpt = _BASE_TRAIN.weight_decay,
    warmup_ratio: c.WarmupOpt = _BASE_TRAIN.warmup_ratio,
    max_grad_norm: c.MaxGradNormOpt = _BASE_TRAIN.max_grad_norm,
    precision: c.PrecisionOpt = _BASE_TRAIN.precision,
    seed: c.SeedOpt = _BASE_TRAIN.seed,
    max_tokens: c.MaxTokensOpt = _BASE_TRAIN.max_tokens,
    eval_batch_size: c.EvalBatchSizeOpt = 64,
    save_model: Annotated[
        bool, typer.Option("--save-model", help="also write the fine-tuned weights (large) to <run>/model")
    ] = False,
    output_root: c.OutputRootOpt = c._OUT.root,
    run_name: c.RunNameOpt = None,
    output_dir: c.OutputDirOpt = None,
    overwrite: c.OverwriteOpt = False,
    log_every: c.LogEveryOpt = c.DEFAULT_LOG_EVERY,
    report_to: c.ReportToOpt = None,
    do_eval: Annotated[
        bool, typer.Option("--eval", hidden=True, help="accepted for the reference scripts")
    ] = True,
) -> None:
    """Full fine-tuning of every weight (the upper reference), or `--no-train` zero-shot evaluation."""
    config = c.build(
        lambda: BaselineConfig(
            data=DataSpec(task, data_dir, max_seq_length, max_train_samples, max_eval_samples),
            model=c.model_spec(model, model_size, cache_dir, device),
            train=TrainSpec(
                epochs,
                batch_size,
                learning_rate,
                weight_decay,
                warmup_ratio,
                max_grad_norm,
                precision,
                seed,
                max_tokens=max_tokens,
            ),
            output=OutputSpec(output_root, run_name, output_dir, overwrite),
            eval_batch_size=eval_batch_size,
            do_train=do_train,
            save_model=save_model,
        )
    )
    from fedlora_cli.centralised import run_baseline

    with c.reporter(log_every=log_every, report_to=report_to) as progress:
        result = run_baseline(config, progress=progress, argv=c.argv())
    c.show_run_result("baseline", result)
