"""Setting a federated run up, once per process: shards, data, model, strategy and the run folder (`prepare`).

`prepare` claims the run folder (or checks it, for --resume), reads or makes the shards, starts the model
and its adapter the way every workflow does (`preamble.Start`), builds the strategy, and writes run.json.
What it returns, a `Setup`, is all a `RoundDriver` needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli.config import LoraSpec, PartitionSpec, RoundsConfig
from fedlora_cli.errors import InputError
from fedlora_cli.features import TaskData, steps_per_epoch
from fedlora_cli.modeling import LoraModel
from fedlora_cli.preamble import Start
from fedlora_cli.progress import NullProgress, Progress, as_tracker
from fedlora_cli.runs import run_path, run_record
from fedlora_cli.runs.rounds import RoundRecorder
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import GlobalAdapter, Strategy
from fedlora_cli.strategies.bounded import NormBoundStrategy, with_norm_bound
from fedlora_cli.strategies.privacy import PrivacyStrategy, with_privacy
from fedlora_cli.strategies.server_opt import ServerOptStrategy, with_server_optimizer
from fedlora_cli.tasks import GlueTask

SHARDS_DIR = "shards"  # <run>/shards/: the manifests of a run that sharded the data itself (--clients K)


def cli_resume_hint(run_dir: Path) -> str:
    """How to continue a run from the command line (`--output-dir` names it however it was started)."""
    return f"`fedlora rounds … --output-dir {run_dir} --resume`"


@dataclass
class Setup:
    """Everything a run needs, built once per process."""

    config: RoundsConfig
    task: GlueTask
    device: torch.device
    precision: str
    data: TaskData
    shards: Any  # sharding.ShardSet
    model: LoraModel
    strategy: Strategy
    initial: GlobalAdapter  # round 1's broadcast
    recorder: RoundRecorder
    start_round: int
    resume_hint: Callable[[Path], str]
    stopped: str | None = None  # why the run ends before --rounds (a privacy budget), if it does
    # personal.split.ClientSplits: each shard's local train / local test (None: no local tests)
    splits: Any = None

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir

    @property
    def client_sizes(self) -> dict[int, int]:
        """Each client's training examples (its FedAvg weight): its shard, less its local test split."""
        return {c: len(idx) for c, idx in self.train_indices.items()}

    @property
    def train_indices(self) -> dict[int, np.ndarray]:
        """What each client trains on: its shard, less its local test split (--client-test-fraction)."""
        if self.splits is None:
            return dict(zip(self.shards.client_ids, self.shards.clients, strict=True))
        return {c: self.splits.train(c) for c in self.shards.client_ids}

    def client_split(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(local train, local test) of one client; no local test without --client-test-fraction."""
        if self.splits is None:
            idx = self.shards.clients[self.shards.client_ids.index(client_id)]
            return idx, idx[:0]
        return self.splits.train(client_id), self.splits.test(client_id)

    def client_validation(self, client_id: int) -> np.ndarray:
        """One client's local validation split (--client-validation-fraction; empty without one)."""
        if self.splits is None:
            return np.zeros(0, dtype=np.int64)
        return self.splits.validation(client_id)


def prepare(
    config: RoundsConfig,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    resume_hint: Callable[[Path], str] | None = None,
) -> Setup:
    """Claim (or verify, for --resume) the run folder; read shards and data, build model and strategy once.

    The run folder's lock is taken first, before any work, and held by the returned Setup's recorder
    until `setup.recorder.close()` (the engines do that when the run ends, however it ends).
    """
    progress = progress or NullProgress()
    config = with_shard_limits(config)
    task = config.data.glue_task
    path = run_path(config.output, task.name, config.model.short_name)
    recorder = RoundRecorder(path, config.model.resolved, task)
    recorder.claim(config)
    try:
        shards, made = _shards(config, path, progress)
        return _prepare(config, shards, made, recorder, progress=progress, argv=argv, resume_hint=resume_hint)
    except BaseException:
        recorder.close()
        raise


def check_run_folder(config: RoundsConfig) -> None:
    """The run folder checks `prepare` starts with (a --resume needs a run; no other process holds it), for
    an engine to run before it spends time starting up (the Flower simulation starts Ray). `prepare` runs
    them again and holds the lock from then on."""
    path = run_path(config.output, config.data.glue_task.name, config.model.short_name)
    recorder = RoundRecorder(path, config.model.resolved, config.data.glue_task)
    recorder.claim(config)
    recorder.close()


def client_count(config: RoundsConfig) -> int:
    """How many clients the run has (--clients K, or the client files of --shards), before it starts."""
    from fedlora_cli.sharding import read_shards

    if config.partition.clients is not None:
        return config.partition.clients
    if not config.shards:
        raise InputError(
            "give --shards DIR (made by `fedlora shard`) or --clients K to shard the data in memory"
        )
    return len(read_shards(config.shards).client_ids)


def with_shard_limits(config: RoundsConfig) -> RoundsConfig:
    """One shard source (--shards or --clients), and --max-train-samples as the shards were made with it.

    Shards made from the first N training examples (`fedlora shard --max-train-samples N`) say so in
    summary.json; the run takes N from there (a different N is an error), before any model is loaded.
    """
    from fedlora_cli.sharding import read_shards

    if not config.shards and config.partition.clients is None:
        raise InputError(
            "give --shards DIR (made by `fedlora shard`) or --clients K to shard the data in memory"
        )
    if not config.shards:
        return config
    summary = read_shards(config.shards).summary or {}
    params = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    made_with = params.get("max_train_samples")
    if type(made_with) is not int or made_with < 1:
        return config
    given = config.data.max_train_samples
    if given is None:
        return replace(config, data=replace(config.data, max_train_samples=made_with))
    if given != made_with:
        raise InputError(
            f"--max-train-samples {given}, but the shards in {config.shards} were made from the first "
            f"{made_with} training examples: use --max-train-samples {made_with} (or leave it out)"
        )
    return config


def _shards(config: RoundsConfig, run_dir: Path, progress: Progress) -> tuple[Any, bool]:
    """The run's shards, and whether they were made now: --shards, or (--clients K) partitioned in memory
    by the partitioner registry (written into `<run>/shards/` once the run folder is claimed, `_prepare`);
    a resumed run reads the ones it wrote."""
    from fedlora_cli.data import load_split
    from fedlora_cli.sharding import make_shards, read_shards

    if config.shards:
        return read_shards(config.shards), False
    own = run_dir / SHARDS_DIR
    if config.resuming and (own / "summary.json").is_file():
        return read_shards(own), False
    spec = config.partition.shard_config(
        config.data, config.train.seed, str(own), cache_dir=config.model.cache_dir
    )
    raw = load_split(
        spec.task,
        "train",
        data_dir=spec.data_dir,
        cache_dir=spec.cache_dir,
        max_samples=spec.max_train_samples,
    )
    shards = make_shards(raw, spec)
    for note in (shards.summary or {}).get("notes", []):
        progress.log(f"note: {note}")
    return shards, True


def check_holdout(shards: Any, data: Any, config: RoundsConfig) -> None:
    """No client may train on a held-out validation example: shards made by this run leave them out;
    --shards made without the same hold-out are refused, with the command that makes matching ones."""
    import numpy as np

    held = data.holdout
    if held is None:
        return
    mask = np.zeros(len(data.train), dtype=bool)
    mask[held.validation] = True
    overlap = {cid: int(mask[idx].sum()) for cid, idx in zip(shards.client_ids, shards.clients, strict=True)}
    bad = {cid: n for cid, n in overlap.items() if n}
    if bad:
        d = config.data
        flag = (
            f"--validation-examples {d.validation_examples}"
            if d.validation_examples is not None
            else f"--validation-fraction {d.validation_fraction:g}"
        )
        first = next(iter(bad))
        raise InputError(
            f"the shards hold held-out validation examples ({sum(bad.values())} in {len(bad)} client(s), "
            f"e.g. {bad[first]} in client {first}): make them with `fedlora shard … {flag} --validation-seed "
            f"{d.validation_seed}`, or let `rounds --clients K` shard the rest itself"
        )


def _prepare(
    config: RoundsConfig,
    shards: Any,
    made: bool,
    recorder: RoundRecorder,
    *,
    progress: Progress,
    argv: list[str] | None,
    resume_hint: Callable[[Path], str] | None,
) -> Setup:
    from fedlora_cli.config import clients_per_round_note
    from fedlora_cli.modeling import count_parameters
    from fedlora_cli.sharding import validate_shards
    from fedlora_cli.training import planned_steps

    task, path = config.data.glue_task, recorder.run_dir
    origin = Start.resolve(config.model, config.train.precision, config.init_adapter, task, progress)
    device, precision = origin.device, origin.precision
    # The clients' LoRA shape: --lora-r/--lora-alpha/…, or the --init-adapter's own.
    client_lora = origin.lora(config.lora)
    try:
        strategy = build_strategy(
            config.aggregation, client_lora, seed=config.train.seed, client_ids=shards.client_ids
        )
        strategy = with_server_optimizer(strategy, config.server_opt)  # the step on the (noised) mean
        n = len(shards.client_ids)
        strategy = with_privacy(
            strategy, config.privacy, clients=n, per_round=config.clients_in_round(n), seed=config.train.seed
        )
        strategy = with_norm_bound(strategy, config.norm_bound)
    except ValueError as e:
        raise InputError(str(e)) from None
    if note := clients_per_round_note(config, len(shards.client_ids)):
        progress.log(note)
    planned_steps(max(shards.sizes), config.train)  # an absurd --local-epochs fails here, not in round 1
    start_lora = origin.lora(_largest(strategy, shards.client_ids))  # the --init-adapter's, or the largest
    # Every rank the run will use (the clients', svd's --svd-rank) must fit the target modules: checked as
    # soon as the model is built, before the data is read.
    fits = replace(start_lora, r=max(start_lora.r, strategy.global_rank))
    model, data = origin.build(
        config.model, config.data, config.train.seed, start_lora, progress=progress, fits=fits
    )
    validate_shards(shards, task.name, len(data.train), train_fingerprint=data.fingerprints["train"])
    check_holdout(shards, data, config)
    splits = client_splits(shards, data, config)
    initial = strategy.initial(GlobalAdapter(model.state(), start_lora))  # from the seed, or --init-adapter

    record = run_record(
        command="rounds",
        config=config,
        argv=argv,
        seeds={"seed": config.train.seed, "client_seed": "SeedSequence([seed, round, client])"},
        extra={
            "data_fingerprints": data.fingerprints,
            **({"validation": data.holdout.record()} if data.holdout is not None else {}),
            "shards_fingerprint": shards.fingerprint,
            "shards": str(Path(config.shards).resolve())
            if config.shards
            else str(path.resolve() / SHARDS_DIR),
            "client_sizes": dict(zip(map(str, shards.client_ids), shards.sizes, strict=True)),
            "client_ranks": {str(c): strategy.client_lora(c).r for c in shards.client_ids},
            **({"client_test": splits.record()} if splits is not None else {}),
            "device": str(device),
            "precision": precision,
        },
    )
    start = recorder.start(config, record)
    if made:  # the shards this run made: into its folder, now that the folder is claimed
        from fedlora_cli.sharding import write_shard_set

        shards = write_shard_set(path / SHARDS_DIR, shards)
    if not config.shards:  # engines (and Flower clients) read the run's own manifests, like --shards
        config = replace(config, shards=str(path / SHARDS_DIR), partition=PartitionSpec())
    tracker = as_tracker(progress)
    tracker.start_run(recorder.run_dir, recorder.run_dir.name)
    tracker.log_params({"command": "rounds", **record["config"]})
    stopped = None
    layer = strategy
    while layer is not None:  # the wrappers around the method, outermost first: each says what it does
        if isinstance(layer, NormBoundStrategy | ServerOptStrategy):
            progress.log(layer.describe())
        layer = getattr(layer, "inner", None)
    if isinstance(strategy, PrivacyStrategy):
        progress.log(strategy.describe())
        last, stopped = strategy.rounds_allowed(config.rounds)
        if stopped is not None:  # the privacy budget ends the run early, as a smaller --rounds would
            progress.log(stopped)
            config = replace(config, rounds=max(last, start))

    sizes = np.asarray(shards.sizes if splits is None else [len(splits.train(c)) for c in shards.client_ids])
    per_round = config.clients_in_round(len(shards.client_ids))
    steps = [
        max(1, round(config.train.epochs * steps_per_epoch(int(n), config.train.batch_size))) for n in sizes
    ]
    trainable, total = count_parameters(model.module)
    ranks = sorted({strategy.client_lora(c).r for c in shards.client_ids})
    progress.log(
        f"{task.name}: {len(sizes)} clients ({sizes.min()}–{sizes.max()} examples, mean {sizes.mean():.0f}), "
        f"{per_round} per round, {min(steps)}–{max(steps)} local steps; {config.aggregation.method}; LoRA "
        f"r={','.join(map(str, ranks))} alpha/r={client_lora.scaling:g} on "
        f"{','.join(client_lora.target_modules)}: {trainable:,} trainable of {total:,} parameters; adapter "
        f"{initial.num_bytes / 2**20:.2f} MB; {device.type}, {precision}; lr {config.train.learning_rate:g} "
        f"{config.train.lr_schedule}"
        + (
            f"; {len(data.holdout.validation):,} training examples held out for validation"
            if data.holdout
            else ""
        )
        + (f"; keeps the {config.select} round" if config.select == "best" else "")
        + (
            f"; {sum(len(s.test) for s in splits.splits.values()):,} examples held out as the clients' local "
            "tests"
            if splits is not None
            else ""
        )
        + (f"; resuming after round {start}" if start else "")
    )
    return Setup(
        config=config,
        task=task,
        device=device,
        precision=precision,
        data=data,
        shards=shards,
        model=model,
        strategy=strategy,
        initial=initial,
        recorder=recorder,
        start_round=start,
        resume_hint=resume_hint or cli_resume_hint,
        stopped=stopped,
        splits=splits,
    )


def client_splits(shards: Any, data: TaskData, config: RoundsConfig) -> Any:
    """Each shard's local train / local test split (--client-test-fraction; None when 0), before any
    training."""
    from fedlora_cli.personal.split import split_clients

    fraction = config.personal.client_test_fraction
    if fraction <= 0:
        return None
    task = config.data.glue_task
    return split_clients(
        shards.client_ids,
        shards.clients,
        data.train.labels,
        fraction,
        config.train.seed,
        regression=task.is_regression,
        validation_fraction=config.personal.client_validation_fraction,
    )


def _largest(strategy: Strategy, client_ids: list[int]) -> LoraSpec:
    """The LoRA shape of the fresh adapter: the largest client rank, so every client's is a slice of it."""
    return max((strategy.client_lora(c) for c in client_ids), key=lambda spec: spec.r)
