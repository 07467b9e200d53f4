"""The round loop: broadcast -> local train -> aggregate -> evaluate -> record (engine `local`).

The pieces (`train_client`, `aggregate_round`, `RoundRecorder`) are shared with the Flower apps,
which run the same steps across processes or machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli import atomic
from fedlora_cli.aggregation import AggregateResult, ClientUpdate, aggregate
from fedlora_cli.config import AggregationSpec, LoraSpec, RoundsConfig, TrainSpec
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.evaluation import evaluate
from fedlora_cli.features import TaskData, steps_per_epoch
from fedlora_cli.modeling import LoraModel, check_adapter_task, read_adapter, save_adapter
from fedlora_cli.progress import NullProgress, Progress
from fedlora_cli.runs import (
    ADAPTER_DIR,
    METRICS,
    RoundTree,
    read_json,
    run_path,
    run_record,
    write_history,
    write_record,
)
from fedlora_cli.tasks import GlueTask
from fedlora_cli.training import train_model

# Config keys that may change between a run and its resumption: where it is written, how the work is
# spread (engine, resources, fault tolerance: both engines give the same rounds), what is evaluated, and
# how many rounds there are in all (each round's clients and seeds do not depend on the total, so
# extending a run gives what running longer from the start would).
RESUME_FREE_KEYS = {
    "output", "resume", "rounds", "client_cpus", "client_gpus", "eval_batch_size", "eval_each_round", "eval_clients",
    "engine", "min_clients", "round_timeout",
}  # fmt: skip


class Interrupted(FedloraError):
    """Ctrl-C during a run: complete rounds are kept and `--resume` continues after them."""

    exit_code = 130


# ---------------------------------------------------------------------------------------------------
# seeds and client selection


def derive_seed(run_seed: int, round_no: int, client_id: int) -> int:
    """The seed of one client's local training in one round.

    `SeedSequence([run_seed, round, client])` hashes the three numbers together, so every
    (round, client) pair gets its own well-mixed 32-bit seed: data order and dropout differ across
    rounds and clients (the reference reused one seed everywhere), and the run is reproducible.
    """
    return int(np.random.SeedSequence([run_seed, round_no, client_id]).generate_state(1, np.uint32)[0])


def select_clients(client_ids: list[int], count: int, run_seed: int, round_no: int) -> list[int]:
    """`count` of the clients, drawn without replacement from a (run seed, round)-seeded generator."""
    if count >= len(client_ids):
        return list(client_ids)
    rng = np.random.default_rng(np.random.SeedSequence([run_seed, round_no, 0x5E1EC7]))
    return sorted(int(c) for c in rng.choice(client_ids, size=count, replace=False))


# ---------------------------------------------------------------------------------------------------
# the pieces: one client's turn, one aggregation


@dataclass(frozen=True)
class GlobalAdapter:
    """The server's adapter: its state and the LoRA shape that state has."""

    state: dict[str, torch.Tensor]
    lora: LoraSpec

    @property
    def num_bytes(self) -> int:
        return state_bytes(self.state)


@dataclass(frozen=True)
class ClientReport:
    """What a client sends back: its adapter state, its example count (the FedAvg weight), and stats."""

    client_id: int
    state: dict[str, torch.Tensor] = field(repr=False)
    examples: int
    seed: int
    train: dict[str, Any]
    eval: dict[str, float] | None = None
    wire_bytes: int | None = None  # size of the record that actually carried the state (Flower), if known

    @property
    def num_bytes(self) -> int:
        return self.wire_bytes if self.wire_bytes is not None else state_bytes(self.state)

    def summary(self) -> dict[str, Any]:
        return {"client": self.client_id, "examples": self.examples, "seed": self.seed, "bytes_up": self.num_bytes,
                **self.train, **({"eval": self.eval} if self.eval is not None else {})}  # fmt: skip


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def train_client(
    model: LoraModel,
    data: TaskData,
    indices: np.ndarray,
    global_adapter: GlobalAdapter,
    train_spec: TrainSpec,
    *,
    client_id: int,
    round_no: int,
    run_seed: int,
    device: torch.device,
    precision: str,
    task: GlueTask | None = None,
    eval_batch_size: int = 64,
    progress: Progress | None = None,
) -> ClientReport:
    """One client's turn: load the global adapter, train LoRA A/B and the head on its shard, report.

    The base model is never reloaded: only the adapter state moves in and out. Pass `task` to also
    evaluate the client's adapter on the dev split(s).
    """
    model.load_state(global_adapter.state, global_adapter.lora)  # also makes A/B and the head trainable
    seed = derive_seed(run_seed, round_no, client_id)
    result = train_model(model.module, data.train, train_spec, device=device, precision=precision, seed=seed,
                         indices=indices, progress=progress, progress_key="client",
                         description=f"round {round_no} · client {client_id}")  # fmt: skip
    evaluation = None
    if task is not None:
        evaluation = evaluate(model.module, task, data.evals, eval_batch_size, device, precision).metrics
    train = {
        "loss": result.loss,
        "last_loss": result.last_loss,
        "steps": result.steps,
        "seconds": result.seconds,
        "samples_per_second": result.samples_per_second,
        "tokens_per_second": result.tokens_per_second,
        "order": result.order_digest,
    }
    return ClientReport(client_id, model.state(), result.examples, seed, train, evaluation)


