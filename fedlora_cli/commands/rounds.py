"""`fedlora rounds`: multi-round FedAvg of LoRA adapters over client shards."""

from __future__ import annotations

from typing import Annotated

import typer

from fedlora_cli.commands import _common as c
from fedlora_cli.config import ROUNDS_SCHEDULES, OutputSpec, RoundsConfig
from fedlora_cli.errors import InputError

RESUME = c.Extra(
    "resume",
    Annotated[
        str | None,
        typer.Option(
            "--resume",
            autocompletion=c.complete_run,
            rich_help_panel="Output",
            help="continue a run after its last complete round: --resume RUN (a run "
            "folder or name; its run.json gives every other option), or --resume "
            "with the --run-name / --output-dir of the run",
        ),
    ],
)
OPTIONS = c.Command(
    RoundsConfig,
    rename={
        "train.epochs": c.Rename(("--local-epochs",), "epochs over its shard per client and round"),
        "train.lr_schedule": c.Rename(
            choices=ROUNDS_SCHEDULES,
            help="per-turn (= linear), cosine or constant: every client turn warms up and decays afresh; "
            "global-linear / global-cosine: one schedule over all rounds, each client turn trains on its "
            "round's slice",
        ),
    },
    extras=[c.MODEL_SIZE, c.LOG_EVERY, c.REPORT_TO, RESUME],
)


def _rounds(ctx: typer.Context, values: c.Values) -> None:
    """Federated rounds: each client trains LoRA A/B and the head on its shard, the server averages them."""
    resume = values.extra["resume"]
    if resume is not None and resume != c.RESUME_NAMED:
        config = _resumed(resume, values)
    else:
        if values.get("data.task") is None:
            raise InputError("--task is required (or --resume RUN, which reads it from the run)")
        config = values.config(RoundsConfig, resume=resume is not None)
        config = _with_recommended(config, values, resume is not None)
    from fedlora_cli.engines import run_rounds

    with c.reporter(log_every=values.extra["log_every"], report_to=values.extra["report_to"]) as progress:
        result = run_rounds(config, progress=progress, argv=c.argv())
    show_rounds(result)


rounds = OPTIONS.wrap(_rounds)


def _with_recommended(config: RoundsConfig, values: c.Values, resume: bool) -> RoundsConfig:
    """The method's recommended values (strategies/registry.py) for the options the user left out, said
    once."""
    from fedlora_cli.strategies.registry import recommended

    given = {".".join(path) for path in values.given}
    extra = recommended(config.aggregation.method, given)
    if not extra:
        return config
    flags = {f.dotted: f.option.flag for f in c.walk_options(RoundsConfig)}
    said = ", ".join(f"{flags.get(k, k)} {v}" for k, v in extra.items())
    c.print_line(
        f"note: {config.aggregation.method} recommends {said} (give the option to choose otherwise)",
        c.err_console(),
    )
    return values.config(RoundsConfig, resume=resume, **extra)


def _resumed(resume: str, values: c.Values) -> RoundsConfig:
    """`--resume RUN`: the run's recorded config, with the options given beside RUN that a resume may change.

    The given options are read back from a config built from them, so they are compared in the form the
    record holds (a task alias resolved, target modules split …).
    """
    from fedlora_cli.runs import read_record
    from fedlora_cli.runs.query import resolve_run
    from fedlora_cli.runs.rounds import resume_config

    run_dir = resolve_run(resume, values.get("output.root") or OutputSpec().root)
    record = read_record(run_dir)
    if record.command != "rounds":
        raise InputError(f"--resume {resume}: {run_dir} is a `{record.command}` run, not a `rounds` run")
    data = record.config.get("data")
    task = values.get("data.task") or (data.get("task") if isinstance(data, dict) else None)
    built = values.config(RoundsConfig, **{"data.task": task})  # only to read the given values back
    changes = {}
    for path in values.given:
        value = built
        for part in path:
            value = getattr(value, part)
        dotted = ".".join(path)
        if not dotted.startswith(("output.", "resume")):
            changes[dotted] = list(value) if isinstance(value, tuple) else value
    return resume_config(run_dir, record.config, changes)


