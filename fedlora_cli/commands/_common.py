"""What every command shares: option types, the reference scripts' flag aliases, the error boundary, output."""

from __future__ import annotations

import contextvars
import enum
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, OutputSpec, TrainSpec, model_from_size
from fedlora_cli.errors import FedloraError, InputError, Interrupted, io_message
from fedlora_cli.progress import DEFAULT_LOG_EVERY
from fedlora_cli.strategies.registry import METHODS
from fedlora_cli.tasks import task_names

DEBUG_ENV = "FEDLORA_DEBUG"  # set to 1 to see tracebacks of expected errors too

# ---------------------------------------------------------------------------------------------------
# consoles: created per call, so tests that swap sys.stdout/sys.stderr see the output


LOG_WIDTH = 10_000  # columns of stdout off a terminal: wider than any table fedlora prints


def console(*, wide: bool = False):
    """stdout. Off a terminal (a log file, a pipe) there is no width to fit: Rich would squeeze a table into 80
    columns and cut its cells (`accu…`, `0.48…`), so every table is printed whole. (`wide`: kept for callers;
    every table is printed whole now.)"""
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
        if getattr(param, "multiple", False) and not isinstance(value, list):
            value = [value]
        out[param.name] = value
    return out


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
    """--config: the file's options become defaults, so the command line overrides them (click's default_map)."""
    if not value or ctx.resilient_parsing:
        return
    defaults = options_to_defaults(ctx.command, load_toml(value), f"--config {value}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def options_to_args(command: Any, options: dict[str, Any]) -> list[str]:
    """A mapping of long option names to values -> the command-line arguments that say the same.

    Used by sweeps, so that each run's run.json holds a full, copy-pasteable command line.
    """
    params = option_params(command)
    args: list[str] = []
    for key, value in options.items():
        options_to_defaults(command, {key: value}, "sweep")  # the same checks as --config
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
            except KeyboardInterrupt:
                if os.environ.get(DEBUG_ENV):
                    raise
                message = "interrupted: stopped before finishing (files are written whole or not at all)"
                _fail(message, Interrupted.exit_code, interrupted=True)


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


def resolve_model(model: str | None, model_size: str | None) -> str:
    """`--model` wins; the reference's `--model-size base|large` means roberta-base / roberta-large."""
    if model:
        return model
    if model_size:
        return build(lambda: model_from_size(model_size))
    return ModelSpec().name


def model_spec(model: str | None, model_size: str | None, cache_dir: str | None, device: str) -> ModelSpec:
    return ModelSpec(resolve_model(model, model_size), cache_dir, device)


def lora_spec(r: int, alpha: float, dropout: float, target_modules: Sequence[str] | None) -> LoraSpec:
    return LoraSpec(r, alpha, dropout, split_list(target_modules) or LoraSpec().target_modules)


def split_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--target-modules query,value` and `--target-modules query --target-modules value` alike."""
    out: list[str] = []
    for v in values or ():
        out.extend(part.strip() for part in v.split(",") if part.strip())
    return tuple(out)


def complete_task(incomplete: str) -> list[str]:
    return [t for t in task_names() if t.startswith(incomplete.lower())]


def argv() -> list[str]:
    """The command line of this invocation, as the user typed it (recorded in run.json)."""
    return _ARGV.get() or list(sys.argv)


# ---------------------------------------------------------------------------------------------------
# option types, defined once. Defaults come from the frozen configs (one source of defaults).

_MODEL, _LORA, _TRAIN, _OUT = ModelSpec(), LoraSpec(), TrainSpec(), OutputSpec()
_DATA = DataSpec(task="sst2")

TaskOpt = Annotated[
    str,
    typer.Option("--task", "-t", help="GLUE task: " + ", ".join(task_names()), autocompletion=complete_task),
]
OptionalTaskOpt = Annotated[
    str | None,
    typer.Option("--task", "-t", help="GLUE task: " + ", ".join(task_names()), autocompletion=complete_task),
]


def complete_run(ctx: Any, incomplete: str) -> list[str]:
    """Run names under the command's root (`--root`, or `--output-root`) for shell completion."""
    from fedlora_cli.runs.query import run_names

    root = ctx.params.get("root") or ctx.params.get("output_root") or OutputSpec().root
    return run_names(root, incomplete)


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="roberta-base, roberta-large, any hub id, or a local model folder \\[default: roberta-base]",
    ),
]
ModelSizeOpt = Annotated[
    str | None, typer.Option("--model-size", help="base or large: shorthand for --model roberta-<size>")
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        "--data-dir", help="folder in the original GLUE layout (SST-2/train.tsv …); default: the hub"
    ),
]
CacheDirOpt = Annotated[
    str | None, typer.Option("--cache-dir", help="Hugging Face cache for models and hub datasets")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
MaxSeqLenOpt = Annotated[
    int, typer.Option("--max-seq-length", help="tokens per example; longer is truncated")
]
MaxTrainOpt = Annotated[
    int | None, typer.Option("--max-train-samples", help="use only the first N training examples")
]
MaxEvalOpt = Annotated[
    int | None, typer.Option("--max-eval-samples", help="use only the first N examples of each dev split")
]
LoraROpt = Annotated[int, typer.Option("--lora-r", help="LoRA rank r")]
LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha: ΔW is scaled by alpha / r")]
LoraDropoutOpt = Annotated[float, typer.Option("--lora-dropout", help="dropout on the LoRA input")]
TargetModulesOpt = Annotated[
    list[str] | None,
    typer.Option("--target-modules", help="modules that get LoRA, comma-separated \\[default: query,value]"),
]
EpochsOpt = Annotated[float, typer.Option("--epochs", help="passes over the training data")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="examples per optimizer step")]
LearningRateOpt = Annotated[float, typer.Option("--learning-rate", "--lr", help="peak learning rate")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (matrices only)")]
WarmupOpt = Annotated[float, typer.Option("--warmup-ratio", help="share of steps with linear warmup")]
MaxGradNormOpt = Annotated[float, typer.Option("--max-grad-norm", help="gradient clipping; 0 turns it off")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16 where the hardware has it), fp32 or bf16")
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        help="padded tokens per forward/backward pass: larger batches are split (same step, less memory)",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="seeds the head init, dropout and data order")]
EvalBatchSizeOpt = Annotated[int, typer.Option("--eval-batch-size", help="examples per evaluation batch")]
OutputRootOpt = Annotated[
    str, typer.Option("--output-root", help="runs go to <root>/<task>_<model>/<run-name>")
]
RunNameOpt = Annotated[
    str | None, typer.Option("--run-name", help="the run's folder name \\[default: a timestamp]")
]
OutputDirOpt = Annotated[str | None, typer.Option("--output-dir", help="write the run exactly here instead")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace what fedlora wrote there before (never anything else)")
]


# sharding options, shared by `shard` and `rounds` (which can shard in memory)
def complete_mode(incomplete: str) -> list[str]:
    from fedlora_cli.config import SHARD_MODES

    return [m for m in SHARD_MODES if m.startswith(incomplete)]


MODE_HELP = (
    "iid (stratified), overlap, category, category_overlap, dirichlet (label skew) or quantity (size skew)"
)
OverlapRatioOpt = Annotated[
    float,
    typer.Option(
        "--overlap-ratio", help="overlap modes: share of each client's data from a shared pool, in [0, 1)"
    ),
]
CategoryKeyOpt = Annotated[
    str, typer.Option("--category-key", help="category modes: label, genre (MNLI, STS-B) or another column")
]
DirichletAlphaOpt = Annotated[
    float,
    typer.Option("--dirichlet-alpha", help="dirichlet / quantity: concentration > 0; smaller = more skew"),
]
MinSizeOpt = Annotated[int, typer.Option("--min-size", help="every client gets at least this many examples")]
BinStsbOpt = Annotated[
    bool, typer.Option("--bin-stsb/--no-bin-stsb", help="STS-B: stratify by 0.2-wide score bins")
]

# The federated methods, from the ONE registry: shown as choices in -h and completed by the shell.
Method = enum.Enum("Method", {name: name for name in METHODS}, type=str)  # type: ignore[misc]
AggregationOpt = Annotated[
    Method,
    typer.Option(
        "--aggregation",
        help="how client adapters become one: "
        + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    ),
]
SvdRankOpt = Annotated[
    int | None,
    typer.Option(
        "--svd-rank", help="svd: rank of the aggregated adapter \\[default: the largest client rank]"
    ),
]
AlphaOpt = Annotated[
    float | None,
    typer.Option(
        "--alpha", help="svd: lora_alpha of the aggregated adapter \\[default: keeps the clients' alpha/r]"
    ),
]
LogEveryOpt = Annotated[
    int,
    typer.Option(
        "--log-every",
        help="report the training loss every N optimizer steps (plain log lines, trackers); 0: never",
    ),
]


def method_name(value: Any) -> str:
    """An --aggregation value (the Method enum, or a plain string from library callers) as its name."""
    return value.value if isinstance(value, enum.Enum) else str(value)


def complete_tracker(incomplete: str) -> list[str]:
    from fedlora_cli.trackers import TRACKERS

    return [t for t in TRACKERS if t.startswith(incomplete.lower())]


ReportToOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--report-to",
        help="log metrics and config to tensorboard, mlflow and/or wandb (comma-separated or repeated; "
        "each an extra: pip install 'fedlora[mlflow]')",
        autocompletion=complete_tracker,
    ),
]


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
            ("throughput", f"{t.samples_per_second:.1f} samples/s, {t.tokens_per_second:,.0f} tokens/s "
                           f"({t.padded_tokens_per_second:,.0f} incl. padding)"),
        ]  # fmt: skip
    e = result.evaluation
    if e is not None:
        rows.append(("eval examples", e.examples))
        rows += metric_rows(e.metrics)
    console().print(summary_table(f"fedlora {command}", rows))
    if result.adapter_dir is not None and command != "eval":
        print_path("adapter", result.adapter_dir)
    if result.run_dir is not None:
        print_path("run", result.run_dir)


# ---------------------------------------------------------------------------------------------------
# differential privacy (client level, DP-FedAvg): `fedlora rounds`

DpClipOpt = Annotated[
    float | None,
    typer.Option(
        "--dp-clip",
        help="DP: clip each client's update to this L2 norm C (turns DP on, with --dp-noise-multiplier)",
    ),
]
DpNoiseOpt = Annotated[
    float | None,
    typer.Option(
        "--dp-noise-multiplier", help="DP: Gaussian noise of std z·C on the sum of the clipped updates"
    ),
]
DpDeltaOpt = Annotated[
    float | None,
    typer.Option("--dp-delta", help="DP: δ of the reported (ε, δ) \\[default: 1 / clients²]"),
]
DpWhereOpt = Annotated[
    str,
    typer.Option(
        "--dp-where", help="DP: who clips: server, or client (the server never receives an unclipped update)"
    ),
]
DpTargetOpt = Annotated[
    float | None,
    typer.Option("--dp-target-epsilon", help="DP: stop before a round that would spend more than this ε"),
]
DpSecretNoiseOpt = Annotated[
    bool,
    typer.Option(
        "--dp-secret-noise",
        help="DP: draw the noise from a secret key (kept in the run folder for --resume), not from --seed",
    ),
]
