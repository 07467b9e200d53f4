"""`fedlora train`: centralised LoRA fine-tuning on one machine."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import DataSpec, OutputSpec, TrainConfig, TrainSpec


def train(
    task: c.TaskOpt,
    model: c.ModelOpt = None,
    model_size: c.ModelSizeOpt = None,
    data_dir: c.DataDirOpt = None,
    cache_dir: c.CacheDirOpt = None,
    device: c.DeviceOpt = c._MODEL.device,
    max_seq_length: c.MaxSeqLenOpt = c._DATA.max_seq_length,
    max_train_samples: c.MaxTrainOpt = None,
    max_eval_samples: c.MaxEvalOpt = None,
    lora_r: c.LoraROpt = c._LORA.r,
    lora_alpha: c.LoraAlphaOpt = c._LORA.alpha,
    lora_dropout: c.LoraDropoutOpt = c._LORA.dropout,
    target_modules: c.TargetModulesOpt = None,
    epochs: c.EpochsOpt = c._TRAIN.epochs,
    batch_size: c.BatchSizeOpt = c._TRAIN.batch_size,
    learning_rate: c.LearningRateOpt = c._TRAIN.learning_rate,
    weight_decay: c.WeightDecayOpt = c._TRAIN.weight_decay,
    warmup_ratio: c.WarmupOpt = c._TRAIN.warmup_ratio,
    max_grad_norm: c.MaxGradNormOpt = c._TRAIN.max_grad_norm,
    precision: c.PrecisionOpt = c._TRAIN.precision,
    seed: c.SeedOpt = c._TRAIN.seed,
    max_tokens: c.MaxTokensOpt = c._TRAIN.max_tokens,
    eval_batch_size: c.EvalBatchSizeOpt = 64,
    do_eval: Annotated[
        bool, typer.Option("--eval/--no-eval", help="evaluate on the dev split(s) at the end")
    ] = True,
    init_adapter: Annotated[
        str | None,
        typer.Option("--init-adapter", help="start from this adapter folder instead of a fresh LoRA"),
    ] = None,
    output_root: c.OutputRootOpt = c._OUT.root,
    run_name: c.RunNameOpt = None,
    output_dir: c.OutputDirOpt = None,
    adapter_output_dir: Annotated[
        str | None,
        typer.Option("--adapter-output-dir", help="write the adapter here \\[default: <run>/adapter]"),
    ] = None,
    overwrite: c.OverwriteOpt = False,
    log_every: c.LogEveryOpt = c.DEFAULT_LOG_EVERY,
    report_to: c.ReportToOpt = None,
    do_train: Annotated[
        bool, typer.Option("--train", hidden=True, help="accepted for the reference scripts")
    ] = True,
) -> None:
    """Centralised LoRA: train A/B and the head on the whole training set, evaluate, save a PEFT adapter."""
    config = c.build(
        lambda: TrainConfig(
            data=DataSpec(task, data_dir, max_seq_length, max_train_samples, max_eval_samples),
            model=c.model_spec(model, model_size, cache_dir, device),
            lora=c.lora_spec(lora_r, lora_alpha, lora_dropout, target_modules),
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
            do_eval=do_eval,
            adapter_output_dir=adapter_output_dir,
            init_adapter=init_adapter,
        )
    )
    from fedlora_cli.centralised import run_train

    with c.reporter(log_every=log_every, report_to=report_to) as progress:
        result = run_train(config, progress=progress, argv=c.argv())
    c.show_run_result("train", result)
