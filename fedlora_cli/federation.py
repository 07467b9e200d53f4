"""The round driver every engine shares: select -> plan -> (the engine trains the clients) -> close the round.

`prepare` builds what a run needs once per process (data, model, strategy, run folder). A
`RoundDriver` then plans each round (`plan_round`: which clients, and what each one trains, as the
strategy decides) and closes it (`close_round`: check the clients' updates, save them, aggregate,
evaluate, save the global adapter and the strategy's state, write the history row). Engine `local`
(`run_local`, below) trains the planned clients one after another in this process; the Flower
ServerApp sends the same plans to SuperNodes and calls the same `close_round` with their replies.
This module knows no engine: the command picks one (`fedlora_cli.engines`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli import memory
from fedlora_cli.config import LoraSpec, PartitionSpec, RoundsConfig, TrainSpec
from fedlora_cli.errors import FedloraError, InputError, Interrupted
from fedlora_cli.evaluation import EvalResult, evaluate
from fedlora_cli.features import TaskData, steps_per_epoch
from fedlora_cli.history import HistoryRow
from fedlora_cli.integrity import (
    STATE_FILE,
)
from fedlora_cli.modeling import LoraModel, check_adapter_task, read_adapter
from fedlora_cli.progress import NullProgress, Progress, as_tracker
from fedlora_cli.runs import (
    complete_rounds,
    interrupted_rounds_message,
    run_path,
    run_record,
    run_session,
)
from fedlora_cli.runs.record import now
from fedlora_cli.runs.rounds import RoundRecorder
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import ClientPlan, ClientReport, GlobalAdapter, Strategy
from fedlora_cli.strategies.privacy import PrivacyStrategy, with_privacy
from fedlora_cli.tasks import GlueTask
from fedlora_cli.trackers import report_round
from fedlora_cli.training import train_model

__all__ = [
    "ClientPlan", "ClientReport", "GlobalAdapter", "Interrupted", "RoundDriver", "RoundFailed", "RoundPlan",
    "RoundsResult", "Setup", "derive_seed", "prepare", "run_local", "select_clients", "train_client",
]  # fmt: skip


SHARDS_DIR = "shards"  # <run>/shards/: the manifests of a run that sharded the data itself (--clients K)


class RoundFailed(FedloraError):
    """Fewer than --min-clients usable updates: complete rounds are kept and --resume continues after them."""


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
# one client's turn (engine local runs it here; a Flower ClientApp runs it on its SuperNode)


def train_client(
    model: LoraModel,
    data: TaskData,
    indices: np.ndarray,
    plan: ClientPlan,
    train_spec: TrainSpec,
    *,
    round_no: int,
    run_seed: int,
    device: torch.device,
    precision: str,
    task: GlueTask | None = None,
    eval_batch_size: int = 64,
    progress: Progress | None = None,
) -> ClientReport:
    """One client's turn: load the plan (adapter, frozen parts, base delta), train on its shard, report.

    The base model is never reloaded: only the adapter state (and a method's base delta) moves in and
    out. Pass `task` to also evaluate the client's adapter on the dev split(s).
    """
    model.apply_plan(plan)
    seed = derive_seed(run_seed, round_no, plan.client_id)
    result = train_model(model.module, data.train, train_spec, device=device, precision=precision, seed=seed,
                         indices=indices, progress=progress, progress_key="client", prox_mu=plan.prox_mu,
                         description=f"round {round_no} · client {plan.client_id}")  # fmt: skip
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
    state = model.state()
    if plan.clip_norm is not None:  # differential privacy, clipped here: the server never sees more
        from fedlora_cli.privacy import clip_client_update

        state, train["update_norm"] = clip_client_update(state, plan.adapter.state, plan.clip_norm,
                                                         space=plan.clip_space, scaling=plan.adapter.lora.scaling)  # fmt: skip
    return ClientReport(plan.client_id, state, plan.adapter.lora, result.examples, seed, train, evaluation)


# ---------------------------------------------------------------------------------------------------
# setting a run up


@dataclass(frozen=True)
class RoundsResult:
    run_dir: Path
    final_adapter: Path
    history: list[HistoryRow]
    final_metrics: dict[str, float]
    resumed_after: int  # rounds already complete when this call started
    clients: int
    main_metric: str
    stopped: str | None = None  # why the run ended before --rounds (--dp-target-epsilon), if it did


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

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir

    @property
    def client_sizes(self) -> dict[int, int]:
        return dict(zip(self.shards.client_ids, self.shards.sizes, strict=True))


def prepare(
    config: RoundsConfig,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    resume_hint: Callable[[Path], str] | None = None,
) -> Setup:
    """Read shards and data, build the model and the strategy once, claim (or verify, for --resume) the run folder.

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
        shards, staged = _shards(config, path, progress)
        try:
            return _prepare(
                config, shards, staged, recorder, progress=progress, argv=argv, resume_hint=resume_hint
            )
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
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
            f"--max-train-samples {given}, but the shards in {config.shards} were made from the first {made_with} "
            f"training examples: use --max-train-samples {made_with} (or leave it out)"
        )
    return config


