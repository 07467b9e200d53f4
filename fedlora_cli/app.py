"""The Typer app: global options, the command registry (the CLI's table of contents), the error boundary."""

from __future__ import annotations

import typer

from fedlora_cli import __version__
from fedlora_cli.commands import _common as c
from fedlora_cli.commands.baseline import baseline
from fedlora_cli.commands.clientapp import clientapp
from fedlora_cli.commands.download import download
from fedlora_cli.commands.eval import eval_command
from fedlora_cli.commands.merge import merge
from fedlora_cli.commands.rounds import rounds
from fedlora_cli.commands.runs import runs_app
from fedlora_cli.commands.shard import shard
from fedlora_cli.commands.sweep import sweep
from fedlora_cli.commands.train import train

app = typer.Typer(
    name="fedlora",
    cls=c.FedloraGroup,
    help="Federated fine-tuning of small language models with LoRA: shard GLUE, train, FedAvg adapters, "
    "evaluate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)

SETUP, SINGLE, FEDERATED, EXPERIMENTS = "Setup", "Single machine", "Federated", "Experiments"

# The registry: name, function, help panel. Each function lives in commands/<name>.py.
_COMMANDS = [
    ("download", download, SETUP),
    ("train", train, SINGLE),
    ("baseline", baseline, SINGLE),
    ("eval", eval_command, SINGLE),
    ("shard", shard, FEDERATED),
    ("rounds", rounds, FEDERATED),
    ("merge", merge, FEDERATED),
    ("clientapp", clientapp, FEDERATED),
    ("sweep", sweep, EXPERIMENTS),
]
for _name, _fn, _panel in _COMMANDS:
    app.command(_name, cls=c.FedloraCommand, rich_help_panel=_panel)(_fn)
app.add_typer(runs_app, name="runs", rich_help_panel=EXPERIMENTS)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="print the version and exit", callback=_version, is_eager=True
    ),
) -> None:
    """Federated fine-tuning of small language models with LoRA.

    Set FEDLORA_DEBUG=1 to see the traceback behind an error message.
    """


def main() -> None:
    """The `fedlora` console command (and `python -m fedlora_cli`): this process handles SIGTERM as Ctrl-C."""
    from fedlora_cli import termination

    termination.enable()
    app()
