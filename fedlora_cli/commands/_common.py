"""What every command shares: option types, the reference scripts' flag aliases, the error boundary,
output."""

from __future__ import annotations

import contextvars
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, click

from fedlora_cli.commands._options import Command, Extra, OptionError, Rename, Values
from fedlora_cli.config import model_from_size
from fedlora_cli.errors import FedloraError, InputError, Interrupted, io_message
from fedlora_cli.options import walk as walk_options
from fedlora_cli.progress import DEFAULT_LOG_EVERY
from fedlora_cli.tasks import task_names

__all__ = [
    "Command",
    "Extra",
    "Rename",
    "Values",
    "walk_options",
]  # the pieces every command module takes from here

DEBUG_ENV = "FEDLORA_DEBUG"  # set to 1 to see tracebacks of expected errors too

# ---------------------------------------------------------------------------------------------------
# consoles: created per call, so tests that swap sys.stdout/sys.stderr see the output


LOG_WIDTH = 10_000  # columns of stdout off a terminal: wider than any table fedlora prints


def console():
    """stdout. Off a terminal (a log file, a pipe) there is no width to fit: Rich would squeeze a table into
    80 columns and cut its cells (`accu…`, `0.48…`), so every table is printed whole."""
    from rich.console import Console

    # soft_wrap: a line longer than the terminal is left to the terminal, never broken by Rich, so paths
    # and commands can be copied whole (tables still fit their cells to a terminal's width).
    out = Console(soft_wrap=True)
    if not out.is_terminal:
        out = Console(soft_wrap=True, width=max(out.width, LOG_WIDTH))
    return out


def print_line(text: str, out: Any = None) -> None:
    """A line meant for copying (a path, a command): printed as it is — no wrapping, no markup, no colour."""
    (out or console()).print(text, soft_wrap=True, markup=False, highlight=False)


def print_path(label: str, path: Any) -> None:
    """`label: path` on one line (`print_line`)."""
    print_line(f"{label}: {path}")


def reporter(
    *, log_every: int = DEFAULT_LOG_EVERY, report_to: Sequence[str] | None = None, transient: bool = False
):
    """The progress object every command hands the core: THE place where the display is chosen.

    Rich bars when stderr is a terminal; plain lines otherwise (nohup, SLURM, `| tee`), flushed as they
    come. Trackers from --report-to listen to the same events. Use it as a context manager.
    """
    from fedlora_cli.progress import PlainProgress, Reporter, RichProgress
    from fedlora_cli.trackers import make_trackers

    trackers = make_trackers(report_to)
    display = RichProgress(err_console(), transient=transient) if sys.stderr.isatty() else PlainProgress()
    return build(lambda: Reporter(display, trackers, log_every))


def err_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    from rich.markup import escape

    # The message is plain text (it may hold `fedlora[plot]` or paths with brackets): escape it.
    err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# the reference scripts' flags, accepted as hidden aliases

# Flags whose name changed beyond `_` -> `-`. Values: the new flag, or (new flag, value) for a switch
# that became an option.
LEGACY_FLAGS: dict[str, str | tuple[str, str]] = {
    "--task_name": "--task",
    "--shard_dir": "--shards",
    "--per_device_train_batch_size": "--batch-size",
    "--per_device_eval_batch_size": "--eval-batch-size",
    "--num_train_epochs": "--epochs",
    "--num_clients": "--clients",
    "--do_train": "--train",
    "--do_eval": "--eval",
    "--skip_svd": ("--aggregation", "naive"),
    "--force": "--overwrite",  # `fedlora shard`'s first name for it
}


