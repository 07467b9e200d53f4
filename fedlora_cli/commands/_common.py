"""What every command shares: option types, the reference scripts' flag aliases, the error boundary, output."""

from __future__ import annotations

import contextvars
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, OutputSpec, TrainSpec, model_from_size
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.tasks import task_names

DEBUG_ENV = "FEDLORA_DEBUG"  # set to 1 to see tracebacks of expected errors too

# ---------------------------------------------------------------------------------------------------
# consoles: created per call, so tests that swap sys.stdout/sys.stderr see the output


def console():
    from rich.console import Console

    return Console()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


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


class FedloraCommand(TyperCommand):
    """A Typer command that also understands the reference scripts' flag names."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _ARGV.set(["fedlora", ctx.info_name, *args])  # exactly as typed, for run.json
        known, multi = _option_index(self)
        return super().parse_args(ctx, rewrite_legacy_args(args, known, multi))


class FedloraGroup(TyperGroup):
    """The app's group: the error boundary for expected failures."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except FedloraError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            print_error(str(e))
            raise typer.Exit(e.exit_code) from None


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
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run folder")]


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
    out = console()
    out.print(summary_table(f"fedlora {command}", rows))
    if result.adapter_dir is not None and command != "eval":
        out.print(f"adapter: {result.adapter_dir}")
    if result.run_dir is not None:
        out.print(f"run: {result.run_dir}")
