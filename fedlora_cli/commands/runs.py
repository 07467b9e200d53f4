"""`fedlora runs`: list, show, compare and re-run the run folders under a root (reading: runs/query.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fedlora_cli.commands import _common as c

runs_app = typer.Typer(
    name="runs",
    help="What ran: list runs, show one, compare several, re-run one (bit-identically, with --verify).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


RootOpt = Annotated[str, typer.Option("--root", help="where runs are searched by name")]
RunArg = Annotated[
    str, typer.Argument(help="a run folder, or a run's name under --root", autocompletion=c.complete_run)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds <= 0:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _date(stamp: str | None) -> str:
    return stamp[:16].replace("T", " ") if stamp else "–"


def _metric(info) -> str:
    if info.main_value is None:
        own = _per_client(info)  # a personalised run: no global adapter, each client's own model
        return f"{own['metric']} {own['mean']:.4f} (clients)" if own.get("n") else "–"
    return f"{info.main_metric} {info.main_value:.4f}"


def _per_client(info, key: str = "per_client") -> dict[str, Any]:
    """The run's per-client results (final/metrics.json; --client-test-fraction), {} when it has none."""
    value = info.final.extra.get(key) if info.final is not None else None
    return value if isinstance(value, dict) else {}


CLIENT_STATS = (
    ("mean", "mean"),
    ("std", "std"),
    ("worst", "worst"),
    ("worst10", "worst 10 %"),
    ("best", "best"),
)


