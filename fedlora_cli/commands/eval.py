"""`fedlora eval`: an adapter, or the plain model, on the task's dev split(s)."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import DataSpec, EvalConfig


def eval_command(
    task: c.TaskOpt,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="PEFT adapter folder; without it, the plain model (zero-shot)"),
    ] = None,
    model: c.ModelOpt = None,
    model_size: c.ModelSizeOpt = None,
    data_dir: c.DataDirOpt = None,
    cache_dir: c.CacheDirOpt = None,
    device: c.DeviceOpt = c._MODEL.device,
    max_seq_length: c.MaxSeqLenOpt = c._DATA.max_seq_length,
    max_eval_samples: c.MaxEvalOpt = None,
    eval_batch_size: c.EvalBatchSizeOpt = 64,
    precision: c.PrecisionOpt = "auto",
    seed: c.SeedOpt = 42,
    output_json: Annotated[
        str | None,
        typer.Option("--output-json", help="also write the metrics (and what was evaluated, how) here"),
    ] = None,
    predictions: Annotated[
        str | None,
        typer.Option(
            "--predictions",
            help="write per-example predictions of the dev and test splits into this folder, one file per "
            "split as run_glue.py names them (predict_results_<task>.txt …)",
        ),
    ] = None,
    overwrite: c.OverwriteOpt = False,
) -> None:
    """Evaluate an adapter (LoRA and its head) on the dev split(s) and print the GLUE metrics.

    Without --model (or --model-size), the base model recorded in the adapter is used.
    """
    if model is None and model_size is None and adapter:
        from fedlora_cli.modeling import adapter_base_model

        model = adapter_base_model(adapter)
    config = c.build(
        lambda: EvalConfig(
            data=DataSpec(task, data_dir, max_seq_length, None, max_eval_samples),
            model=c.model_spec(model, model_size, cache_dir, device),
            adapter=adapter,
            eval_batch_size=eval_batch_size,
            precision=precision,
            seed=seed,
            output_json=output_json,
            overwrite=overwrite,
            predictions=predictions,
        )
    )
    from fedlora_cli.centralised import run_eval

    with c.reporter(transient=True) as progress:
        result = run_eval(config, progress=progress, argv=c.argv())
    c.show_run_result("eval", result)
    if output_json:
        c.print_path("metrics", output_json)
    if predictions:
        c.print_path("predictions", predictions)