def _shards(config: RoundsConfig, run_dir: Path, progress: Progress) -> tuple[Any, Path | None]:
    """The run's shards: --shards, or (--clients K) made now by `fedlora shard`'s partitioners.

    Made shards are staged beside the run folder and moved into `<run>/shards/` once the run folder is
    claimed (`_prepare`); a resumed run reads the ones it wrote.
    """
    from fedlora_cli import atomic
    from fedlora_cli.sharding import read_shards, run_shard

    if config.shards:
        return read_shards(config.shards), None
    own = run_dir / SHARDS_DIR
    if config.resuming and (own / "summary.json").is_file():
        return read_shards(own), None
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = atomic.new_temp_dir(run_dir)  # a fedlora temporary: a killed run's is cleared by the next one
    try:
        spec = config.partition.shard_config(config.data, config.train.seed, str(staged / SHARDS_DIR),
                                             cache_dir=config.model.cache_dir)  # fmt: skip
        made = run_shard(spec, progress)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for note in made.notes:
        progress.log(f"note: {note}")
    return read_shards(made.out), staged


def _prepare(
    config: RoundsConfig,
    shards: Any,
    staged: Path | None,
    recorder: RoundRecorder,
    *,
    progress: Progress,
    argv: list[str] | None,
    resume_hint: Callable[[Path], str] | None,
) -> Setup:
    from fedlora_cli.centralised import load_model_and_data
    from fedlora_cli.config import clients_per_round_note
    from fedlora_cli.modeling import check_lora_fits, count_parameters, resolve_device, resolve_precision
    from fedlora_cli.sharding import validate_shards
    from fedlora_cli.training import planned_steps

    task, path = config.data.glue_task, recorder.run_dir
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.train.precision, device)

    init = read_adapter(config.init_adapter) if config.init_adapter else None
    if init is not None and (note := check_adapter_task(init, task, config.init_adapter)):
        progress.log(note)
    # The clients' LoRA shape: --lora-r/--lora-alpha/…, or the --init-adapter's own.
    client_lora = init.lora if init is not None else config.lora
    try:
        strategy = build_strategy(
            config.aggregation, client_lora, seed=config.train.seed, client_ids=shards.client_ids
        )
        n = len(shards.client_ids)
        strategy = with_privacy(strategy, config.privacy, clients=n, per_round=config.clients_in_round(n),
                                seed=config.train.seed)  # fmt: skip
    except ValueError as e:
        raise InputError(str(e)) from None
    if note := clients_per_round_note(config, len(shards.client_ids)):
        progress.log(note)
    planned_steps(max(shards.sizes), config.train)  # an absurd --local-epochs fails here, not in round 1
    base, data, _ = load_model_and_data(
        config.model, config.data, config.train.seed, train=True, progress=progress
    )
    validate_shards(shards, task.name, len(data.train), train_fingerprint=data.fingerprints["train"])
    start_lora = init.lora if init is not None else _largest(strategy, shards.client_ids)
    # Every rank the run will use (the clients', svd's --svd-rank) must fit the target modules: say so now.
    check_lora_fits(base, replace(start_lora, r=max(start_lora.r, strategy.global_rank)))
    model = LoraModel(base, start_lora, device, base_name=config.model.resolved)
    if init is not None:
        model.load_state(init.state, init.lora)
    initial = strategy.initial(GlobalAdapter(model.state(), start_lora))  # from the seed, or --init-adapter

    record = run_record(
        command="rounds",
        config=config,
        argv=argv,
        seeds={"seed": config.train.seed, "client_seed": "SeedSequence([seed, round, client])"},
        extra={
            "data_fingerprints": data.fingerprints,
            "shards_fingerprint": shards.fingerprint,
            "shards": str(Path(config.shards).resolve())
            if config.shards
            else str(path.resolve() / SHARDS_DIR),
            "client_sizes": dict(zip(map(str, shards.client_ids), shards.sizes, strict=True)),
            "client_ranks": {str(c): strategy.client_lora(c).r for c in shards.client_ids},
            "device": str(device),
            "precision": precision,
        },
    )
    start = recorder.start(config, record)
    if staged is not None:  # the shards this run made: into its folder, now that the folder is claimed
        os.replace(staged / SHARDS_DIR, path / SHARDS_DIR)
    if not config.shards:  # engines (and Flower clients) read the run's own manifests, like --shards
        config = replace(config, shards=str(path / SHARDS_DIR), partition=PartitionSpec())
    tracker = as_tracker(progress)
    tracker.start_run(recorder.run_dir, recorder.run_dir.name)
    tracker.log_params({"command": "rounds", **record["config"]})
    stopped = None
    if isinstance(strategy, PrivacyStrategy):
        progress.log(strategy.describe())
        last, stopped = strategy.rounds_allowed(config.rounds)
        if stopped is not None:  # the privacy budget ends the run early, as a smaller --rounds would
            progress.log(stopped)
            config = replace(config, rounds=max(last, start))

    sizes = np.asarray(shards.sizes)
    per_round = config.clients_in_round(len(shards.client_ids))
    steps = [
        max(1, round(config.train.epochs * steps_per_epoch(int(n), config.train.batch_size))) for n in sizes
    ]
    trainable, total = count_parameters(model.module)
    ranks = sorted({strategy.client_lora(c).r for c in shards.client_ids})
    progress.log(
        f"{task.name}: {len(sizes)} clients ({sizes.min()}–{sizes.max()} examples, mean {sizes.mean():.0f}), "
        f"{per_round} per round, {min(steps)}–{max(steps)} local steps; {config.aggregation.method}; LoRA "
        f"r={','.join(map(str, ranks))} alpha/r={client_lora.scaling:g} on {','.join(client_lora.target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters; adapter {initial.num_bytes / 2**20:.2f} MB; "
        f"{device.type}, {precision}" + (f"; resuming after round {start}" if start else "")
    )
    return Setup(config, task, device, precision, data, shards, model, strategy, initial, recorder, start,
                 resume_hint or cli_resume_hint, stopped)  # fmt: skip


