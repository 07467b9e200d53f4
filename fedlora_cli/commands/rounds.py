"""`fedlora rounds`: multi-round FedAvg of LoRA adapters over client shards."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import (
    AggregationSpec,
    DataSpec,
    OutputSpec,
    PartitionSpec,
    PrivacySpec,
    RoundsConfig,
    TrainSpec,
)
from fedlora_cli.errors import InputError

_R = RoundsConfig(data=c._DATA, shards="")


def rounds(
    ctx: typer.Context,
    task: c.OptionalTaskOpt = None,
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            help="folder of client_<i>.json manifests (fedlora shard); or shard in memory: --clients",
        ),
    ] = None,
    clients: Annotated[
        int | None,
        typer.Option(
            "--clients",
            "-k",
            help="shard the training set across K clients now (manifests go in the run folder)",
        ),
    ] = None,
    partition: Annotated[
        str,
        typer.Option("--partition", help="with --clients: " + c.MODE_HELP, autocompletion=c.complete_mode),
    ] = _R.partition.mode,
    dirichlet_alpha: c.DirichletAlphaOpt = _R.partition.dirichlet_alpha,
    overlap_ratio: c.OverlapRatioOpt = _R.partition.overlap_ratio,
    category_key: c.CategoryKeyOpt = _R.partition.category_key,
    min_size: c.MinSizeOpt = _R.partition.min_size,
    bin_stsb: c.BinStsbOpt = _R.partition.bin_stsb,
    partition_seed: Annotated[
        int | None,
        typer.Option("--partition-seed", help="with --clients: seeds the split \\[default: --seed]"),
    ] = None,
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
    aggregation: c.AggregationOpt = c.Method(_R.aggregation.method),
    svd_rank: c.SvdRankOpt = None,
    alpha: c.AlphaOpt = None,
    client_ranks: Annotated[
        str | None,
        typer.Option(
            "--client-ranks",
            help='per-client LoRA ranks: 4,8,16 (cycled over client ids) or a JSON file {"<id>": rank} \\[default: --lora-r for all]',
        ),
    ] = None,
    prox_mu: Annotated[
        float,
        typer.Option("--prox-mu", help="FedProx: add μ/2·‖θ − θ_global‖² to every client's loss (0: off)"),
    ] = _R.aggregation.prox_mu,
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
    overwrite: c.OverwriteOpt = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="continue a run after its last complete round: --resume RUN (a run folder or name; its run.json "
            "gives every other option), or --resume with the --run-name / --output-dir of the run",
            autocompletion=c.complete_run,
        ),
    ] = None,
    resume_from_round: Annotated[
        int | None,
        typer.Option(
            "--resume-from-round",
            help="continue the run after this complete round, discarding the later ones (implies --resume)",
        ),
    ] = None,
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
    log_every: c.LogEveryOpt = c.DEFAULT_LOG_EVERY,
    report_to: c.ReportToOpt = None,
    dp_clip: c.DpClipOpt = None,
    dp_noise_multiplier: c.DpNoiseOpt = None,
    dp_delta: c.DpDeltaOpt = None,
    dp_where: c.DpWhereOpt = _R.privacy.where,
    dp_target_epsilon: c.DpTargetOpt = None,
    dp_secret_noise: c.DpSecretNoiseOpt = _R.privacy.secret_noise,
) -> None:
    """Federated rounds: each client trains LoRA A/B and the head on its shard, the server averages them."""
    options = {k: v for k, v in locals().items() if k != "ctx"}
    if resume is not None and resume != c.RESUME_NAMED:
        config = _resumed(options, ctx)
    else:
        if task is None:
            raise InputError("--task is required (or --resume RUN, which reads it from the run)")
        config = c.build(lambda: _config(options))
    from fedlora_cli.engines import run_rounds

    with c.reporter(log_every=log_every, report_to=report_to) as progress:
        result = run_rounds(config, progress=progress, argv=c.argv())
    show_rounds(result)


def _config(o: dict[str, Any]) -> RoundsConfig:
    """The RoundsConfig of a set of `rounds` options (the function's parameters, by name)."""
    return RoundsConfig(
        data=DataSpec(o["task"], o["data_dir"], o["max_seq_length"], o["max_train_samples"], o["max_eval_samples"]),
        shards=o["shards"] or "",
        partition=PartitionSpec(o["clients"], o["partition"], o["partition_seed"], o["dirichlet_alpha"],
                                o["overlap_ratio"], o["category_key"], o["min_size"], o["bin_stsb"]),
        model=c.model_spec(o["model"], o["model_size"], o["cache_dir"], o["device"]),
        lora=c.lora_spec(o["lora_r"], o["lora_alpha"], o["lora_dropout"], o["target_modules"]),
        train=TrainSpec(o["local_epochs"], o["batch_size"], o["learning_rate"], o["weight_decay"], o["warmup_ratio"],
                        o["max_grad_norm"], o["precision"], o["seed"], max_tokens=o["max_tokens"]),
        aggregation=AggregationSpec(c.method_name(o["aggregation"]), o["svd_rank"], o["alpha"], o["client_ranks"],
                                    o["prox_mu"]),
        output=OutputSpec(o["output_root"], o["run_name"], o["output_dir"], o["overwrite"]),
        rounds=o["num_rounds"],
        init_adapter=o["init_adapter"],
        resume=o["resume"] is not None,
        resume_from_round=o["resume_from_round"],
        eval_each_round=o["eval_each_round"],
        eval_clients=o["eval_clients"],
        eval_batch_size=o["eval_batch_size"],
        clients_per_round=o["clients_per_round"],
        fraction_fit=o["fraction_fit"],
        engine=o["engine"],
        min_clients=o["min_clients"],
        client_cpus=o["client_cpus"],
        client_gpus=o["client_gpus"],
        round_timeout=o["round_timeout"],
        privacy=PrivacySpec(o["dp_clip"], o["dp_noise_multiplier"], o["dp_delta"], o["dp_where"],
                            o["dp_target_epsilon"], o["dp_secret_noise"]),
    )  # fmt: skip


def _resumed(options: dict[str, Any], ctx: typer.Context) -> RoundsConfig:
    """`--resume RUN`: the run's recorded config, with the options given beside RUN that a resume may change.

    Which options were given is read from the command line (and --config), and turned into config keys
    by building the config twice: with those options, and with every option at its default.
    """
    import inspect

    from fedlora_cli.config import to_dict
    from fedlora_cli.runs import flatten, read_record
    from fedlora_cli.runs.query import resolve_run
    from fedlora_cli.runs.rounds import resume_config

    run_dir = resolve_run(options["resume"], options["output_root"])
    record = read_record(run_dir)
    if record.command != "rounds":
        raise InputError(
            f"--resume {options['resume']}: {run_dir} is a `{record.command}` run, not a `rounds` run"
        )
    defaults = {name: p.default for name, p in inspect.signature(rounds).parameters.items() if name != "ctx"}
    given = {n for n in options if (src := ctx.get_parameter_source(n)) is not None and src.name != "DEFAULT"}
    task = options["task"] or record.config.get("data", {}).get("task")
    fixed = {"task": task, "resume": None}  # built only to compare: not a run of its own
    both = ({**defaults, **fixed}, {**defaults, **{n: options[n] for n in given}, **fixed})
    at_default, asked = (flatten(to_dict(c.build(lambda o=o: _config(o)))) for o in both)
    changes = {
        k: v for k, v in asked.items() if at_default.get(k) != v and not k.startswith(("output.", "resume"))
    }
    return resume_config(run_dir, record.config, changes)


def show_rounds(result) -> None:
    """One row per round: metric, loss, aggregation error, traffic, time; then the final adapter."""
    from rich.table import Table

    table = Table(title=f"fedlora rounds · {result.clients} clients", title_justify="left")
    dp = any("privacy" in row.aggregation for row in result.history)
    for name in (
        "round",
        "clients",
        result.main_metric,
        "train loss",
        "agg error",
        *(("ε", "clipped") if dp else ()),
        "MB down",
        "MB up",
        "seconds",
    ):
        table.add_column(name, justify="right")
    for row in result.history:  # round 0: the starting adapter, before any training
        ev = row.eval or {}
        failed = len(row.failed)
        error = row.aggregation.get("error")
        privacy = row.aggregation.get("privacy") or {}
        dp_cells = (
            (f"{privacy['epsilon']:.3g}", f"{privacy['clipped']}/{len(row.clients)}")
            if privacy
            else ("–", "–")
        )
        table.add_row(
            str(row.round),
            f"{len(row.clients)}" + (f" ({failed} failed)" if failed else "") if row.round else "start",
            f"{ev[result.main_metric]:.4f}" if result.main_metric in ev else "–",
            f"{row.train_loss:.4f}" if row.train_loss is not None else "–",
            f"{error:.4f}" if error is not None else "–",
            *(dp_cells if dp else ()),
            f"{row.bytes_down / 2**20:.2f}",
            f"{row.bytes_up / 2**20:.2f}",
            f"{row.seconds['wall']:.1f}",
        )
    out = c.console()
    out.print(table)
    if result.stopped:
        out.print(result.stopped)
    if result.final_metrics:
        out.print(
            "final: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if isinstance(v, float))
        )
    if result.resumed_after:
        out.print(f"resumed after round {result.resumed_after}")
    c.print_path("final adapter", result.final_adapter)
    c.print_path("run", result.run_dir)
