"""One client's turn of a round: engine local runs it in the server's process, a Flower ClientApp on its
SuperNode; both hand the `ClientReport` to `RoundDriver.close_round`."""

from __future__ import annotations

import numpy as np
import torch

from fedlora_cli.config import TrainSpec
from fedlora_cli.evaluation import evaluate
from fedlora_cli.features import TaskData
from fedlora_cli.federation.driver import derive_seed
from fedlora_cli.federation.personal import with_personal
from fedlora_cli.modeling import LoraModel
from fedlora_cli.progress import Progress
from fedlora_cli.strategies.base import ClientPlan, ClientReport, split_parts
from fedlora_cli.tasks import GlueTask
from fedlora_cli.training import TrainResult, planned_steps, schedule_window, tail_penalty, train_model


def train_client(
    model: LoraModel,
    data: TaskData,
    indices: np.ndarray,
    plan: ClientPlan,
    train_spec: TrainSpec,
    *,
    round_no: int,
    rounds: int | None = None,
    run_seed: int,
    device: torch.device,
    precision: str,
    task: GlueTask | None = None,
    eval_batch_size: int = 64,
    progress: Progress | None = None,
    personal: dict[str, torch.Tensor] | None = None,
) -> ClientReport:
    """One client's turn: load the plan (adapter, frozen parts, base delta), train on its shard, report.

    The base model is never reloaded: only the adapter state (and a method's base delta) moves in and
    out. Pass `task` to also evaluate the client's adapter on the dev split(s), and the run's `rounds` for
    a learning-rate schedule over all rounds (`--lr-schedule global-*`: this turn is round_no's slice).
    A plan with personal parts starts from the client's own (`personal`, as after its turn in
    `plan.personal_round`), or from the plan's personal start in its first turn; the report sends the
    shared parts and keeps the personal ones apart (`ClientReport.personal`), for the client to keep.
    """
    model.apply_plan(with_personal(plan, personal))
    seed = derive_seed(run_seed, round_no, plan.client_id)
    extra = tail_penalty(model.module, plan.tail_from, plan.tail_penalty) if plan.tail_penalty > 0 else None
    result = train_model(
        model.module,
        data.train,
        train_spec,
        device=device,
        precision=precision,
        seed=seed,
        indices=indices,
        progress=progress,
        progress_key="client",
        prox_mu=plan.prox_mu,
        extra_loss=extra,
        description=f"round {round_no} · client {plan.client_id}",
        window=client_window(train_spec, round_no, rounds, len(indices)),
    )
    return client_report(
        model,
        data,
        plan,
        result,
        seed,
        task=task,
        eval_batch_size=eval_batch_size,
        device=device,
        precision=precision,
    )


def client_window(
    spec: TrainSpec, round_no: int, rounds: int | None, examples: int
) -> tuple[int, int] | None:
    """Where this client's turn sits in a schedule over all rounds (None: a schedule of its own)."""
    if rounds is None:
        return None
    return schedule_window(spec.lr_schedule, round_no, rounds, planned_steps(examples, spec))


def client_report(
    model: LoraModel,
    data: TaskData,
    plan: ClientPlan,
    result: TrainResult,
    seed: int,
    *,
    task: GlueTask | None,
    eval_batch_size: int,
    device: torch.device,
    precision: str,
) -> ClientReport:
    """What a client sends back once its adapter (trained as `result` says) is the model's active one: its
    shared state (clipped to the plan's norm under client-side DP; personal parts kept apart), statistics
    and, with `task`, evaluation."""
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
    if result.lr_range is not None:
        train["lr_range"] = [float(v) for v in result.lr_range]
    state, own = model.state(), None
    if plan.personal:  # what is sent: the shared parts only
        state, own = split_parts(state, plan.personal)
    if plan.clip_norm is not None:  # differential privacy, clipped here: the server never sees more
        from fedlora_cli.privacy import clip_client_update

        state, train["update_norm"] = clip_client_update(
            state,
            plan.adapter.state,
            plan.clip_norm,
            space=plan.clip_space,
            scaling=plan.adapter.lora.scaling,
        )
    return ClientReport(
        plan.client_id, state, plan.adapter.lora, result.examples, seed, train, evaluation, personal=own
    )
