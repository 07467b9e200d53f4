"""Frozen settings per concern, shared by the CLI, the Flower apps and tests; one source of defaults.

Every check lives in `__post_init__` and raises ValueError naming the bad value; the CLI turns that
into a usage error (exit 2). Nothing here imports torch, so `fedlora --help` stays fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli.sharding.registry import partitioner_names
from fedlora_cli.strategies.registry import get_method
from fedlora_cli.tasks import get_task

# Short names users type, mapped to hub ids. Anything else is taken as a hub id or a local folder.
MODEL_ALIASES = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
}
PRECISIONS = ("auto", "fp32", "bf16")


SEED_MAX = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds
MAX_COUNT = 2**31 - 1  # batch sizes, ranks, lengths: what numpy and torch index with
MAX_EPOCHS = 1000.0  # more passes than any fine-tuning needs; a typo'd 1e9 would run for centuries
MAX_ROUNDS = 100_000


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (bool is not a number here)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(flag: str, x: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    """`flag` is finite and in [low, high] (or (low, high] with `low_open`); the message names the value."""
    ok = _finite(x) and (x > low if low_open else x >= low) and x <= high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != math.inf:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{flag} must be a finite number {bound}, got {x}")


def _check_int(flag: str, x: Any, low: int, high: int = MAX_COUNT) -> None:
    ok = isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
    _check(ok, f"{flag} must be an integer in {low}..{high:,}, got {x}")


def check_seed(seed: Any, flag: str = "--seed") -> None:
    _check_int(flag, seed, 0, SEED_MAX)


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
        # the upper bound that matters is the model's positions: modeling.check_model_limits
        _check_int("--max-seq-length", self.max_seq_length, 8)
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
        # r <= the target modules' dimensions is checked once the model is built (check_lora_fits)
        _check(self.r >= 1, f"--lora-r must be >= 1, got {self.r}")
        _check(self.r <= MAX_COUNT, f"--lora-r must be <= {MAX_COUNT:,}, got {self.r}")
        _check(_finite(self.alpha) and self.alpha > 0, f"--lora-alpha must be > 0, got {self.alpha}")
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
        # --epochs is --local-epochs in `rounds`; the steps it gives are checked with the data (planned_steps)
        _check_number("--epochs", self.epochs, 0, MAX_EPOCHS, low_open=True)
        _check_int("--batch-size", self.batch_size, 1)
        _check_number("--learning-rate", self.learning_rate, 0, low_open=True)
        _check_number("--weight-decay", self.weight_decay, 0)
        _check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_number("--max-grad-norm", self.max_grad_norm, 0)
        _check(
            self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"
        )
        check_seed(self.seed)
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
        _check_int("--eval-batch-size", self.eval_batch_size, 1)


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
        _check_int("--eval-batch-size", self.eval_batch_size, 1)


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
    overwrite: bool = False  # replace an --output-json file that fedlora wrote before
    predictions: str | None = None  # folder for per-example predictions of the dev and test splits

    def __post_init__(self) -> None:
        _check_int("--eval-batch-size", self.eval_batch_size, 1)
        _check(
            self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"
        )
        check_seed(self.seed)


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
    the config's own checks run as usual, so a record that no longer makes sense fails with its message.
    """
    import dataclasses
    import types
    import typing

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