def _largest(strategy: Strategy, client_ids: list[int]) -> LoraSpec:
    """The LoRA shape of the fresh adapter: the largest client rank, so every client's is a slice of it."""
    return max((strategy.client_lora(c) for c in client_ids), key=lambda spec: spec.r)


# ---------------------------------------------------------------------------------------------------
# the driver


@dataclass(frozen=True)
class RoundPlan:
    round_no: int
    selected: list[int]  # client ids, ascending
    plans: dict[int, ClientPlan]
    broadcast: GlobalAdapter  # the global adapter this round started from
    started: float  # time.perf_counter() when the round was planned
    memory: Any = None  # memory.PeakMemory, measuring this process from planning to closing


class RoundDriver:
    """The round loop of a run, shared by every engine (see the module docstring)."""

    def __init__(self, setup: Setup, progress: Progress | None = None) -> None:
        self.s = setup
        self.progress = progress or NullProgress()
        config = setup.config
        self.client_ids: list[int] = list(setup.shards.client_ids)
        self.per_round = config.clients_in_round(len(self.client_ids))
        self.need = min(config.min_clients or self.per_round, self.per_round)
        if setup.start_round:
            self.current, server_state = setup.recorder.load_global(setup.start_round)
            try:
                setup.strategy.load_state_dict(server_state)
            except ValueError as e:
                raise InputError(f"--resume: round {setup.start_round}'s {STATE_FILE}: {e}") from None
        else:
            self.current = setup.initial
        last = setup.recorder.history[-1] if setup.recorder.history else None
        self.metrics: dict[str, float] = dict(last.eval or {}) if last is not None else {}
        if not setup.start_round and setup.config.eval_each_round and not setup.recorder.history:
            self._record_round_zero()

    def _record_round_zero(self) -> None:
        """history row 0: the starting adapter (fresh from the seed, or --init-adapter) before any training."""
        t = time.perf_counter()
        evaluation = self.evaluate_global()
        seconds = time.perf_counter() - t
        self.metrics = evaluation.metrics
        row = HistoryRow(round=0, clients=[], failed=[], client_metrics=[], examples=0, train_loss=None,
                         aggregation={}, eval=evaluation.metrics, bytes_down=0, bytes_up=0, bytes_written=0,
                         seconds={"wall": seconds, "eval": seconds}, time=now(), eval_loss=evaluation.loss)  # fmt: skip
        self.s.recorder.complete_round(row)
        report_round(self.progress, row.to_json())

    @property
    def rounds_left(self) -> range:
        return range(self.s.start_round + 1, self.s.config.rounds + 1)

    def plan_round(self, round_no: int) -> RoundPlan:
        """Select this round's clients (seeded) and ask the strategy what each one does."""
        started = time.perf_counter()
        selected = select_clients(self.client_ids, self.per_round, self.s.config.train.seed, round_no)
        plans = {cid: self.s.strategy.plan(round_no, cid, self.current) for cid in selected}
        return RoundPlan(
            round_no, selected, plans, self.current, started, memory.PeakMemory(self.s.device).start()
        )

    def check_report(self, plan: RoundPlan, report: ClientReport) -> str | None:
        """Why a client's report cannot count (None: it can). Nothing a client says is taken on trust."""
        client_plan = plan.plans.get(report.client_id)
        if client_plan is None:
            return f"client {report.client_id} was not selected in round {plan.round_no}"
        expected = self.s.client_sizes[report.client_id]
        if type(report.examples) is not int or report.examples != expected:
            return f"reported {report.examples!r} training examples, but its shard has {expected}"
        if report.lora != client_plan.adapter.lora:
            return f"trained LoRA r={report.lora.r} alpha={report.lora.alpha:g}, not the planned shape"
        sent = client_plan.adapter.state
        if set(report.state) != set(sent):
            extra, missing = sorted(set(report.state) - set(sent)), sorted(set(sent) - set(report.state))
            return f"the adapter's keys differ from the broadcast (missing {missing[:2]}, unexpected {extra[:2]})"
        for key, tensor in report.state.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                return f"{key} is not a floating-point tensor"
            if tuple(tensor.shape) != tuple(sent[key].shape):
                return f"{key} has shape {tuple(tensor.shape)}, expected {tuple(sent[key].shape)}"
            if not bool(torch.isfinite(tensor).all()):
                return f"{key} holds NaN or Inf"
        for key in ("loss", "seconds"):
            value = report.train.get(key)
            if not isinstance(value, int | float) or not math.isfinite(value):
                return f"its training {key} is missing or not a finite number ({value!r})"
        seed = derive_seed(self.s.config.train.seed, plan.round_no, report.client_id)
        if report.seed != seed:
            return f"trained with seed {report.seed!r}, not this round's seed {seed} for it"
        for key, value in (report.eval or {}).items():
            if not isinstance(value, int | float) or math.isinf(value):
                return f"its evaluation {key} is not a number ({value!r})"
        return self.s.strategy.check_update(client_plan, report.update())

    def close_round(
        self,
        plan: RoundPlan,
        reports: list[ClientReport],
        failures: list[dict[str, Any]],
        *,
        bytes_down: int | None = None,
    ) -> HistoryRow:
        """Check, save and aggregate the clients' reports, evaluate and save the new global adapter,
        and write the round's history row (which marks the round complete)."""
        s, config, round_no = self.s, self.s.config, plan.round_no
        failures = list(failures)
        usable: list[ClientReport] = []
        for report in sorted(reports, key=lambda r: r.client_id):  # the same order on every engine
            reason = self.check_report(plan, report)
            if reason is None:
                usable.append(report)
            else:
                failures.append({"client": report.client_id, "node": None, "reason": reason})
        failures.sort(key=lambda f: f["client"])
        if len(usable) < self.need or not usable:
            if plan.memory is not None:
                plan.memory.stop()
            done = s.recorder.tree.last_complete_round()
            detail = "; ".join(f"client {f['client']}: {str(f['reason'])[:160]}" for f in failures)
            raise RoundFailed(
                f"round {round_no}: {len(usable)} of {len(plan.selected)} selected clients replied but "
                f"{self.need} are needed (--min-clients) — {detail}; {complete_rounds(s.run_dir, done)}: fix "
                f"the clients and continue with {s.resume_hint(s.run_dir)}"
            )

        t = time.perf_counter()
        written = sum(s.recorder.save_client(round_no, r) for r in usable)
        io_seconds = time.perf_counter() - t

        t = time.perf_counter()
        try:
            outcome = s.strategy.aggregate(
                round_no, plan.broadcast, [r.update() for r in usable], sampled=len(plan.selected)
            )
        except ValueError as e:
            raise InputError(f"round {round_no}: aggregation failed: {e}") from None
        agg_seconds = time.perf_counter() - t
        self.current = outcome.adapter

        t = time.perf_counter()
        evaluation = None
        if config.eval_each_round or round_no == config.rounds:
            evaluation = self.evaluate_global()
            self.metrics = evaluation.metrics
        eval_seconds = time.perf_counter() - t

        t = time.perf_counter()
        written += s.recorder.save_global(round_no, outcome.adapter, s.strategy.state_dict())
        io_seconds += time.perf_counter() - t

        examples = sum(r.examples for r in usable)
        if bytes_down is None:  # engine local: every selected client got its plan
            bytes_down = sum(p.num_bytes for p in plan.plans.values())
        row = HistoryRow(
            round=round_no,
            clients=[r.client_id for r in usable],
            failed=failures,
            client_metrics=[r.summary() for r in usable],
            examples=examples,
            train_loss=sum(r.train["loss"] * r.examples for r in usable) / examples,
            aggregation=outcome.record,
            eval=evaluation.metrics if evaluation is not None else None,
            bytes_down=bytes_down,
            bytes_up=sum(r.num_bytes for r in usable),
            bytes_written=written,
            seconds={
                "wall": time.perf_counter() - plan.started,
                "train": sum(r.train["seconds"] for r in usable),
                "aggregate": agg_seconds,
                "eval": eval_seconds,
                "io": io_seconds,
            },  # fmt: skip
            time=now(),
            learning_rate=config.train.learning_rate,
            eval_loss=evaluation.loss if evaluation is not None else None,
            extra={"memory": self._round_memory(plan)},
        )
        s.recorder.complete_round(row)
        report_round(self.progress, row.to_json())
        info = round_info(row, s.task) + (f" · {len(failures)} failed" if failures else "")
        self.progress.advance("rounds", 1, info=info)
        return row

    @staticmethod
    def _round_memory(plan: RoundPlan) -> dict[str, float | None]:
        """This process's peak RSS (and CUDA peak) over the round, then RSS after handing freed memory back.

        Releasing once per round keeps the process flat over many clients and rounds (memory.release).
        """
        memory.release()
        return plan.memory.stop() if plan.memory is not None else {}

    def evaluate_global(self) -> EvalResult:
        """The current global model (adapter and the strategy's base delta) on the dev split(s)."""
        s = self.s
        s.model.apply_global(self.current, s.strategy.base_delta(), s.strategy.base_delta_key())
        return evaluate(s.model.module, s.task, s.data.evals, s.config.eval_batch_size, s.device, s.precision)

    def finish(self) -> RoundsResult:
        """Write final/: the global model as one plain PEFT adapter, and its metrics."""
        s = self.s
        exported = s.strategy.export(self.current)
        extra = {"exported_rank": exported.lora.r} if exported.lora.r != self.current.lora.r else {}
        final = s.recorder.finish(exported, self.metrics, s.config.rounds, extra)
        tracker = as_tracker(self.progress)
        eval_metrics = {f"eval/{k}": v for k, v in self.metrics.items() if isinstance(v, int | float)}
        if eval_metrics:
            tracker.log_metrics(s.config.rounds, eval_metrics)
        tracker.log_artifact(final, "adapter")
        return RoundsResult(s.run_dir, final, s.recorder.history, self.metrics, s.start_round,
                            len(self.client_ids), s.task.main_metric, s.stopped)  # fmt: skip


