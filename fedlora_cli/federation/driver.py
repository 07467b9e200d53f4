"""The round driver every engine shares: select -> plan -> (the engine trains the clients) -> close the round.

A `RoundDriver` plans each round (`plan_round`: which clients, and what each one trains, as the strategy
decides) and closes it (`close_round`: check the clients' updates, save them, aggregate, evaluate, save the
global adapter and the strategy's state, write the history row); `finish` writes final/. Engine local
trains the planned clients one after another in this process (`local.py`); the Flower ServerApp sends the
same plans to SuperNodes and calls the same `close_round` with their replies. This module knows no engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli import memory
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.evaluation import EvalResult, evaluate, majority_metrics
from fedlora_cli.federation.personal import (
    ClientRunner,
    InProcessClients,
    PersonalStore,
    PersonalTurns,
    evaluate_global_per_client,
    summarise,
)
from fedlora_cli.federation.setup import Setup
from fedlora_cli.progress import NullProgress, Progress, as_tracker
from fedlora_cli.runs import complete_rounds
from fedlora_cli.runs.history import HistoryRow
from fedlora_cli.runs.integrity import STATE_FILE
from fedlora_cli.runs.record import now
from fedlora_cli.selection import Selection
from fedlora_cli.strategies.base import ClientPlan, ClientReport, GlobalAdapter
from fedlora_cli.tasks import GlueTask
from fedlora_cli.trackers import report_round


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
# the driver


@dataclass(frozen=True)
class RoundsResult:
    """What a federated run produced, whatever engine ran it; the CLI renders it."""

    run_dir: Path
    final_adapter: Path
    history: list[HistoryRow]
    final_metrics: dict[str, float]
    resumed_after: int  # rounds already complete when this call started
    clients: int
    main_metric: str
    stopped: str | None = None  # why the run ended before --rounds (--dp-target-epsilon, --early-stop)
    selected: dict[str, Any] | None = None  # --select: the round kept, its validation and dev metrics
    last: dict[str, Any] | None = None  # the last round's number, validation and dev metrics
    # --client-test-fraction: each client's final model on its local test split (personal.stats.client_stats)
    per_client: dict[str, Any] | None = None


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
        self.validation: dict[str, float] | None = dict(last.validation) if last and last.validation else None
        self.selection = Selection(config.select, setup.task.main_metric, config.early_stop)
        for row in setup.recorder.history:  # a resumed run chooses among every complete round
            if row.round >= 1:
                self.selection.observe(row.round, row.validation)
        self.stopped: str | None = None
        # Personal parts (strategies whose clients keep some): from which turn each client continues, where
        # engine local keeps them, and who runs a client's own model (engine Flower replaces `clients`).
        self.personal = PersonalTurns(setup.initial, setup.recorder.history)
        self.store = PersonalStore(setup.recorder.tree)
        self.clients: ClientRunner = InProcessClients(setup, self.store)
        if not setup.start_round and setup.config.eval_each_round and not setup.recorder.history:
            self._record_round_zero()

    @property
    def global_model(self) -> bool:
        """Whether the run has one model for all clients (False: its clients keep parts of theirs)."""
        return not self.s.strategy.personal_parts

    def _record_round_zero(self) -> None:
        """History row 0: the starting adapter (fresh from the seed, or --init-adapter) before training."""
        t = time.perf_counter()
        evaluation = validation = None
        if self.global_model:
            evaluation, validation = self.evaluate_current(dev=self.s.config.dev_each_round)
            if evaluation is not None:
                self.metrics = evaluation.metrics
            self.validation = validation.metrics if validation is not None else None
        # every client's model is the starting adapter (its personal parts too: their initial values)
        per_client = self._summary(self._global_per_client(), "start")
        seconds = time.perf_counter() - t
        row = HistoryRow(
            round=0,
            clients=[],
            failed=[],
            client_metrics=[],
            examples=0,
            train_loss=None,
            aggregation={},
            eval=evaluation.metrics if evaluation is not None else None,
            bytes_down=0,
            bytes_up=0,
            bytes_written=0,
            seconds={"wall": seconds, "eval": seconds},
            time=now(),
            eval_loss=evaluation.loss if evaluation is not None else None,
            validation=self.validation,
            extra={"per_client": per_client} if per_client is not None else {},
        )
        self.s.recorder.complete_round(row)
        report_round(self.progress, row.to_json())

    @property
    def rounds_left(self):
        """The rounds still to run, in order; ends early once `--early-stop` says so (`self.stopped`)."""
        if self.selection.stop:  # a resumed run that had already stopped early
            self.stopped = self._stop_message()
            return
        for round_no in range(self.s.start_round + 1, self.s.config.rounds + 1):
            if self.stopped is not None:
                return
            yield round_no

    @property
    def rounds_to_run(self) -> int:
        """How many rounds are left at most (fewer when --early-stop ends the run)."""
        return 0 if self.selection.stop else max(0, self.s.config.rounds - self.s.start_round)

    def _stop_message(self) -> str:
        sel = self.selection
        return (
            f"--early-stop {sel.patience}: no better validation {sel.metric} for {sel.since_best} "
            f"evaluations after round {sel.best_step} ({sel.best_value:.4f}); stopped after round "
            f"{sel.last_step}"
        )

    def plan_round(self, round_no: int) -> RoundPlan:
        """Select this round's clients (seeded) and ask the strategy what each one does."""
        started = time.perf_counter()
        selected = select_clients(self.client_ids, self.per_round, self.s.config.train.seed, round_no)
        plans = {cid: self.client_plan(round_no, cid) for cid in selected}
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
            return (
                f"the adapter's keys differ from the broadcast (missing {missing[:2]}, unexpected "
                f"{extra[:2]})"
            )
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
        for r in usable:  # engine local: each client's personal parts, with the round (Flower: on the client)
            if r.personal is not None:
                written += self.store.save(round_no, r.client_id, r.personal)
        self.personal.completed(round_no, [r.client_id for r in usable])
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
        evaluation = validation = per_client = None
        if config.eval_each_round or round_no == config.rounds:
            if self.global_model:
                evaluation, validation = self.evaluate_current(
                    dev=config.dev_each_round or round_no == config.rounds
                )
                if evaluation is not None:
                    self.metrics = evaluation.metrics
                self.validation = validation.metrics if validation is not None else None
                self.selection.observe(round_no, self.validation)
            per_client = self.evaluate_clients(round_no)
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
            },
            time=now(),
            learning_rate=max(
                (r.train["lr_range"][0] for r in usable if r.train.get("lr_range")), default=None
            ),
            eval_loss=evaluation.loss if evaluation is not None else None,
            validation=self.validation if validation is not None else None,
            extra={
                "memory": self._round_memory(plan),
                **_lr_range(usable),
                **({"per_client": per_client} if per_client is not None else {}),
            },
        )
        s.recorder.complete_round(row)
        if self.selection.stop and round_no < config.rounds:
            self.stopped = self._stop_message()
            self.progress.log(self.stopped)
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

    # --- each client's model on its local test split (--client-test-fraction) -----------------------------

    def evaluate_clients(self, round_no: int) -> dict[str, Any] | None:
        """Every client's own model on its local test split: the global adapter for a global method (scored
        here), the client's personal model otherwise (scored by `self.clients`); None without local tests."""
        if self.s.splits is None:
            return None
        if self.global_model:
            return self._summary(self._global_per_client(), "global")
        plans = {c: self.client_plan(round_no, c) for c in self.client_ids}
        return self._summary(self.clients.evaluate(round_no, plans), "personal")

    def _global_per_client(self) -> dict[int, Any] | None:
        if self.s.splits is None:
            return None
        strategy = self.s.strategy
        return evaluate_global_per_client(
            self.s, self.current, strategy.base_delta(), strategy.base_delta_key()
        )

    def _summary(self, outcomes: dict[int, Any] | None, model: str) -> dict[str, Any] | None:
        return None if outcomes is None else summarise(outcomes, self.s.task.main_metric, model)

    def client_plan(self, round_no: int, client_id: int) -> ClientPlan:
        """What the strategy plans for the client, and where its personal parts (if any) continue from."""
        return self.personal.plan(self.s.strategy.plan(round_no, client_id, self.current))

    def personal_state(self, plan: ClientPlan) -> dict[str, torch.Tensor] | None:
        """Engine local: the client's personal parts the plan continues from (None: its first turn, or
        none)."""
        return self.store.continued(plan)

    def _personalize(self, last_round: int, adapter: GlobalAdapter) -> dict[str, Any] | None:
        """final/clients/: every client's own final model — its personal model (a method with personal parts)
        or `adapter`, the global adapter the run reports — fine-tuned for --personalize-epochs, scored and
        saved."""
        s, epochs = self.s, self.s.config.personal.personalize_epochs
        if self.global_model and epochs <= 0:
            return None
        if self.global_model:
            plans = {c: ClientPlan(c, adapter) for c in self.client_ids}
        else:
            plans = {c: self.client_plan(last_round, c) for c in self.client_ids}
        self.progress.log(
            f"{len(plans)} clients: "
            + (f"fine-tuning for {epochs:g} epoch{'' if epochs == 1 else 's'}, " if epochs > 0 else "")
            + "their own final models"
        )
        outcomes = self.clients.personalize(last_round, plans, epochs)
        return self._summary(outcomes, "personal") if s.splits is not None else None

    def evaluate_global(self) -> EvalResult:
        """The current global model (adapter and the strategy's base delta) on the dev split(s)."""
        dev = self.evaluate_current()[0]
        assert dev is not None
        return dev

    def evaluate_current(self, dev: bool = True) -> tuple[EvalResult | None, EvalResult | None]:
        """The current global model on the dev split(s) (reported; `dev=False`: not now) and on the validation
        split (chooses)."""
        s = self.s
        s.model.apply_global(self.current, s.strategy.base_delta(), s.strategy.base_delta_key())
        return self._scores(dev)

    def _scores(self, dev: bool = True) -> tuple[EvalResult | None, EvalResult | None]:
        """The model as it is now (its adapter applied) on the dev split(s) and the validation split."""
        s = self.s
        scored = (
            evaluate(s.model.module, s.task, s.data.evals, s.config.eval_batch_size, s.device, s.precision)
            if dev
            else None
        )
        held = s.data.validation_splits
        val = (
            evaluate(s.model.module, s.task, held, s.config.eval_batch_size, s.device, s.precision)
            if held
            else None
        )
        return scored, val

    def _dev_of(self, adapter: GlobalAdapter | None) -> dict[str, float]:
        """--no-dev-each-round: the dev metrics of the current global model (None) or of an exported adapter
        (a round chosen on validation), scored once the run is over."""
        s = self.s
        if adapter is None:
            s.model.apply_global(self.current, s.strategy.base_delta(), s.strategy.base_delta_key())
        else:
            s.model.apply_global(adapter, {}, "")  # an exported adapter carries any base delta itself
        dev, _ = self._scores(dev=True)
        assert dev is not None
        return dev.metrics

    def finish(self) -> RoundsResult:
        """Write final/ (the last round's global model as one plain PEFT adapter) and, with --select best,
        best/ (the round chosen on the validation split, exported from that round's saved adapter and
        server state); final/metrics.json reports the selected adapter's dev metrics beside the last's."""
        s = self.s
        history = s.recorder.history
        last_round = history[-1].round if history else s.start_round
        exported = s.strategy.export(self.current)
        extra: dict[str, Any] = (
            {"exported_rank": exported.lora.r} if exported.lora.r != self.current.lora.r else {}
        )
        last_row = history[-1] if history else None
        if self.global_model and last_row is not None and last_row.eval is None and last_row.round >= 1:
            self.metrics = self._dev_of(None)  # --no-dev-each-round, or a run --early-stop ended
        last = {"round": last_round, "dev": self.metrics, "validation": self.validation}
        chosen = self.selection.chosen if s.config.select == "best" else None
        best = None
        reported, report_validation = self.metrics, self.validation
        if not self.global_model:  # its clients keep parts of their models: no global model was scored
            reported, report_validation = {}, None
        report_adapter, report_round = exported, last_round
        if chosen is not None:
            row = next(r for r in history if r.round == chosen)
            adapter = exported
            if chosen != last_round:
                global_k, state_k = s.recorder.load_global(chosen)
                s.strategy.load_state_dict(state_k)  # the run is over: its state only serves this export
                adapter = s.strategy.export(global_k)
            best = (chosen, adapter)
            report_adapter, report_round = adapter, chosen
            dev = (
                row.eval
                if row.eval is not None
                else (self.metrics if chosen == last_round else self._dev_of(adapter))
            )
            reported, report_validation = dict(dev), row.validation
        selected = {
            "rule": s.config.select,
            "metric": self.selection.metric,
            "round": chosen or last_round,
            "dev": reported,
            "validation": report_validation,
        }
        extra.update(
            selected=selected,
            last=last,
            validation=report_validation,
            majority=majority_metrics(s.task, s.data.evals),
        )
        if self.stopped:
            extra["stopped"] = self.stopped
        # per-client results: the reported round's evaluation, or (a personalised run) each client's final
        # model
        scored = next((r for r in history if r.round == report_round), None)
        per_client = (scored.extra.get("per_client") if scored is not None else None) or None
        personalised = self._personalize(last_round, report_adapter)
        if personalised is not None:
            if per_client is not None and per_client.get("model") == "global":
                extra["per_client_global"] = per_client  # before --personalize-epochs
            per_client = personalised
        if per_client is not None:
            extra["per_client"] = per_client
        final = s.recorder.finish(exported, reported, last_round, extra, best=best)
        tracker = as_tracker(self.progress)
        eval_metrics = {f"eval/{k}": v for k, v in reported.items() if isinstance(v, int | float)}
        if eval_metrics:
            tracker.log_metrics(last_round, eval_metrics)
        tracker.log_artifact(final, "adapter")
        return RoundsResult(
            run_dir=s.run_dir,
            final_adapter=final,
            history=history,
            final_metrics=reported,
            resumed_after=s.start_round,
            clients=len(self.client_ids),
            main_metric=s.task.main_metric,
            stopped=self.stopped or s.stopped,
            selected=selected,
            last=last,
            per_client=per_client,
        )


def _lr_range(reports: list[ClientReport]) -> dict[str, Any]:
    """The learning rates the round's clients trained with: from the highest first to the lowest last."""
    ranges = [r.train["lr_range"] for r in reports if r.train.get("lr_range")]
    if not ranges:
        return {}
    return {"learning_rate_range": [max(a for a, _ in ranges), min(b for _, b in ranges)]}


def round_info(row: HistoryRow, task: GlueTask) -> str:
    """The short status of a finished round shown beside the progress bar (every engine)."""
    ev = row.eval or {}
    metric = f"{task.main_metric} {ev[task.main_metric]:.4f} · " if task.main_metric in ev else ""
    clients = row.extra.get("per_client") or {}
    if clients.get("n"):
        metric += f"clients {clients['mean']:.4f} (worst 10 % {clients['worst10']:.4f}) · "
    error = row.aggregation.get("error")
    return f"{metric}loss {row.train_loss:.4f}" + (f" · agg err {error:.3f}" if error is not None else "")