SHARD_MODES = partitioner_names()  # the partitioner registry is the one source of mode names


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
    overwrite: bool = False  # replace the fedlora shard folder (and plot) already at --out / --plot
    plot: str | None = None  # PNG of the per-client label distribution

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)
        _check(self.clients >= 1, f"--clients must be >= 1, got {self.clients}")
        _check(self.mode in SHARD_MODES, f"--mode must be one of {', '.join(SHARD_MODES)}, got {self.mode!r}")
        _check(
            0.0 <= self.overlap_ratio < 1.0, f"--overlap-ratio must be in [0, 1), got {self.overlap_ratio}"
        )
        _check(
            _finite(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
            f"--dirichlet-alpha must be a finite number > 0, got {self.dirichlet_alpha}",
        )
        _check(self.min_size >= 1, f"--min-size must be >= 1, got {self.min_size}")
        check_seed(self.seed)
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
    """The federated method (a name in `strategies.METHODS`) and the LoRA shapes it works with.

    Scaling convention: every client keeps the scaling s = lora_alpha / lora_r the user chose, whatever
    its rank (a client of rank r_i trains with alpha_i = s·r_i), and so does the aggregated adapter
    unless `alpha` says otherwise: a round never silently changes the step size of the next one.
    """

    method: str = "svd"
    rank: int | None = None  # svd: rank R of the aggregated adapter; None: the largest client rank
    alpha: float | None = None  # lora_alpha of the aggregated adapter; None: s·R (the clients' scaling)
    client_ranks: str | None = None  # "4,8,16" cycled over client ids, or a JSON file {"<id>": rank}
    # FedProx: μ/2·‖θ − θ_global‖² over the trained parameters, added to each client's loss
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        get_method(self.method)  # ValueError naming the choices
        _check(self.rank is None or self.rank >= 1, f"--svd-rank must be >= 1, got {self.rank}")
        check_aggregation_options(self.method, self.rank, self.alpha)
        _check(math.isfinite(self.prox_mu) and self.prox_mu >= 0,
               f"--prox-mu must be a finite number >= 0, got {self.prox_mu}")  # fmt: skip
        if self.client_ranks is not None and not self.client_ranks.strip().lower().endswith(".json"):
            parse_rank_list(self.client_ranks)

    def ranks_for(self, client_ids: Sequence[int], default: int) -> dict[int, int]:
        """Each client's LoRA rank: `default` (--lora-r) unless --client-ranks says otherwise."""
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


def _read_rank_file(path: str) -> dict[int, int]:
    import json

    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--client-ranks {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--client-ranks {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f'--client-ranks {path} must hold an object {{"<client id>": rank}}')
    table: dict[int, int] = {}
    for key, value in data.items():
        if not str(key).strip().isdigit() or type(value) is not int or value < 1:
            raise ValueError(f"--client-ranks {path}: {key!r}: {value!r} is not <client id>: <rank >= 1>")
        table[int(key)] = value
    return table


DP_WHERE = ("server", "client")


@dataclass(frozen=True)
class PrivacySpec:
    """Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018); off unless `clip` is set.

    Each client's update (its adapter state minus the broadcast, everything it sends) is clipped to L2
    norm `clip`; the server adds N(0, (noise_multiplier·clip)²) to the sum of the clipped updates and
    divides by the number of clients sampled. ε at `delta` comes from an RDP accountant (fedlora_cli.privacy).
    """

    clip: float | None = None  # C: L2 norm bound of one client's update; None: DP off
    noise_multiplier: float | None = None  # z: noise std on the sum = z·C
    delta: float | None = None  # δ of the (ε, δ) guarantee; None: 1 / clients²
    where: str = "server"  # who clips: server, or client (the server never receives an unclipped update)
    target_epsilon: float | None = None  # stop before a round that would spend more than this ε
    secret_noise: bool = False  # noise seeded from the OS's random source, not from --seed

    def __post_init__(self) -> None:
        on = self.clip is not None
        _check(on == (self.noise_multiplier is not None), "--dp-clip and --dp-noise-multiplier go together")
        if not on:
            for flag, value in (("--dp-delta", self.delta), ("--dp-target-epsilon", self.target_epsilon),
                                ("--dp-where", None if self.where == "server" else self.where),
                                ("--dp-secret-noise", self.secret_noise or None)):  # fmt: skip
                _check(value is None, f"{flag} needs --dp-clip and --dp-noise-multiplier")
            return
        c, z = self.clip, self.noise_multiplier
        _check(_number(c) and c > 0, f"--dp-clip must be a number > 0, got {c}")
        _check(_number(z) and math.isfinite(z) and z >= 0,
               f"--dp-noise-multiplier must be a finite number >= 0, got {z}")  # fmt: skip
        _check(math.isfinite(c) or z == 0,
               "--dp-clip inf needs --dp-noise-multiplier 0 (the noise std z·C would be infinite)")  # fmt: skip
        d = self.delta
        _check(d is None or (_number(d) and 0 < d < 1), f"--dp-delta must be in (0, 1), got {d}")
        _check(self.where in DP_WHERE, f"--dp-where must be server or client, got {self.where!r}")
        t = self.target_epsilon
        _check(t is None or (_number(t) and math.isfinite(t) and t > 0),
               f"--dp-target-epsilon must be a finite number > 0, got {t}")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    def delta_for(self, clients: int) -> float:
        """δ: --dp-delta, else 1/N². It must stay well below 1/N: publishing one randomly chosen client's
        update in the clear satisfies (0, 1/N)-DP, so δ = 1/N promises nothing; 1/N² keeps it N times lower."""
        return self.delta if self.delta is not None else 1.0 / clients**2


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class PartitionSpec:
    """`rounds` shards the data itself (the partitioners of `fedlora shard`); off unless `clients` is set.

    The manifests are written into the run folder (`shards/`), exactly as `fedlora shard` writes them.
    """

    clients: int | None = None  # K; None: the run reads --shards instead
    mode: str = "iid"  # iid, overlap, category, category_overlap, dirichlet, quantity (see `fedlora shard`)
    seed: int | None = None  # seeds the split; None: the run's --seed
    dirichlet_alpha: float = 0.5  # dirichlet / quantity: concentration; smaller = more skew
    overlap_ratio: float = 0.1  # overlap modes: share of each client's data drawn from a shared pool
    category_key: str = "label"  # category modes: the column whose values are the categories
    min_size: int = 1  # every client gets at least this many examples
    bin_stsb: bool = True  # STS-B: stratify by 0.2-wide score bins

    def __post_init__(self) -> None:
        _check(
            self.mode in SHARD_MODES,
            f"--partition must be one of {', '.join(SHARD_MODES)}, got {self.mode!r}",
        )
        if self.clients is not None:
            self.shard_config(DataSpec(task="sst2"), 0, "x")  # the same checks as `fedlora shard`

    def shard_config(
        self, data: DataSpec, run_seed: int, out: str, cache_dir: str | None = None
    ) -> ShardConfig:
        """What `fedlora shard` would be given to make these shards."""
        return ShardConfig(
            task=data.task, clients=self.clients or 0, mode=self.mode,
            seed=self.seed if self.seed is not None else run_seed, out=out, data_dir=data.data_dir,
            cache_dir=cache_dir, max_train_samples=data.max_train_samples, overlap_ratio=self.overlap_ratio,
            category_key=self.category_key, dirichlet_alpha=self.dirichlet_alpha, min_size=self.min_size,
            bin_stsb=self.bin_stsb,
        )  # fmt: skip


@dataclass(frozen=True)
class RoundsConfig:
    """`fedlora rounds`: multi-round FedAvg of LoRA adapters over shards (`shards`, or made in memory: `partition`)."""

    data: DataSpec
    shards: str  # folder of client_<i>.json manifests; "" when `partition` makes them
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=1.0))  # epochs = local epochs
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    rounds: int = 5
    init_adapter: str | None = None  # the round-1 global adapter; None: fresh LoRA from the seed
    resume: bool = False
    resume_from_round: int | None = None  # resume after this complete round, discarding the later ones
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
    privacy: PrivacySpec = field(default_factory=PrivacySpec)  # client-level DP; off by default
    partition: PartitionSpec = field(default_factory=PartitionSpec)  # shard in memory instead of --shards

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        _check(not (self.shards and self.partition.clients is not None),
               "give --shards DIR (made by fedlora shard) or --clients K (shard in memory), not both")  # fmt: skip
        _check_int("--eval-batch-size", self.eval_batch_size, 1)
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
        if self.resuming:
            named = self.output.run_name is not None or self.output.output_dir is not None
            _check(named, "--resume needs the --run-name (or --output-dir) of the run to continue")
        check_rounds_numbers(self)

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


