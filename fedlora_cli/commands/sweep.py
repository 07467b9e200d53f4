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
    """Run every cell of a grid for every seed (skipping complete runs, resuming interrupted ones), then report."""
    from fedlora_cli.sweeps import load_sweep, plan, report, report_rows, run_sweep, write_report

    spec = load_sweep(file, c.load_toml(file, "sweep"))
    for cell in spec.cells:
        _check_cell(ctx, cell.command, cell.options, f"sweep {file}, cell {cell.name}")
    err = c.err_console()

    def log(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    if dry_run:
        for p in plan(spec):
            log(f"{p.action:8s} {p.folder}  fedlora {p.cell.command} … --seed {p.seed}")
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
    header, rows = report_rows(spec, cells)
    from rich.table import Table

    metric = next((r.metric for r in cells if r.metric), "metric")
    table = Table(title=f"sweep {spec.name}: {metric}, mean ± std over seeds", title_justify="left")
    for name in ("cell", "command", "runs", f"{metric} mean ± std"):
        table.add_column(name, justify="left" if name in ("cell", "command") else "right", overflow="fold")
    for r in cells:
        value = "–" if r.mean is None else f"{r.mean:.4f}" + (f" ± {r.std:.4f}" if r.std is not None else "")
        table.add_row(r.cell.name, r.cell.command, f"{r.n}/{r.runs}", value)
    c.console().print(table)
    if spec.table is not None:
        from fedlora_cli.sweeps import pivot

        header, rows = pivot(spec, cells)
        table = Table(title=f"sweep {spec.name}: × 100, mean ± std over seeds", title_justify="left")
        for name in header:
            table.add_column(name, justify="left" if name in spec.table.rows else "right")
        for row in rows:
            table.add_row(*row)
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