def aggregate_round(
    reports: list[ClientReport], spec: AggregationSpec, lora: LoraSpec
) -> tuple[GlobalAdapter, AggregateResult]:
    """FedAvg of the clients' adapters, weighted by training examples (never batches)."""
    if not reports:
        raise FedloraError("no client reported back: nothing to aggregate")
    updates = [ClientUpdate(r.state, scaling=lora.scaling, weight=r.examples) for r in reports]
    if spec.method == "naive":
        rank, alpha = lora.r, lora.alpha  # naive keeps the clients' shape
    else:
        rank, alpha = spec.resolved_rank(lora.r), spec.resolved_alpha(lora.r)
    try:
        result = aggregate(spec.method, updates, rank=rank, alpha=alpha)
    except ValueError as e:
        raise InputError(f"aggregation failed: {e}") from None
    new_lora = replace(lora, r=result.rank, alpha=result.alpha)
    return GlobalAdapter(result.state, new_lora), result


# ---------------------------------------------------------------------------------------------------
# recording


class RoundRecorder:
    """Writes the run tree of a `rounds` run and decides where a resumed run continues."""

    def __init__(self, run_dir: Path, base_model: str, task: GlueTask) -> None:
        self.tree = RoundTree(run_dir)
        self.base_model = base_model
        self.task = task
        self.history: list[dict[str, Any]] = []

    @property
    def run_dir(self) -> Path:
        return self.tree.root

    def start(self, config: RoundsConfig, record: dict[str, Any]) -> int:
        """Claim the folder (or verify it for --resume); return the last complete round."""
        root = self.tree.root
        exists = root.is_dir() and any(root.iterdir())
        if exists and not config.resume:
            raise InputError(
                f"run {root} already exists: pass --resume to continue it, or choose another --run-name"
            )
        if exists:
            previous = read_json(root / "run.json", "run record")
            _check_same_run(previous, record)
            done = self.tree.last_complete_round()
            self.tree.discard_after(done)
            # Each complete round's global/metrics.json holds its whole history row, so history.jsonl
            # is rebuilt from them: it can never disagree with the rounds actually on disk.
            self.history = [read_json(self.tree.global_dir(r) / METRICS) for r in range(1, done + 1)]
            write_history(root, self.history)
            return done
        root.mkdir(parents=True, exist_ok=True)
        write_record(root, record)
        return 0

    def _meta(self, origin: str, round_no: int, **extra: Any) -> dict[str, Any]:
        return {"task": self.task.name, "label_names": list(self.task.label_names), "origin": origin,
                "round": round_no, **extra}  # fmt: skip

    def save_client(self, round_no: int, report: ClientReport, lora: LoraSpec) -> int:
        folder = self.tree.client_dir(round_no, report.client_id)
        size = save_adapter(folder / ADAPTER_DIR, report.state, lora, base_model=self.base_model,
                            meta=self._meta("client", round_no, client=report.client_id, examples=report.examples))  # fmt: skip
        atomic.write_json(folder / METRICS, report.summary())
        return size

    def save_global(self, round_no: int, adapter: GlobalAdapter) -> int:
        return save_adapter(self.tree.global_dir(round_no) / ADAPTER_DIR, adapter.state, adapter.lora,
                            base_model=self.base_model, meta=self._meta("global", round_no))  # fmt: skip

    def complete_round(self, row: dict[str, Any]) -> None:
        """Write the round's record last: global/metrics.json marks the round complete, then history."""
        atomic.write_json(self.tree.global_dir(row["round"]) / METRICS, row)
        self.history.append(row)
        write_history(self.tree.root, self.history)

    def load_global(self, round_no: int) -> GlobalAdapter:
        adapter = read_adapter(self.tree.global_dir(round_no) / ADAPTER_DIR)
        return GlobalAdapter(adapter.state, adapter.lora)

    def finish(self, adapter: GlobalAdapter, metrics: dict[str, Any]) -> Path:
        final = self.tree.final_dir
        save_adapter(final / ADAPTER_DIR, adapter.state, adapter.lora, base_model=self.base_model,
                     meta=self._meta("final", len(self.history)))  # fmt: skip
        atomic.write_json(final / METRICS, metrics)
        return final / ADAPTER_DIR