def check_aggregation_options(method: str, rank: int | None, alpha: float | None) -> None:
    """Numbers of an aggregation: finite and in range, and never an option the method would ignore.

    (Kept apart from AggregationSpec so that the class can change without losing these checks.)
    """
    _check(
        rank is None or (isinstance(rank, int) and 1 <= rank <= MAX_COUNT),
        f"--svd-rank must be an integer >= 1, got {rank}",
    )
    _check(
        alpha is None or (_finite(alpha) and alpha > 0), f"--alpha must be a finite number > 0, got {alpha}"
    )
    ignored = [flag for flag, value in (("--svd-rank", rank), ("--alpha", alpha)) if value is not None]
    if ignored and not get_method(method).shapes_output:
        flags = " and ".join(ignored)
        raise ValueError(
            f"{flags} {'applies' if len(ignored) == 1 else 'apply'} to --aggregation svd only: {method} keeps "
            f"the clients' rank and alpha/r; drop {flags} or use svd"
        )


def check_rounds_numbers(config: RoundsConfig) -> None:
    """The numeric options of `rounds` that its own checks leave open: finite, and in range.

    (Kept apart from RoundsConfig so that the class can change without losing these checks.)
    """
    _check_int("--rounds", config.rounds, 1, MAX_ROUNDS)
    if config.clients_per_round is not None:
        _check_int("--clients-per-round", config.clients_per_round, 1)
    if config.min_clients is not None:
        _check_int("--min-clients", config.min_clients, 1)
    _check_number("--client-cpus", config.client_cpus, 0, low_open=True)
    _check_number("--client-gpus", config.client_gpus, 0)
    if config.round_timeout is not None:
        _check_number("--round-timeout", config.round_timeout, 0, low_open=True)
    if config.resume_from_round is not None:
        _check_int("--resume-from-round", config.resume_from_round, 0, config.rounds)


def clients_per_round_note(config: RoundsConfig, total: int) -> str | None:
    """The warning for a `--clients-per-round` above the number of clients, which the round loop clamps:
    the run goes on, but the user hears about it. (The round driver calls it once it knows `total`.)"""
    cpr = config.clients_per_round
    if cpr is None or cpr <= total:
        return None
    return (
        f"warning: --clients-per-round {cpr} is more than the {total} clients: every round uses all {total}"
    )


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
                values_word = "value" if n == 1 else "values"
                _check(n == k, f"{name} has {n} {values_word} for {k} adapter{'' if k == 1 else 's'}")
        if self.weights is not None:
            bad = [w for w in self.weights if not (_finite(w) and w > 0)]
            _check(not bad, f"--weights must all be finite numbers > 0, got {bad[0] if bad else ''}")