def _option_index(command: Any) -> tuple[set[str], set[str]]:
    """All option names of a click command, and those that take several values (list options)."""
    names: set[str] = set()
    multi: set[str] = set()
    for param in command.params:
        opts = [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
        names.update(opts)
        if getattr(param, "multiple", False):
            multi.update(getattr(param, "opts", []))
    return names, multi


def rewrite_legacy_args(args: Sequence[str], known: set[str], multi: set[str]) -> list[str]:
    """Turn the argparse scripts' command lines into fedlora's.

    `--lora_r 8` -> `--lora-r 8`; renamed flags via LEGACY_FLAGS; `--skip_svd` -> `--aggregation naive`;
    and argparse's `nargs="+"` style (`--adapters a b c`) -> repeated options, which Typer expects.
    Only names the command actually has are rewritten, so unknown flags still fail loudly.
    """
    out: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if not arg.startswith("--"):
            out.append(arg)
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if name not in known:
            legacy = LEGACY_FLAGS.get(name)
            if isinstance(legacy, tuple) and legacy[0] in known:
                out.extend(legacy)
                i += 1
                continue
            if isinstance(legacy, str) and legacy in known:
                name = legacy
            elif "_" in name and name.replace("_", "-") in known:
                name = name.replace("_", "-")
        if name in multi and not eq:
            # argparse nargs="+": every following non-flag token is one more value
            j = i + 1
            values = []
            while j < len(args) and not (args[j].startswith("-") and not _is_number(args[j])):
                values.append(args[j])
                j += 1
            for v in values or [None]:
                out.extend([name] if v is None else [name, v])
            i = j
            continue
        out.append(f"{name}={value}" if eq else name)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("fedlora_argv", default=None)


# ---------------------------------------------------------------------------------------------------
# options from a TOML file (--config), and options as a mapping (sweep cells): the same keys either way

CONFIG_OPTION = "--config"


def option_params(command: Any) -> dict[str, Any]:
    """Long option names (without `--`) -> the click parameter they set. `--config` and `--help` excluded."""
    out: dict[str, Any] = {}
    for param in command.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--") and opt not in (CONFIG_OPTION, "--help"):
                out[opt[2:]] = param
    return out


def options_to_defaults(command: Any, options: dict[str, Any], source: str) -> dict[str, Any]:
    """A mapping of long option names to values -> click's default_map (parameter name -> value).

    Keys are the long option names (`learning-rate`, also `learning_rate`); an unknown key is an error
    naming it, so a typo never silently falls back to a default.
    """
    params = option_params(command)
    out: dict[str, Any] = {}
    for key, value in options.items():
        param = params.get(str(key)) or params.get(str(key).replace("_", "-"))
        if param is None:
            close = sorted(n for n in params if n.split("-")[0] == str(key).replace("_", "-").split("-")[0])
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(
                f"{source}: unknown option {key!r} for `fedlora {command.name}`{hint}; keys are the long "
                f"option names of `fedlora {command.name} --help`, e.g. learning-rate"
            )
        if isinstance(value, dict):
            raise InputError(f"{source}: {key!r} is a table; give option values only (key = value)")
        many = getattr(param, "multiple", False)
        if many and not isinstance(value, list):
            value = [value]
        for item in value if many else [value]:
            problem = _toml_type_problem(param, item)
            if problem is not None:
                flag = param.opts[0]
                raise InputError(
                    f"{source}: invalid value for '{flag}': {key} = {_toml_repr(value)}: {problem}"
                )
        out[param.name] = value
    return out


def _toml_type_problem(param: Any, value: Any) -> str | None:
    """Why a --config value cannot be the option's value (None: it can). Click would convert 2.5 to 2 and
    true to 1 for an integer; a file must say what it means."""
    from typer.core import click

    kind = param.type
    if isinstance(value, list | dict):
        return (
            "give one value, not a list or table"
            if not isinstance(value, dict)
            else "give a value, not a table"
        )
    if getattr(param, "is_flag", False) or isinstance(kind, click.types.BoolParamType):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(kind, click.types.IntParamType):
        return None if type(value) is int else "must be a whole number"
    if isinstance(kind, click.types.FloatParamType):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        return None if ok else "must be a number"
    if isinstance(kind, click.Choice):
        return None if value in kind.choices else f"must be one of {', '.join(map(str, kind.choices))}"
    if isinstance(kind, click.types.StringParamType):
        return None if isinstance(value, str) else "must be a text (in quotes)"
    return None


def _toml_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_toml(path: str | os.PathLike, what: str = "--config", max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A TOML file as a dict, or one clear line saying what is wrong with it.

    Only a regular file of at most `max_bytes` (1 MiB: an options file is a few hundred bytes) is read, so
    `--config /dev/zero`, a FIFO or a huge file is refused instead of read until memory runs out.
    """
    import stat

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; the checks below then refuse it
        fd = os.open(os.path.expanduser(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder; give a .toml file") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise InputError(f"{what} {path} is a folder; give a .toml file")
        if not stat.S_ISREG(kind):
            raise InputError(
                f"{what} {path} is not a regular file (a device, a pipe or a socket); give a .toml file"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise InputError(
            f"{what} {path} is larger than {max_bytes // 1024} KiB; an options file is a few lines"
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid TOML ({e})") from None


def _load_config(ctx: Any, param: Any, value: str | None) -> None:
    """--config: the file's options become defaults, so the command line overrides them (click's
    default_map)."""
    if not value or ctx.resilient_parsing:
        return
    defaults = options_to_defaults(ctx.command, load_toml(value), f"--config {value}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def options_to_args(command: Any, options: dict[str, Any], source: str = "sweep") -> list[str]:
    """A mapping of long option names to values -> the command-line arguments that say the same.

    Used by sweeps, so that each run's run.json holds a full, copy-pasteable command line.
    """
    params = option_params(command)
    args: list[str] = []
    for key, value in options.items():
        options_to_defaults(command, {key: value}, source)  # the same checks as --config
        param = params.get(str(key)) or params[str(key).replace("_", "-")]
        flag = param.opts[0]
        if value is None:
            continue
        if getattr(param, "is_flag", False):
            if param.secondary_opts:
                args.append(flag if value else param.secondary_opts[0])
            elif value:
                args.append(flag)
            continue
        for item in value if isinstance(value, list) else [value]:
            args += [flag, str(item)]
    return args


class FedloraCommand(TyperCommand):
    """A Typer command that also takes `--config FILE.toml` and the reference scripts' flag names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from typer.core import TyperOption

        super().__init__(*args, **kwargs)
        self.params.append(
            TyperOption(
                param_decls=[CONFIG_OPTION],
                default=None,
                is_eager=True,  # read before the other options, which then find its values as defaults
                expose_value=False,
                callback=_load_config,
                metavar="FILE.toml",
                help="options from a TOML file (keys: the long option names, e.g. learning-rate = 2e-3); "
                "options given on the command line override it",
            )
        )

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _ARGV.set(["fedlora", ctx.info_name, *args])  # exactly as typed, for run.json
        known, multi = _option_index(self)
        args = rewrite_legacy_args(args, known, multi)
        if "--resume" in known:
            args = _bare_resume(args)
        return super().parse_args(ctx, args)


RESUME_NAMED = "."  # `--resume` with no RUN: the run that --run-name / --output-dir name


def _bare_resume(args: list[str]) -> list[str]:
    """`--resume RUN` takes a value; a bare `--resume` (the older form) means RESUME_NAMED."""
    out = []
    for i, arg in enumerate(args):
        bare = arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-"))
        out.append(f"--resume={RESUME_NAMED}" if bare else arg)
    return out


class FedloraGroup(TyperGroup):
    """The app's group: the error boundary for expected failures, Ctrl-C and SIGTERM."""

    def invoke(self, ctx: Any) -> Any:
        from fedlora_cli import termination

        with termination.sigterm_as_interrupt():  # SIGTERM stops every command as Ctrl-C does
            try:
                return super().invoke(ctx)
            except FedloraError as e:
                if os.environ.get(DEBUG_ENV):
                    raise
                _fail(str(e), e.exit_code, interrupted=isinstance(e, Interrupted))
            except OSError as e:  # an I/O failure no layer below named more precisely: still one line
                if os.environ.get(DEBUG_ENV):
                    raise
                _fail(io_message("access", e.filename, e), 1)
            except (click.BadParameter, click.NoSuchOption) as e:  # a bad option value: one line too
                if os.environ.get(DEBUG_ENV):
                    raise
                _fail(e.message if isinstance(e, OptionError) else _usage_line(e), 2)
            except KeyboardInterrupt:
                if os.environ.get(DEBUG_ENV):
                    raise
                message = "interrupted: stopped before finishing (files are written whole or not at all)"
                _fail(message, Interrupted.exit_code, interrupted=True)


def _usage_line(e: Any) -> str:
    """Click's message for a bad option, on one line, with where to look."""
    command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "fedlora"
    return f"{' '.join(e.format_message().split())} (see `{command} -h`)"


def _fail(message: str, code: int, *, interrupted: bool = False) -> None:
    """One red line and the exit code; after a SIGTERM, exit code 143 and the reason said as such."""
    from fedlora_cli import termination

    if termination.received():
        code = termination.EXIT_CODE
        if interrupted:
            message = termination.reword(message)
    print_error(message)
    raise typer.Exit(code) from None


T = TypeVar("T")


def build(factory: Callable[[], T]) -> T:
    """Build a frozen config; its ValueError (a bad value) becomes a usage error: one line, exit 2."""
    try:
        return factory()
    except ValueError as e:
        raise InputError(str(e)) from None


def split_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--task a,b` and `--task a --task b` alike."""
    out: list[str] = []
    for v in values or ():
        out.extend(part.strip() for part in v.split(",") if part.strip())
    return tuple(out)


def complete_task(incomplete: str) -> list[str]:
    return [t for t in task_names() if t.startswith(incomplete.lower())]


def argv() -> list[str]:
    """The command line of this invocation, as the user typed it (recorded in run.json)."""
    return _ARGV.get() or list(sys.argv)


def complete_run(ctx: Any, incomplete: str) -> list[str]:
    """Run names under the command's root (`--root`, or `--output-root`) for shell completion."""
    from fedlora_cli.config import OutputSpec
    from fedlora_cli.runs.query import run_names

    root = ctx.params.get("root") or ctx.params.get("output__root") or OutputSpec().root
    return run_names(root, incomplete)


# ---------------------------------------------------------------------------------------------------
# options of the terminal, not of any config (the config's own come from its fields: _options.py)


def _model_from_size(size: str, given: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """`--model-size base|large` means roberta-<size>, unless --model is given too (--model wins)."""
    if ("model", "name") in given:
        return {}
    return {("model", "name"): build(lambda: model_from_size(size))}


MODEL_SIZE = Extra(
    "model_size",
    Annotated[
        str | None,
        typer.Option(
            "--model-size",
            help="base or large: shorthand for --model roberta-<size>",
            rich_help_panel="Model",
        ),
    ],
    apply=_model_from_size,
)
LOG_EVERY = Extra(
    "log_every",
    Annotated[
        int,
        typer.Option(
            "--log-every",
            rich_help_panel="Output",
            help="report the training loss every N optimizer steps (plain log lines, trackers); 0: never",
        ),
    ],
    DEFAULT_LOG_EVERY,
)


def complete_tracker(incomplete: str) -> list[str]:
    from fedlora_cli.trackers import TRACKERS

    return [t for t in TRACKERS if t.startswith(incomplete.lower())]


REPORT_TO = Extra(
    "report_to",
    Annotated[
        list[str] | None,
        typer.Option(
            "--report-to",
            autocompletion=complete_tracker,
            rich_help_panel="Output",
            help="log metrics and config to tensorboard, mlflow and/or wandb (comma-"
            "separated or repeated; each an extra: pip install 'fedlora\\[mlflow]')",
        ),
    ],
)


def reference_flag(flag: str) -> Extra:
    """A switch the reference scripts passed that fedlora does anyway (`--do_train` …): accepted, hidden."""
    name = "reference_" + flag.removeprefix("--").replace("-", "_")
    return Extra(
        name,
        Annotated[bool, typer.Option(flag, hidden=True, help="accepted for the reference scripts")],
        True,
    )


def summary_table(title: str, rows: Sequence[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, format_value(value))
    return table


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def metric_rows(metrics: dict[str, float]) -> list[tuple[str, Any]]:
    return [(name, value) for name, value in metrics.items()]


def show_run_result(command: str, result: Any) -> None:
    """The closing table of train / baseline / eval, and where the output went."""
    rows: list[tuple[str, Any]] = [("task", result.task), ("device", f"{result.device}, {result.precision}")]
    if result.total_params:
        rows.append(("parameters", f"{result.trainable_params:,} trainable of {result.total_params:,}"))
    t = result.training
    if t is not None:
        rows += [
            ("train examples", t.examples),
            ("steps", t.steps),
            ("train loss (mean / last epoch)", f"{t.loss:.4f} / {t.last_loss:.4f}"),
            ("train time", f"{t.seconds:.1f} s"),
            (
                "throughput",
                f"{t.samples_per_second:.1f} samples/s, {t.tokens_per_second:,.0f} tokens/s "
                f"({t.padded_tokens_per_second:,.0f} incl. padding)",
            ),
        ]
    e = result.evaluation
    if e is not None:
        rows.append(("eval examples", e.examples))
        rows += metric_rows(e.metrics)
    console().print(summary_table(f"fedlora {command}", rows))
    if result.adapter_dir is not None and command != "eval":
        print_path("adapter", result.adapter_dir)
    if result.run_dir is not None:
        print_path("run", result.run_dir)