def _check_same_run(previous: dict[str, Any], record: dict[str, Any]) -> None:
    """--resume must continue the same experiment: same config (bar RESUME_FREE_KEYS) and same data."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if not prefix and k in RESUME_FREE_KEYS:
                continue
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(previous.get("config", {})), flat(record["config"])
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise InputError(
            f"--resume with a different configuration ({detail}): rerun with the original options"
        )
    for key in ("data_fingerprints", "shards_fingerprint"):
        if previous.get(key) != record.get(key):
            raise InputError(f"--resume: the {key.replace('_', ' ')} changed since the run started; "
                             f"resume with the same data and shards, or start a new run")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# engine `local`: everything in this process


@dataclass(frozen=True)
class RoundsResult:
    run_dir: Path
    final_adapter: Path
    history: list[dict[str, Any]]
    final_metrics: dict[str, float]
    resumed_after: int  # rounds already complete when this call started
    clients: int
    main_metric: str


def run_rounds(
    config: RoundsConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RoundsResult:
    """Multi-round FedAvg of LoRA adapters over the shards, in one process (engine `local`)."""
    if config.engine == "flower":
        from fedlora_cli.flower.simulation import run_flower_simulation

        return run_flower_simulation(config, progress=progress, argv=argv)
    setup = prepare(config, progress=progress, argv=argv)
    try:
        return _loop(setup, progress or NullProgress())
    except KeyboardInterrupt:
        done = setup.recorder.tree.last_complete_round()
        raise Interrupted(
            f"interrupted; rounds 1..{done} of {setup.run_dir} are complete: continue with "
            f"`fedlora rounds … --run-name {setup.run_dir.name} --resume`"
        ) from None


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
    initial: GlobalAdapter
    recorder: RoundRecorder
    start_round: int

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir


def prepare(
    config: RoundsConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> Setup:
    """Read shards and data, build the model once, claim (or verify, for --resume) the run folder."""
    from fedlora_cli.centralised import load_model_and_data
    from fedlora_cli.modeling import count_parameters, resolve_device, resolve_precision
    from fedlora_cli.sharding import read_shards, validate_shards

    progress = progress or NullProgress()
    task = config.data.glue_task
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.train.precision, device)
    shards = read_shards(config.shards)
    init = read_adapter(config.init_adapter) if config.init_adapter else None
    if init is not None and (note := check_adapter_task(init, task, config.init_adapter)):
        progress.log(note)
    base, data, _ = load_model_and_data(
        config.model, config.data, config.train.seed, train=True, progress=progress
    )
    validate_shards(shards, task.name, len(data.train), train_fingerprint=data.fingerprints["train"])
    first_lora = init.lora if init is not None else config.lora
    model = LoraModel(base, first_lora, device, base_name=config.model.resolved)
    if init is not None:
        model.load_state(init.state, init.lora)
    initial = GlobalAdapter(
        model.state(), first_lora
    )  # round 1's broadcast: from the seed, or --init-adapter

    path = run_path(config.output, task.name, config.model.short_name)
    recorder = RoundRecorder(path, config.model.resolved, task)
    record = run_record(
        command="rounds",
        config=config,
        argv=argv,
        seeds={"seed": config.train.seed, "client_seed": "SeedSequence([seed, round, client])"},
        extra={
            "data_fingerprints": data.fingerprints,
            "shards_fingerprint": shards.fingerprint,
            "shards": str(Path(config.shards).resolve()),
            "client_sizes": dict(zip(map(str, shards.client_ids), shards.sizes, strict=True)),
            "device": str(device),
            "precision": precision,
        },
    )
    start = recorder.start(config, record)

    sizes = np.asarray(shards.sizes)
    per_round = config.clients_in_round(len(shards.client_ids))
    steps = [
        max(1, round(config.train.epochs * steps_per_epoch(int(n), config.train.batch_size))) for n in sizes
    ]
    trainable, total = count_parameters(model.module)
    progress.log(
        f"{task.name}: {len(sizes)} clients ({sizes.min()}–{sizes.max()} examples, mean {sizes.mean():.0f}), "
        f"{per_round} per round, {min(steps)}–{max(steps)} local steps; LoRA r={first_lora.r} on "
        f"{','.join(first_lora.target_modules)}: {trainable:,} trainable of {total:,} parameters; adapter "
        f"{initial.num_bytes / 2**20:.2f} MB; {device.type}, {precision}"
        + (f"; resuming after round {start}" if start else "")
    )
    return Setup(config, task, device, precision, data, shards, model, initial, recorder, start)


def _loop(s: Setup, progress: Progress) -> RoundsResult:
    config = s.config
    global_adapter = s.recorder.load_global(s.start_round) if s.start_round else s.initial
    index = dict(zip(s.shards.client_ids, s.shards.clients, strict=True))
    per_round = config.clients_in_round(len(s.shards.client_ids))
    progress.start("rounds", "rounds", total=config.rounds)
    progress.advance("rounds", s.start_round)
    metrics: dict[str, float] = dict(s.recorder.history[-1].get("eval") or {}) if s.recorder.history else {}
    for round_no in range(s.start_round + 1, config.rounds + 1):
        wall = time.perf_counter()
        selected = select_clients(s.shards.client_ids, per_round, config.train.seed, round_no)
        reports, io_seconds, written = [], 0.0, 0
        for client_id in selected:
            report = train_client(
                s.model, s.data, index[client_id], global_adapter, config.train,
                client_id=client_id, round_no=round_no, run_seed=config.train.seed, device=s.device,
                precision=s.precision, task=s.task if config.eval_clients else None,
                eval_batch_size=config.eval_batch_size, progress=progress,
            )  # fmt: skip
            t = time.perf_counter()
            written += s.recorder.save_client(round_no, report, global_adapter.lora)
            io_seconds += time.perf_counter() - t
            reports.append(report)
        bytes_down = global_adapter.num_bytes * len(selected)
        row, global_adapter, metrics = finish_round(s, round_no, reports, global_adapter, bytes_down, [])
        row["seconds"]["io"] += io_seconds
        row["bytes_written"] += written
        row["seconds"]["wall"] = time.perf_counter() - wall
        s.recorder.complete_round(row)
        progress.advance("rounds", 1, info=round_info(row, s.task))
    progress.stop("rounds")
    final = s.recorder.finish(global_adapter, {"round": config.rounds, **metrics})
    return RoundsResult(s.run_dir, final, s.recorder.history, metrics, s.start_round,
                        len(s.shards.client_ids), s.task.main_metric)  # fmt: skip


def finish_round(
    s: Setup,
    round_no: int,
    reports: list[ClientReport],
    previous: GlobalAdapter,
    bytes_down: int,
    failures: list[dict[str, Any]],
) -> tuple[dict[str, Any], GlobalAdapter, dict[str, float]]:
    """Aggregate, evaluate and save one round's global adapter; shared by both engines.

    Returns the round's history row (the caller completes it with its own timings and then calls
    `RoundRecorder.complete_round`), the new global adapter, and its metrics.
    """
    config = s.config
    t = time.perf_counter()
    new_global, agg = aggregate_round(reports, config.aggregation, previous.lora)
    agg_seconds = time.perf_counter() - t

    t = time.perf_counter()
    evaluation: dict[str, float] | None = None
    if config.eval_each_round or round_no == config.rounds:
        s.model.load_state(new_global.state, new_global.lora)
        evaluation = evaluate(
            s.model.module, s.task, s.data.evals, config.eval_batch_size, s.device, s.precision
        ).metrics
    eval_seconds = time.perf_counter() - t

    examples = sum(r.examples for r in reports)
    row: dict[str, Any] = {
        "round": round_no,
        "clients": [r.client_id for r in reports],
        "failed": failures,
        "client_metrics": [r.summary() for r in reports],
        "examples": examples,
        "train_loss": sum(r.train["loss"] * r.examples for r in reports) / examples,
        "aggregation": {
            "method": config.aggregation.method,
            "rank": agg.rank,
            "alpha": agg.alpha,
            "error": agg.error,
            "module_errors": agg.module_errors,
        },  # fmt: skip
        "eval": evaluation,
        "bytes_down": bytes_down,
        "bytes_up": sum(r.num_bytes for r in reports),
        "seconds": {
            "train": sum(r.train["seconds"] for r in reports),
            "aggregate": agg_seconds,
            "eval": eval_seconds,
            "io": 0.0,
        },  # fmt: skip
        "bytes_written": 0,
    }
    t = time.perf_counter()
    row["bytes_written"] += s.recorder.save_global(round_no, new_global)
    row["seconds"]["io"] += time.perf_counter() - t
    return row, new_global, evaluation if evaluation is not None else {}


def round_info(row: dict[str, Any], task: GlueTask) -> str:
    """The short status of a finished round shown beside the progress bar (both engines)."""
    ev = row.get("eval") or {}
    metric = f"{task.main_metric} {ev[task.main_metric]:.4f} · " if task.main_metric in ev else ""
    return f"{metric}loss {row['train_loss']:.4f} · agg err {row['aggregation']['error']:.3f}"