def round_info(row: HistoryRow, task: GlueTask) -> str:
    """The short status of a finished round shown beside the progress bar (every engine)."""
    ev = row.eval or {}
    metric = f"{task.main_metric} {ev[task.main_metric]:.4f} · " if task.main_metric in ev else ""
    return f"{metric}loss {row.train_loss:.4f} · agg err {row.aggregation['error']:.3f}"


# ---------------------------------------------------------------------------------------------------
# engine `local`: everything in this process


def run_local(
    config: RoundsConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RoundsResult:
    """Multi-round federated LoRA over the shards, every client in this process, one after another."""
    progress = progress or NullProgress()
    setup = prepare(config, progress=progress, argv=argv)
    try:
        with run_session(setup.run_dir):
            return _local_loop(RoundDriver(setup, progress), progress)
    except KeyboardInterrupt:
        done = setup.recorder.tree.last_complete_round()
        raise Interrupted(interrupted_rounds_message(setup.run_dir, done)) from None
    finally:
        setup.recorder.close()


def _local_loop(driver: RoundDriver, progress: Progress) -> RoundsResult:
    s = driver.s
    index = dict(zip(s.shards.client_ids, s.shards.clients, strict=True))
    progress.start("rounds", "rounds", total=s.config.rounds)
    progress.advance("rounds", s.start_round)
    for round_no in driver.rounds_left:
        plan = driver.plan_round(round_no)
        reports = [
            train_client(
                s.model,
                s.data,
                index[cid],
                plan.plans[cid],
                s.config.train,
                round_no=round_no,
                run_seed=s.config.train.seed,
                device=s.device,
                precision=s.precision,
                task=s.task if s.config.eval_clients else None,
                eval_batch_size=s.config.eval_batch_size,
                progress=progress,
            )  # fmt: skip
            for cid in plan.selected
        ]
        driver.close_round(plan, reports, [])
    progress.stop("rounds")
    return driver.finish()