def _rounds(info) -> str:
    if info.rounds_total is None and info.rounds_done is None:
        return "–"
    return f"{info.rounds_done if info.rounds_done is not None else '?'}/{info.rounds_total or '?'}"


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def list_command(
    root: Annotated[str, typer.Argument(help="the folder to search (recursively) for run folders")] = "runs",
    task: Annotated[str | None, typer.Option("--task", "-t", help="only runs of this task")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="only runs with this status: running, complete, failed, interrupted"),
    ] = None,
    command: Annotated[
        str | None, typer.Option("--command", help="only runs of this command (train, rounds …)")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="only runs of this method (svd, svd+dp, naive, lora, full …)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """One row per run: command, task, model, method, clients, rounds, status, main metric, date, duration."""
    from fedlora_cli.runs import STATUSES
    from fedlora_cli.runs.query import list_runs
    from fedlora_cli.tasks import get_task

    if status is not None and status not in STATUSES:
        raise c.InputError(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    if task is not None:
        task = c.build(lambda: get_task(task).name)
    runs = list_runs(root, task=task, status=status, command=command, method=method)
    if as_json:
        _echo_json([r.row() for r in runs])
        return
    from rich.table import Table

    table = Table(title=f"runs in {root} ({len(runs)})", title_justify="left")
    for name, justify in (
        ("name", "left"),
        ("command", "left"),
        ("task", "left"),
        ("model", "left"),
        ("method", "left"),
        ("clients", "right"),
        ("rounds", "right"),
        ("status", "left"),
        ("main metric", "right"),
        ("date", "left"),
        ("duration", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold" if name == "name" else "ellipsis")
    for r in runs:
        style = {"failed": "red", "interrupted": "yellow", "running": "cyan"}.get(r.status, "")
        table.add_row(
            r.name,
            r.command,
            r.task or "–",
            r.model or "–",
            r.method,
            str(r.clients) if r.clients else "–",
            _rounds(r),
            f"[{style}]{r.status}[/]" if style else r.status,
            _metric(r),
            _date(r.record.started),
            _duration(r.record.duration_s),
        )
    c.console().print(table)


def show(run: RunArg, root: RootOpt = "runs", as_json: JsonOpt = False) -> None:
    """One run: its command line, config, status, per-round table, final metrics and where its \
adapters are."""
    from fedlora_cli.runs import flatten, read_history
    from fedlora_cli.runs.query import load_run, resolve_run

    info = load_run(resolve_run(run, root), root)
    history = read_history(info.path)
    if as_json:
        _echo_json(
            {
                **info.row(),
                "record": info.record.to_json(),
                "history": [r.to_json() for r in history],
                "final": info.final.to_json() if info.final else None,
                "adapter": str(info.adapter) if info.adapter else None,
            }
        )
        return
    rec = info.record
    rows = [
        ("status", info.status + (f" ({rec.error})" if rec.error else "")),
        ("command", rec.command),
        ("started", _date(rec.started)),
        ("ended", _date(rec.ended)),
        ("duration", _duration(rec.duration_s)),
        (
            "fedlora",
            f"{rec.versions.get('fedlora', '?')}"
            + (f" (git {rec.git_commit[:12]})" if rec.git_commit else ""),
        ),
        ("host", rec.host or "–"),
    ]
    for i, resume in enumerate(rec.resumes, start=1):
        changes = (
            ", ".join(f"{k} {v[0]} → {v[1]}" for k, v in (resume.get("changes") or {}).items()) or "no change"
        )
        after = resume.get("after_round")
        where = f" (after round {after})" if isinstance(after, int) else ""
        rows.append((f"resume {i}", f"{_date(resume.get('at'))}{where}: {changes}"))
    out = c.console()
    out.print(c.summary_table(f"run {info.name}", rows))
    c.print_path("folder", info.path)
    c.print_path("command line", rec.shell)
    from rich.table import Table

    config = Table(title="config", show_header=False, title_justify="left")
    config.add_column(style="bold")
    config.add_column(overflow="fold")
    for key, value in flatten(rec.config).items():
        config.add_row(
            key, json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
        )
    out.print(config)
    if history:
        metric = info.main_metric
        table = Table(title="rounds", title_justify="left")
        personal = any(row.extra.get("per_client") for row in history)
        names = [
            "round",
            "clients",
            metric or "metric",
            *(("clients mean", "worst 10 %") if personal else ()),
            "train loss",
            "agg error",
            "MB up",
            "seconds",
        ]
        for name in names:
            table.add_column(name, justify="right")
        for row in history:
            value, loss = row.metric(metric), row.train_loss
            agg, wall = row.aggregation.get("error"), row.seconds.get("wall")
            own = row.extra.get("per_client") if isinstance(row.extra.get("per_client"), dict) else {}
            own_cells = (f"{own['mean']:.4f}", f"{own['worst10']:.4f}") if own.get("n") else ("–", "–")
            table.add_row(
                str(row.round),
                str(len(row.clients)),
                f"{value:.4f}" if value is not None else "–",
                *(own_cells if personal else ()),
                f"{loss:.4f}" if loss is not None else "–",
                f"{agg:.4f}" if isinstance(agg, int | float) else "–",
                f"{row.bytes_up / 2**20:.2f}",
                f"{wall:.1f}" if isinstance(wall, int | float) else "–",
            )
        out.print(table)
    if info.final is not None and info.final.metrics:
        out.print(
            "final: "
            + ", ".join(f"{k} {v:.4f}" for k, v in info.final.metrics.items() if isinstance(v, int | float))
        )
    from fedlora_cli.personal.stats import describe

    for key, what in (("per_client_global", "the global adapter"), ("per_client", "each client's model")):
        own = _per_client(info, key)
        if own:
            which = what if own.get("model") != "personal" else "each client's own final model"
            out.print(f"local test, {which}: {describe(own)}", markup=False, highlight=False)
    if info.adapter is not None:
        c.print_path("final adapter", info.adapter)
    clients = info.path / "final" / "clients"
    if clients.is_dir():
        c.print_path("client adapters", f"{clients}/client_NNN/adapter")
    rounds = sorted(info.path.glob("round_*/global/adapter"))
    if rounds:
        c.print_path(
            "round adapters",
            f"{info.path}/round_NNN/global/adapter ({len(rounds)} rounds; clients in "
            "round_NNN/client_NNN/adapter)",
        )


def compare(
    runs: Annotated[
        list[str], typer.Argument(help="two or more runs (folders or names)", autocompletion=c.complete_run)
    ],
    root: RootOpt = "runs",
    plot: Annotated[
        str | None,
        typer.Option("--plot", help="draw the metric and loss per round of every run into FILE.png"),
    ] = None,
    plot_clients: Annotated[
        str | None,
        typer.Option(
            "--plot-clients",
            help="draw each run's per-client metric on the clients' local test splits (a box and the "
            "clients) into FILE.png",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Configs side by side (only what differs) and final metrics, per-client results (mean, std, \
worst client,
    worst 10 %, best); --plot draws the learning curves, --plot-clients the per-client distributions."""
    from fedlora_cli.runs.query import config_diff, curve_of, load_run, resolve_run

    if plot is not None or plot_clients is not None:
        from fedlora_cli.plots import require_matplotlib

        require_matplotlib()
    infos = [load_run(resolve_run(r, root), root) for r in runs]
    if plot_clients is not None and not any(_per_client(i).get("n") for i in infos):
        raise c.InputError(
            "--plot-clients: none of these runs scored its clients (run them with --client-test-fraction F)"
        )
    diff = config_diff(infos)
    metric_names = sorted(
        {k for i in infos if i.final for k, v in i.final.metrics.items() if isinstance(v, int | float)}
    )
    if as_json:
        _echo_json(
            {
                "runs": [i.name for i in infos],
                "differ": diff,
                "metrics": {
                    k: [i.final.metrics.get(k) if i.final else None for i in infos] for k in metric_names
                },
                "status": [i.status for i in infos],
                "per_client": [_per_client(i) or None for i in infos],
            }
        )
    else:
        from rich.table import Table

        table = Table(title="what differs", title_justify="left")
        table.add_column("", style="bold")
        for i in infos:
            table.add_column(i.name, overflow="fold")
        for key, values in diff.items():
            table.add_row(key, *(json.dumps(v) if not isinstance(v, str) else v for v in values))
        table.add_row("status", *(i.status for i in infos), end_section=True)
        for name in metric_names:
            values = [i.final.metrics.get(name) if i.final else None for i in infos]
            table.add_row(name, *(f"{v:.4f}" if isinstance(v, int | float) else "–" for v in values))
        owns = [_per_client(i) for i in infos]
        if any(own.get("n") for own in owns):  # each client's model on its local test split
            metric = next(own["metric"] for own in owns if own.get("n"))
            for key, label in CLIENT_STATS:
                cells = [f"{own[key]:.4f}" if own.get("n") else "–" for own in owns]
                table.add_row(f"clients {metric} {label}", *cells)
            table.add_row("clients", *(str(own.get("n", "–")) for own in owns))
            before = [_per_client(i, "per_client_global") for i in infos]  # --personalize-epochs: before it
            if any(b.get("n") for b in before):
                table.add_row(
                    f"clients {metric} mean, global adapter",
                    *(f"{b['mean']:.4f}" if b.get("n") else "–" for b in before),
                )
        c.console().print(table)
        if not diff:
            c.console().print("the configs are identical")
    if plot is not None:
        from fedlora_cli.plots import plot_curves

        metric = next((i.main_metric for i in infos if i.main_metric), None) or "metric"
        path = plot_curves(
            [curve_of(i, metric) for i in infos], plot, metric=metric, title=f"{len(infos)} runs"
        )
        c.print_path("plot", path)
    if plot_clients is not None:
        from fedlora_cli.plots import plot_client_distribution

        groups = [(i.name, list(_per_client(i).get("values", {}).values())) for i in infos]
        metric = next((_per_client(i)["metric"] for i in infos if _per_client(i).get("n")), "metric")
        path = plot_client_distribution(groups, plot_clients, metric=metric, title=f"{len(infos)} runs")
        c.print_path("client plot", path)


def rerun(
    run: RunArg,
    root: RootOpt = "runs",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="check the new final adapter is bit-identical to the recorded one (exit 1 if not)",
        ),
    ] = False,
    output_dir: Annotated[
        str | None,
        typer.Option("--output-dir", help="write the re-run into this new folder (default: beside the run)"),
    ] = None,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir", help="Hugging Face cache for the model (default: yours, never the record's)"
        ),
    ] = None,
    log_every: c.LOG_EVERY.annotation = c.DEFAULT_LOG_EVERY,
) -> None:
    """Run the run's final configuration again into a new folder beside it, `<name>-rerun-<n>`.

    A run resumed with changes (`rounds --resume --rounds 3`) is re-run from the start with the
    configuration its last session ran with, which ends where the resumed run ended.
    """
    from fedlora_cli.runs.query import resolve_run
    from fedlora_cli.workflows import plan_rerun, run_rerun

    folder = resolve_run(run, root)
    plan = plan_rerun(folder, root=root, output_dir=output_dir, model_cache=cache_dir)
    c.print_line(f"re-running {plan.how}")
    with c.reporter(log_every=log_every) as progress:
        result = run_rerun(plan, progress=progress, argv=c.argv())
    c.print_path("re-run", result.folder)
    if not verify:
        return
    if result.recorded_sha256 is None:
        raise c.InputError(f"{folder} has no final adapter to verify against (a {run} run without adapter)")
    if not result.identical:
        c.print_path("recorded adapter sha256", result.recorded_sha256)
        c.print_path("re-run adapter sha256", result.new_sha256)
        raise c.FedloraError(
            f"not reproduced: the re-run's final adapter differs from the recorded one ({result.folder})"
        )
    c.console().print(
        f"verified: bit-identical final adapter (sha256 {result.recorded_sha256[:16]}…)", highlight=False
    )


for _name, _fn in (("list", list_command), ("show", show), ("compare", compare), ("rerun", rerun)):
    runs_app.command(_name, cls=c.FedloraCommand)(_fn)
