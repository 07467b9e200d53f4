"""Frozen settings per concern, shared by the CLI, the Flower apps and tests; one source of defaults.

Every check lives in `__post_init__` and raises ValueError naming the bad value; the CLI turns that
into a usage error (exit 2). Nothing here imports torch, so `fedlora --help` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli.tasks import get_task

# Short names users type, mapped to hub ids. Anything else is taken as a hub id or a local folder.
MODEL_ALIASES = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
}
PRECISIONS = ("auto", "fp32", "bf16")
AGGREGATIONS = ("svd", "naive")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


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


@dataclass(frozen=True)
class ModelSpec:
    """Which pretrained encoder to build, and where it runs."""

    name: str = "roberta-base"  # short name, hub id, or a local folder
    cache_dir: str | None = None  # Hugging Face cache (models and hub datasets); None: HF's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "--model must not be empty")
        ok = self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        _check(ok, f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")

    @property
    def is_local(self) -> bool:
        return os.path.isdir(os.path.expanduser(self.name))

    @property
    def resolved(self) -> str:
        """What `from_pretrained` receives: an absolute folder, or a hub id."""
        if self.is_local:
            return str(Path(self.name).expanduser().resolve())
        return MODEL_ALIASES.get(self.name, self.name)

    @property
    def short_name(self) -> str:
        """Used in run-folder names: `runs/<task>_<short_name>/`."""
        return Path(self.name.rstrip("/\\")).name or "model"


@dataclass(frozen=True)
class DataSpec:
    """Which GLUE task, from where, and how it is cut and tokenized (options as in HF's run_glue.py)."""

    task: str
    data_dir: str | None = None  # original GLUE layout (SST-2/train.tsv …); None: the hub
    max_seq_length: int = 128  # tokens; longer inputs are truncated
    max_train_samples: int | None = None  # first N training examples (file order)
    max_eval_samples: int | None = None  # first N examples of each eval split
    cache_dir: str | None = None  # tokenized cache; None: default_cache_dir()

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)
        _check(self.max_seq_length >= 8, f"--max-seq-length must be >= 8, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")

    @property
    def glue_task(self):
        return get_task(self.task)

    @property
    def tokenized_cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter: ΔW = (alpha / r) · B A on each target module."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(self.r >= 1, f"--lora-r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"--lora-alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "--target-modules must name at least one module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class TrainSpec:
    """One local training run: AdamW, linear schedule with warmup, clipping, optional bf16 autocast."""

    epochs: float = 3.0  # passes over the (client's) data; fractions allowed
    batch_size: int = 32  # examples per optimizer step
    learning_rate: float = 5e-4  # peak, after warmup; 5e-4 suits LoRA, use ~2e-5 for full fine-tuning
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # share of the steps spent warming up linearly
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16 where the hardware has it natively, else fp32
    seed: int = 42
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    # Padded tokens per forward/backward pass: a larger batch is split into passes whose gradients add up
    # to the batch's (the same optimizer step; activation memory bounded by this). None: one pass.
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        _check(
            self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            f"--max-tokens must be >= 1, got {self.max_tokens}",
        )


@dataclass(frozen=True)
class OutputSpec:
    """Where a run is written: `<root>/<task>_<model>/<run_name>/`, or exactly `output_dir`."""

    root: str = "runs"
    run_name: str | None = None  # None: a timestamp
    output_dir: str | None = None  # overrides root/run_name entirely
    overwrite: bool = False  # replace an existing, non-empty run folder

    def __post_init__(self) -> None:
        if self.run_name is not None:
            bad = not self.run_name or "/" in self.run_name or self.run_name in (".", "..")
            _check(not bad, f"--run-name must be a plain folder name, got {self.run_name!r}")


