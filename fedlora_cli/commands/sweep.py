"""`fedlora sweep FILE.toml`: a grid of runs, one after another, then a mean ± std table and a figure."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fedlora_cli.commands import _common as c


def _command(ctx: Any, name: str) -> Any:
    root = ctx.find_root()
    return root.command.get_command(root, name)


def _check_cell(ctx: Any, command: str, options: dict[str, Any], where: str) -> None:
    """Parse a cell's options as the command would (names and value types), before any run starts."""
    cmd = _command(ctx, command)
    args = c.options_to_args(cmd, {**options, "seed": 0, "output-dir": "x"}, where)
    try:
        cmd.make_context(command, args, parent=ctx.find_root()).close()
    except Exception as e:  # click's usage errors: a value of the wrong type, a missing required option
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise c.InputError(f"{where}: {message}") from None


def sweep(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(help="the sweep's TOML file (format: README, Sweeps)", metavar="FILE.toml")
    ],
    report_only: Annotated[
        bool, typer.Option("--report", help="only (re)write the report from the runs already made")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would run, and run nothing")] = False,
) -> None:
    """Run every cell of a grid for every seed (skipping complete runs, resuming interrupted ones), \
then report."""
    from fedlora_cli.sweeps import load_sweep, plan, report, report_tables, run_sweep, write_report

    spec = load_sweep(file, c.load_toml(file, "sweep"))
    for cell in spec.cells:
        _check_cell(ctx, cell.command, cell.options, f"sweep {file}, cell {cell.name}")
        for point in spec.tune_points(cell):
            tuned = spec.at_point(cell, point.options)
            _check_cell(
                ctx, cell.command, tuned.options, f"sweep {file}, cell {cell.name}, tune point {point.name}"
            )
    err = c.err_console()

    def log(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    if dry_run:
        for p in plan(spec):
            after = "  (with the point its tuning chooses)" if p.waits else ""
            log(f"{p.action:8s} {p.folder}  fedlora {p.cell.command} … --seed {p.seed}{after}")
        return
    outcome = None
    if not report_only:

        def execute(command: str, options: dict[str, Any]) -> None:
            cmd = _command(ctx, command)
            args = c.options_to_args(cmd, options)
            with cmd.make_context(command, args, parent=ctx.find_root()) as sub:
                cmd.invoke(sub)

        outcome = run_sweep(spec, execute, log=log, argv=c.argv())
    cells = report(spec)
    from rich.markup import escape
    from rich.table import Table

    metric = next((r.metric for r in cells if r.metric), "metric")
    last = any(r.has_last for r in cells)
    tuned = any(r.tuned for r in cells)
    table = Table(title=f"sweep {spec.name}: {metric}, mean ± std over seeds", title_justify="left")
    columns = [
        "cell",
        "command",
        "runs",
        f"{metric} mean ± std",
        *(["last round"] if last else []),
        *(["tuned"] if tuned else []),
    ]
    for name in columns:
        table.add_column(
            name, justify="left" if name in ("cell", "command", "tuned") else "right", overflow="fold"
        )
    for r in cells:
        row = [r.cell.name, r.cell.command, f"{r.n}/{r.runs}", _mean_std(r.mean, r.std)]
        if last:
            at_last = r.at_last()
            row.append(_mean_std(at_last.mean, at_last.std))
        if tuned:
            row.append(", ".join(f"{k}={v}" for k, v in (r.tuned or {}).items()))
        table.add_row(*row)
    c.console().print(table)
    for t in report_tables(spec, cells):
        if t.document == "report":  # the table above
            continue
        table = Table(
            title=escape(f"sweep {spec.name}: {t.title}"),
            title_justify="left",
            caption=escape(" ".join(t.notes)),
            caption_justify="left",
        )
        for i, name in enumerate(t.header):
            table.add_column(escape(name), justify="right" if _numeric(t.rows, i) else "left")
        for row in t.rows:
            table.add_row(*map(escape, row))
        c.console().print(table)
    for kind, path in write_report(spec, cells).items():
        c.print_path(kind, path)
    c.print_path("sweep", spec.folder / "sweep.json")
    if outcome is not None and outcome.failed:
        names = ", ".join(list(outcome.failed)[:3])
        raise c.FedloraError(
            f"{len(outcome.failed)} run(s) failed ({names}): see `fedlora runs list "
            f"{spec.folder} --status failed`; run the sweep again to retry them"
        )


def _mean_std(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _numeric(rows: list[list[str]], column: int) -> bool:
    """Whether a column holds numbers (right-aligned), judged by its first non-empty value."""
    value = next((r[column] for r in rows if r[column]), "")
    try:
        float(value.split(" ")[0])
    except ValueError:
        return False
    return True