def show_rounds(result) -> None:
    """One row per round: dev (and validation) metric, loss, aggregation error, traffic, time; then which
    round the run reports, and where its adapter is."""
    from rich.table import Table

    table = Table(title=f"fedlora rounds · {result.clients} clients", title_justify="left")
    dp = any("privacy" in row.aggregation for row in result.history)
    held = any(row.validation for row in result.history)
    bounded = any("norm_bound" in row.aggregation for row in result.history)
    personal = any(_per_client(row) for row in result.history)  # --client-test-fraction
    metric = result.main_metric
    columns = [
        "round",
        "clients",
        f"dev {metric}",
        *((f"validation {metric}",) if held else ()),
        *(("clients mean", "worst 10 %") if personal else ()),
        "train loss",
        "agg error",
        *(("ε", "clipped") if dp else ()),
        *(("bound", "clipped") if bounded else ()),
        "MB down",
        "MB up",
        "seconds",
    ]
    for name in columns:
        table.add_column(name, justify="right")
    chosen = (result.selected or {}).get("round") if (result.selected or {}).get("rule") == "best" else None
    for row in result.history:  # round 0: the starting adapter, before any training
        ev, val = row.eval or {}, row.validation or {}
        failed = len(row.failed)
        error = row.aggregation.get("error")
        privacy = row.aggregation.get("privacy") or {}
        dp_cells = (
            (f"{privacy['epsilon']:.3g}", f"{privacy['clipped']}/{len(row.clients)}")
            if privacy
            else ("–", "–")
        )
        clients = f"{len(row.clients)}" + (f" ({failed} failed)" if failed else "") if row.round else "start"
        bound = row.aggregation.get("norm_bound") or {}
        bound_cells = (
            (f"{bound['bound']:.3g}", f"{len(bound['clipped'])}/{len(row.clients)}") if bound else ("–", "–")
        )
        own = _per_client(row)
        own_cells = (f"{own['mean']:.4f}", f"{own['worst10']:.4f}") if own.get("n") else ("–", "–")
        table.add_row(
            f"{row.round}" + (" *" if row.round == chosen else ""),
            clients,
            f"{ev[metric]:.4f}" if metric in ev else "–",
            *((f"{val[metric]:.4f}" if metric in val else "–",) if held else ()),
            *(own_cells if personal else ()),
            f"{row.train_loss:.4f}" if row.train_loss is not None else "–",
            f"{error:.4f}" if error is not None else "–",
            *(dp_cells if dp else ()),
            *(bound_cells if bounded else ()),
            f"{row.bytes_down / 2**20:.2f}",
            f"{row.bytes_up / 2**20:.2f}",
            f"{row.seconds['wall']:.1f}",
        )
    out = c.console()
    out.print(table)
    if result.stopped:
        out.print(result.stopped, markup=False, highlight=False)
    if chosen is not None:
        c.print_line(
            f"* round {chosen}: the best validation {metric} (--select best); it is the result below"
        )
    if result.final_metrics:
        which = f"round {chosen}" if chosen is not None else "final"
        out.print(
            f"{which} (dev): "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if isinstance(v, float)),
            markup=False,
            highlight=False,
        )
    if getattr(result, "per_client", None):
        from fedlora_cli.personal.stats import describe

        final = "final models" if result.per_client.get("model") == "personal" else "the reported adapter"
        out.print(f"local test, {final}: {describe(result.per_client)}", markup=False, highlight=False)
        if isinstance(held := result.per_client.get("validation"), dict):
            out.print(f"local validation, {final}: {describe(held)}", markup=False, highlight=False)
    if result.resumed_after:
        out.print(f"resumed after round {result.resumed_after}")
    c.print_path("final adapter" if chosen is None else "selected adapter", result.final_adapter)
    clients = result.run_dir / "final" / "clients"
    if clients.is_dir():
        c.print_path(
            "client adapters", f"{clients}/client_NNN/adapter ({len(list(clients.glob('client_*')))} clients)"
        )
    c.print_path("run", result.run_dir)


def _per_client(row) -> dict:
    """A history row's per-client results (--client-test-fraction), {} without."""
    value = (getattr(row, "extra", None) or {}).get("per_client")
    return value if isinstance(value, dict) else {}