@dataclass(frozen=True)
class TrainConfig:
    """`fedlora train`: centralised LoRA fine-tuning."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    eval_batch_size: int = 64
    do_eval: bool = True
    adapter_output_dir: str | None = None  # default: <run>/adapter
    init_adapter: str | None = None  # start from an existing adapter instead of a fresh one

    def __post_init__(self) -> None:
        _check(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")


@dataclass(frozen=True)
class BaselineConfig:
    """`fedlora baseline`: full fine-tuning, or zero-shot evaluation with `do_train=False`."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(learning_rate=2e-5))
    output: OutputSpec = field(default_factory=OutputSpec)
    eval_batch_size: int = 64
    do_train: bool = True
    save_model: bool = False  # full weights are large; only written when asked

    def __post_init__(self) -> None:
        _check(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")


@dataclass(frozen=True)
class EvalConfig:
    """`fedlora eval`: an adapter (or the plain model) on the task's dev split(s)."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    adapter: str | None = None
    eval_batch_size: int = 64
    precision: str = "auto"
    seed: int = 42  # seeds the head of a plain model, so zero-shot numbers are reproducible
    output_json: str | None = None

    def __post_init__(self) -> None:
        _check(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        _check(
            self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"
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


SHARD_MODES = ("iid", "overlap", "category", "category_overlap", "dirichlet", "quantity")


@dataclass(frozen=True)
class ShardConfig:
    """`fedlora shard`: split a task's training set across K clients."""

    task: str
    clients: int  # K
    mode: str = "iid"
    seed: int = 42
    out: str | None = None  # None: shards/<task>_<mode>_k<clients>
    data_dir: str | None = None  # original GLUE layout; None: the hub
    cache_dir: str | None = None  # Hugging Face cache for hub datasets
    max_train_samples: int | None = None  # shard only the first N training examples
    overlap_ratio: float = 0.1  # overlap modes: share of each client's data drawn from a shared pool
    category_key: str = "label"  # category modes: column whose values are the categories
    dirichlet_alpha: float = 0.5  # dirichlet / quantity: concentration; smaller = more skew
    min_size: int = 1  # every client gets at least this many examples
    bin_stsb: bool = True  # STS-B: stratify by 0.2-wide score bins (the reference's behaviour)
    force: bool = False  # write into an existing, non-empty --out
    plot: str | None = None  # PNG of the per-client label distribution

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)
        _check(self.clients >= 1, f"--clients must be >= 1, got {self.clients}")
        _check(self.mode in SHARD_MODES, f"--mode must be one of {', '.join(SHARD_MODES)}, got {self.mode!r}")
        _check(
            0.0 <= self.overlap_ratio < 1.0, f"--overlap-ratio must be in [0, 1), got {self.overlap_ratio}"
        )
        _check(self.dirichlet_alpha > 0, f"--dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        _check(self.min_size >= 1, f"--min-size must be >= 1, got {self.min_size}")
        mts = self.max_train_samples
        _check(mts is None or mts >= 1, f"--max-train-samples must be >= 1, got {mts}")
        _check(self.out is None or bool(self.out.strip()), "--out must name a folder")
        plot_ok = self.plot is None or Path(self.plot).suffix.lower() in (".png", ".pdf", ".svg")
        _check(plot_ok, f"--plot must end in .png, .pdf or .svg, got {self.plot!r}")

    @property
    def out_dir(self) -> str:
        """--out, or a folder named after what it holds, so runs of different splits never collide."""
        return self.out or f"shards/{self.task}_{self.mode}_k{self.clients}"


ENGINES = ("local", "flower")


@dataclass(frozen=True)
class AggregationSpec:
    """How client adapters become one: `svd` (truncated average of ΔW) or `naive` (mean of A and of B)."""

    method: str = "svd"
    rank: int | None = None  # svd: rank R of the result; None = the clients' LoRA rank
    alpha: float | None = None  # lora_alpha of the result; None = R (scaling 1), as the reference

    def __post_init__(self) -> None:
        _check(
            self.method in AGGREGATIONS,
            f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.method!r}",
        )
        _check(self.rank is None or self.rank >= 1, f"--svd-rank must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")

    def resolved_rank(self, client_rank: int) -> int:
        return self.rank if self.rank is not None else client_rank

    def resolved_alpha(self, client_rank: int) -> float:
        return self.alpha if self.alpha is not None else float(self.resolved_rank(client_rank))


