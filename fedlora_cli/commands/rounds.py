"""`fedlora rounds`: multi-round FedAvg of LoRA adapters over client shards."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import (
    AggregationSpec,
    DataSpec,
    OutputSpec,
    RoundsConfig,
    TrainSpec,
)

_R = RoundsConfig(data=c._DATA, shards="")


def rounds(
    task: c.TaskOpt,
    shards: Annotated[
        str, typer.Option("--shards", help="folder of client_<i>.json manifests (fedlora shard)")
    ],
    model: c.ModelOpt = None,
    model_size: c.ModelSizeOpt = None,
    data_dir: c.DataDirOpt = None,
    cache_dir: c.CacheDirOpt = None,
    device: c.DeviceOpt = c._MODEL.device,
    max_seq_length: c.MaxSeqLenOpt = c._DATA.max_seq_length,
    max_train_samples: c.MaxTrainOpt = None,
    max_eval_samples: c.MaxEvalOpt = None,
    num_rounds: Annotated[int, typer.Option("--rounds", help="communication rounds")] = _R.rounds,
    local_epochs: Annotated[
        float, typer.Option("--local-epochs", help="epochs over its shard per client and round")
    ] = _R.train.epochs,
    batch_size: c.BatchSizeOpt = _R.train.batch_size,
    learning_rate: c.LearningRateOpt = _R.train.learning_rate,
    weight_decay: c.WeightDecayOpt = _R.train.weight_decay,
    warmup_ratio: c.WarmupOpt = _R.train.warmup_ratio,
    max_grad_norm: c.MaxGradNormOpt = _R.train.max_grad_norm,
    precision: c.PrecisionOpt = _R.train.precision,
    seed: c.SeedOpt = _R.train.seed,
    max_tokens: c.MaxTokensOpt = _R.train.max_tokens,
    lora_r: c.LoraROpt = c._LORA.r,
    lora_alpha: c.LoraAlphaOpt = c._LORA.alpha,
    lora_dropout: c.LoraDropoutOpt = c._LORA.dropout,
    target_modules: c.TargetModulesOpt = None,
    aggregation: Annotated[
        str,
        typer.Option(
            "--aggregation", help="svd: truncated mean of B·A (exact up to rank); naive: mean of A and of B"
        ),
    ] = _R.aggregation.method,
    svd_rank: Annotated[
        int | None, typer.Option("--svd-rank", help="rank of the aggregated adapter \\[default: --lora-r]")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", help="lora_alpha of the aggregated adapter \\[default: the svd rank]"),
    ] = None,
    init_adapter: Annotated[
        str | None,
        typer.Option("--init-adapter", help="round 1 starts from this adapter instead of a fresh LoRA"),
    ] = None,
    clients_per_round: Annotated[
        int | None, typer.Option("--clients-per-round", help="sample this many clients per round (seeded)")
    ] = None,
    fraction_fit: Annotated[
        float | None, typer.Option("--fraction-fit", help="or this share of the clients per round")
    ] = None,
    eval_each_round: Annotated[
        bool,
        typer.Option(
            "--eval-each-round/--no-eval-each-round", help="evaluate the global adapter every round"
        ),
    ] = _R.eval_each_round,
    eval_clients: Annotated[
        bool, typer.Option("--eval-clients", help="also evaluate every client's adapter (one dev pass each)")
    ] = _R.eval_clients,
    eval_batch_size: c.EvalBatchSizeOpt = _R.eval_batch_size,
    output_root: c.OutputRootOpt = c._OUT.root,
    run_name: c.RunNameOpt = None,
    output_dir: c.OutputDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run after its last complete round")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="local (one process) or flower (Flower's simulation engine)")
    ] = _R.engine,
    min_clients: Annotated[
        int | None,
        typer.Option("--min-clients", help="flower: a round needs this many replies \\[default: all]"),
    ] = None,
    client_cpus: Annotated[
        float, typer.Option("--client-cpus", help="flower: CPUs per virtual client")
    ] = _R.client_cpus,
    client_gpus: Annotated[
        float, typer.Option("--client-gpus", help="flower: GPU share per virtual client")
    ] = _R.client_gpus,
    round_timeout: Annotated[
        float | None,
        typer.Option(
            "--round-timeout",
            help="flower: seconds to wait for a round's replies; later ones count as failed \\[default: wait for all]",
        ),
    ] = None,
) -> None:
    """Federated rounds: each client trains LoRA A/B and the head on its shard, the server averages them."""
    config = c.build(
        lambda: RoundsConfig(
            data=DataSpec(task, data_dir, max_seq_length, max_train_samples, max_eval_samples),
            shards=shards,
            model=c.model_spec(model, model_size, cache_dir, device),
            lora=c.lora_spec(lora_r, lora_alpha, lora_dropout, target_modules),
            train=TrainSpec(
                local_epochs,
                batch_size,
                learning_rate,
                weight_decay,
                warmup_ratio,
                max_grad_norm,
                precision,
                seed,
                max_tokens=max_tokens,
            ),
            aggregation=AggregationSpec(aggregation, svd_rank, alpha),
            output=OutputSpec(output_root, run_name, output_dir),
            rounds=num_rounds,
            init_adapter=init_adapter,
            resume=resume,
            eval_each_round=eval_each_round,
            eval_clients=eval_clients,
            eval_batch_size=eval_batch_size,
            clients_per_round=clients_per_round,
            fraction_fit=fraction_fit,
            engine=engine,
            min_clients=min_clients,
            client_cpus=client_cpus,
            client_gpus=client_gpus,
            round_timeout=round_timeout,
        )
    )
    from fedlora_cli.federation import run_rounds
    from fedlora_cli.progress import RichProgress

    with RichProgress(c.err_console()) as progress:
        result = run_rounds(config, progress=progress, argv=c.argv())
    show_rounds(result)


def show_rounds(result) -> None:
    """One row per round: metric, loss, aggregation error, traffic, time; then the final adapter."""
    from rich.table import Table

    table = Table(title=f"fedlora rounds · {result.clients} clients", title_justify="left")
    for name in (
        "round",
        "clients",
        result.main_metric,
        "train loss",
        "agg error",
        "MB down",
        "MB up",
        "seconds",
    ):
        table.add_column(name, justify="right")
    for row in result.history:
        ev = row.get("eval") or {}
        failed = len(row.get("failed") or [])
        table.add_row(
            str(row["round"]),
            f"{len(row['clients'])}" + (f" ({failed} failed)" if failed else ""),
            f"{ev[result.main_metric]:.4f}" if result.main_metric in ev else "–",
            f"{row['train_loss']:.4f}",
            f"{row['aggregation']['error']:.4f}",
            f"{row['bytes_down'] / 2**20:.2f}",
            f"{row['bytes_up'] / 2**20:.2f}",
            f"{row['seconds']['wall']:.1f}",
        )
    out = c.console()
    out.print(table)
    if result.final_metrics:
        out.print(
            "final: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if isinstance(v, float))
        )
    if result.resumed_after:
        out.print(f"resumed after round {result.resumed_after}")
    out.print(f"final adapter: {result.final_adapter}")
    out.print(f"run: {result.run_dir}")