@dataclass(frozen=True)
class RoundsConfig:
    """`fedlora rounds`: multi-round FedAvg of LoRA adapters over shards."""

    data: DataSpec
    shards: str  # folder of client_<i>.json manifests
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=1.0))  # epochs = local epochs
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    rounds: int = 5
    init_adapter: str | None = None  # the round-1 global adapter; None: fresh LoRA from the seed
    resume: bool = False
    eval_each_round: bool = True  # evaluate the global adapter after every round (always after the last)
    eval_clients: bool = False  # also evaluate each client's adapter (costly: one dev pass per client)
    eval_batch_size: int = 64
    clients_per_round: int | None = None  # sample this many clients per round (seeded); None: all
    fraction_fit: float | None = None  # or this share of the clients (at least one)
    engine: str = "local"  # local: one process; flower: Flower's simulation engine
    min_clients: int | None = None  # a round needs this many replies (default: all selected)
    client_cpus: float = 1.0  # flower engine: CPUs per virtual client
    client_gpus: float = 0.0  # flower engine: GPU share per virtual client
    round_timeout: float | None = None  # flower engine: seconds to wait for a round's replies; None: all

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        _check(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        cpr, ff = self.clients_per_round, self.fraction_fit
        _check(cpr is None or cpr >= 1, f"--clients-per-round must be >= 1, got {cpr}")
        _check(ff is None or 0 < ff <= 1, f"--fraction-fit must be in (0, 1], got {ff}")
        _check(cpr is None or ff is None, "give --clients-per-round or --fraction-fit, not both")
        _check(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        _check(
            self.min_clients is None or self.min_clients >= 1,
            f"--min-clients must be >= 1, got {self.min_clients}",
        )
        _check(self.client_cpus > 0, f"--client-cpus must be > 0, got {self.client_cpus}")
        _check(self.client_gpus >= 0, f"--client-gpus must be >= 0, got {self.client_gpus}")
        rt = self.round_timeout
        _check(rt is None or rt > 0, f"--round-timeout must be > 0 seconds, got {rt}")
        if self.resume:
            named = self.output.run_name is not None or self.output.output_dir is not None
            _check(named, "--resume needs the --run-name (or --output-dir) of the run to continue")

    def clients_in_round(self, total: int) -> int:
        """How many of `total` clients train each round."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, total)
        if self.fraction_fit is not None:
            return max(1, round(self.fraction_fit * total))
        return total


@dataclass(frozen=True)
class MergeConfig:
    """`fedlora merge`: one-shot FedAvg of adapters that already exist."""

    adapters: tuple[str, ...]
    save_adapter: str
    weights: tuple[float, ...] | None = None  # explicit client weights
    shard_manifests: tuple[str, ...] | None = None  # or example counts from client_<i>.json files
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    task: str | None = None  # check the adapters' heads against this task
    model: str | None = None  # check the adapters against this base model (shapes)
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        _check(len(self.adapters) >= 1, "--adapters needs at least one adapter folder")
        if self.task is not None:
            object.__setattr__(self, "task", get_task(self.task).name)
        _check(
            self.weights is None or self.shard_manifests is None,
            "give --weights or --shard-manifests, not both",
        )
        for name, attr in (("--weights", "weights"), ("--shard-manifests", "shard_manifests")):
            values = getattr(self, attr)
            if values is not None:
                object.__setattr__(self, attr, tuple(values))
                n, k = len(values), len(self.adapters)
                _check(n == k, f"{name} has {n} values for {k} adapters")
        if self.weights is not None:
            bad = [w for w in self.weights if not w > 0]
            _check(not bad, f"--weights must all be > 0, got {bad[0] if bad else ''}")
