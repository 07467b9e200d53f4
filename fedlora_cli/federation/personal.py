"""Personal parts and per-client results during a run, the same for every engine.

A method may keep parts of the adapter on the clients (`Strategy.personal_parts`: FedSA-LoRA's B and head;
everything for `local`). The server never holds them: a plan carries the shared parts only, and says from
which of the client's own turns its personal parts continue (`PersonalTurns`: the last complete round in
which the client's update counted; 0 before its first, when the plan carries the run's initial values of
those parts instead). Engine local keeps each client's personal parts in the run tree, beside the update it
sent (`round_NNN/client_NNN/personal.safetensors`, sealed with the round, so `--resume` continues
bit-identically); a Flower ClientApp keeps them in its `Context.state`.

Per-client evaluation (`--client-test-fraction`): every evaluation scores each client's own model on its
local test split (and local validation split, `--client-validation-fraction`) — the global adapter for a
global method (the server does it, one pass over every local split), the client's personal model otherwise
(`ClientRunner.evaluate`: in this process for engine local, on the SuperNodes for Flower). At the end, a
personalised run (personal parts, or `--personalize-epochs E`) gives every client its final model
(`ClientRunner.personalize`: fine-tuned for E epochs on its local training split, scored on its local test
split, saved as a plain PEFT adapter, `final/clients/client_NNN/adapter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedlora_cli import atomic
from fedlora_cli.errors import InputError
from fedlora_cli.runs import RoundTree
from fedlora_cli.runs.history import HistoryRow
from fedlora_cli.strategies.base import ClientPlan, GlobalAdapter, fit, split_parts

PERSONAL_FILE = "personal.safetensors"  # round_NNN/client_NNN/: the client's personal parts after that turn
CLIENTS_DIR = "clients"  # final/clients/client_NNN/adapter: each client's own final model
# A client's fine-tuning (--personalize-epochs) trains with derive_seed(--seed, 0, client): no round is 0.
PERSONALIZE_ROUND = 0
VALIDATION_PREFIX = "validation_"  # a client's local-validation scores beside its local-test ones

Outcome = dict[str, float] | str  # a client's metrics, or why it gave none


def client_adapter_dir(final_dir: Path, client_id: int) -> Path:
    return Path(final_dir) / CLIENTS_DIR / f"client_{client_id:03d}" / "adapter"


# ---------------------------------------------------------------------------------------------------
# where each client's personal parts stand


class PersonalTurns:
    """For each client, the last complete round in which its update counted (0: none yet), from the history.

    Every engine keeps the client's personal parts as they were after that turn (a client whose update
    the server refused continues from its turn before), so the plan names that round (`personal_round`).
    """

    def __init__(self, initial: GlobalAdapter, history: Sequence[HistoryRow] = ()) -> None:
        self.initial = initial
        self.last: dict[int, int] = {}
        for row in history:
            if row.round >= 1:
                self.completed(row.round, row.clients)

    def completed(self, round_no: int, client_ids: Sequence[int]) -> None:
        for cid in client_ids:
            self.last[int(cid)] = round_no

    def plan(self, plan: ClientPlan) -> ClientPlan:
        """`plan` with the round the client's personal parts come from, or (first turn) their initial
        values."""
        if not plan.personal:
            return plan
        done = self.last.get(plan.client_id, 0)
        if done:
            return replace(plan, personal_round=done, personal_start={})
        lora = plan.adapter.lora
        _, start = split_parts(fit(self.initial, lora.r, lora.scaling, lora).state, plan.personal)
        return replace(plan, personal_round=0, personal_start=start)


def with_personal(plan: ClientPlan, personal: Mapping[str, torch.Tensor] | None) -> ClientPlan:
    """The plan a client trains or scores: the shared parts it was sent plus its own personal parts
    (`personal`, from its turn in `plan.personal_round`), or, before its first turn, the plan's personal
    start."""
    if not plan.personal:
        return plan
    if plan.personal_round and personal is None:
        raise InputError(
            f"client {plan.client_id} has no personal parts from round {plan.personal_round}: the client "
            "that trained them is gone (a Flower ClientApp keeps them in its Context.state, which a "
            "restarted node or simulation starts empty); start the run again"
        )
    own = dict(personal) if plan.personal_round else dict(plan.personal_start)
    shared, mine = split_parts(own, plan.personal)
    if shared or not own:
        raise InputError(
            f"client {plan.client_id}: its personal parts hold {sorted(shared)[:2] or 'nothing'}"
        )
    state = {**mine, **plan.adapter.state}
    return replace(plan, adapter=GlobalAdapter(state, plan.adapter.lora))


# ---------------------------------------------------------------------------------------------------
# engine local: the clients' personal parts in the run tree


class PersonalStore:
    """Engine local's memory of each client's personal parts: `round_NNN/client_NNN/personal.safetensors`.

    Written with the round (its digest sealed in the round record), so `--resume` finds what an uninterrupted
    run had; read back checked against that digest, since a client may continue from a round long before.
    """

    def __init__(self, tree: RoundTree) -> None:
        self.tree = tree

    def path(self, round_no: int, client_id: int) -> Path:
        return self.tree.client_dir(round_no, client_id) / PERSONAL_FILE

    def save(self, round_no: int, client_id: int, state: Mapping[str, torch.Tensor]) -> int:
        from safetensors.torch import save

        blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        atomic.write_bytes(self.path(round_no, client_id), blob)
        return len(blob)

    def continued(self, plan: ClientPlan) -> dict[str, torch.Tensor] | None:
        """The personal parts `plan` continues from (None: the client's first turn, or a plan without any)."""
        return (
            self.load(plan.client_id, plan.personal_round) if plan.personal and plan.personal_round else None
        )

    def load(self, client_id: int, round_no: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        from fedlora_cli.runs.integrity import damaged, read_round_record, sha256_file

        path = self.path(round_no, client_id)
        if not path.is_file():
            raise damaged(
                path,
                "is missing (a run made with --engine flower keeps its clients' personal parts on the "
                "clients)",
                round_no,
            )
        # a complete round's file is checked against its seal; the round in progress (no record yet) wrote it
        # now
        sealed = (self.tree.global_dir(round_no) / "metrics.json").is_file()
        files = read_round_record(self.tree, round_no).get("files") if sealed else None
        name = path.relative_to(self.tree.round_dir(round_no)).as_posix()
        if isinstance(files, dict) and files.get(name) != sha256_file(path):
            raise damaged(path, "does not match the sha256 recorded when the round completed", round_no)
        return load(path.read_bytes())


# ---------------------------------------------------------------------------------------------------
# a client's own model: scored, fine-tuned, saved (the same code in this process and in a Flower ClientApp)


def evaluate_client(
    model: Any,
    data: Any,
    test: np.ndarray,
    plan: ClientPlan,
    personal: Mapping[str, torch.Tensor] | None,
    task: Any,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    validation: np.ndarray | None = None,
) -> dict[str, float]:
    """The client's own model (the plan's shared parts and its personal parts) on its local test split (and
    its local validation split: `validation_<metric>` keys)."""
    model.apply_plan(with_personal(plan, personal))
    return score_client(model.module, task, data, test, validation, batch_size, device, precision)


def score_client(
    module: Any,
    task: Any,
    data: Any,
    test: np.ndarray,
    validation: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """One client's model as it is on its local test split (`examples` and the task's metrics) and, when it
    has one, its local validation split (the same, each key prefixed `validation_`): flat numbers, as a
    Flower MetricRecord carries them."""
    from fedlora_cli.evaluation import evaluate

    out: dict[str, float] = {}
    for prefix, indices in (("", test), (VALIDATION_PREFIX, validation)):
        if indices is None or not len(indices):
            continue
        result = evaluate(module, task, {"client": data.train.subset(indices)}, batch_size, device, precision)
        out.update({f"{prefix}{k}": float(v) for k, v in result.metrics.items()})
        out[f"{prefix}examples"] = float(result.examples)
    return out


def personalize_client(
    model: Any,
    data: Any,
    train: np.ndarray,
    test: np.ndarray,
    plan: ClientPlan,
    personal: Mapping[str, torch.Tensor] | None,
    train_spec: Any,
    epochs: float,
    *,
    run_seed: int,
    task: Any,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: Any = None,
    validation: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A client's final model: its own (or the final global adapter) fine-tuned for `epochs` on its local
    training split (0: as it is), then scored on its local test (and validation) split (no metrics without
    one); returns (state, metrics)."""
    from fedlora_cli.federation.driver import derive_seed
    from fedlora_cli.training import train_model

    model.apply_plan(replace(with_personal(plan, personal), train=frozenset({"A", "B", "head"}), prox_mu=0.0))
    metrics: dict[str, float] = {}
    if epochs > 0:
        spec = replace(train_spec, epochs=float(epochs), lr_schedule=_turn_schedule(train_spec.lr_schedule))
        result = train_model(
            model.module,
            data.train,
            spec,
            device=device,
            precision=precision,
            seed=derive_seed(run_seed, PERSONALIZE_ROUND, plan.client_id),
            indices=train,
            progress=progress,
            progress_key="client",
            description=f"fine-tuning · client {plan.client_id}",
        )
        metrics.update(train_loss=float(result.loss), train_steps=float(result.steps))
    state = model.state()
    metrics.update(score_client(model.module, task, data, test, validation, batch_size, device, precision))
    return state, metrics


def _turn_schedule(schedule: str) -> str:
    """Fine-tuning is one turn of its own: a schedule over all rounds (global-*) becomes the per-turn one."""
    return {"global-linear": "per-turn", "global-cosine": "cosine"}.get(schedule, schedule)


def save_client_adapter(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    lora: Any,
    *,
    base_model: str | None,
    meta: Mapping[str, Any],
    client_id: int,
) -> Path:
    """A client's final model as one plain PEFT adapter (`final/clients/client_NNN/adapter`)."""
    from fedlora_cli.modeling import save_adapter

    save_adapter(folder, dict(state), lora, base_model=base_model, meta={**meta, "client": client_id})
    return folder


def client_meta(task: Any, config: Any, rounds: int) -> dict[str, Any]:
    """What a client's final adapter says about itself (fedlora_adapter.json), the same on every engine."""
    return {
        "task": task.name,
        "label_names": list(task.label_names),
        "origin": "client",
        "round": rounds,
        "method": config.aggregation.method,
        "personalize_epochs": config.personal.personalize_epochs,
    }


# ---------------------------------------------------------------------------------------------------
# who runs the clients' own models


class ClientRunner(Protocol):
    """Runs what only a client can do with its personal parts: score its own model, finish it (engine local in
    this process, `InProcessClients`; Flower sends messages to the SuperNodes)."""

    def evaluate(self, round_no: int, plans: Mapping[int, ClientPlan]) -> dict[int, Outcome]: ...

    def personalize(
        self, rounds: int, plans: Mapping[int, ClientPlan], epochs: float
    ) -> dict[int, Outcome]: ...


class InProcessClients:
    """Engine local's clients: the run's one model and data, each client's personal parts from the run
    tree."""

    def __init__(self, setup: Any, store: PersonalStore) -> None:
        self.s = setup
        self.store = store

    def evaluate(self, round_no: int, plans: Mapping[int, ClientPlan]) -> dict[int, Outcome]:
        s, out = self.s, {}
        for cid, plan in sorted(plans.items()):
            test = s.splits.test(cid)
            if len(test):
                out[cid] = evaluate_client(
                    s.model,
                    s.data,
                    test,
                    plan,
                    self.store.continued(plan),
                    s.task,
                    batch_size=s.config.eval_batch_size,
                    device=s.device,
                    precision=s.precision,
                    validation=s.client_validation(cid),
                )
        return out

    def personalize(self, rounds: int, plans: Mapping[int, ClientPlan], epochs: float) -> dict[int, Outcome]:
        s, out = self.s, {}
        meta = client_meta(s.task, s.config, rounds)
        for cid, plan in sorted(plans.items()):
            train, test = s.client_split(cid)
            state, metrics = personalize_client(
                s.model,
                s.data,
                train,
                test,
                plan,
                self.store.continued(plan),
                s.config.train,
                epochs,
                run_seed=s.config.train.seed,
                task=s.task,
                batch_size=s.config.eval_batch_size,
                device=s.device,
                precision=s.precision,
                validation=s.client_validation(cid),
            )
            save_client_adapter(
                client_adapter_dir(s.recorder.tree.final_dir, cid),
                state,
                plan.adapter.lora,
                base_model=s.recorder.base_model,
                meta=meta,
                client_id=cid,
            )
            out[cid] = metrics
        return out


def evaluate_global_per_client(
    setup: Any, adapter: GlobalAdapter, base_delta: Any, key: str
) -> dict[int, Outcome]:
    """One global model on every client's local test (and validation) split: one pass over all of them, scored
    per client and split."""
    from fedlora_cli.evaluation import compute_metrics, predict, to_predictions

    s = setup
    clients = [c for c in s.shards.client_ids if len(s.splits.test(c))]
    if not clients:
        return {}
    s.model.apply_global(adapter, base_delta, key)
    parts = [(c, "", s.splits.test(c)) for c in clients]
    parts += [(c, VALIDATION_PREFIX, s.splits.validation(c)) for c in clients if len(s.splits.validation(c))]
    data = s.data.train.subset(np.concatenate([indices for _, _, indices in parts]))
    logits, _, _ = predict(s.model.module, data, s.config.eval_batch_size, s.device, s.precision)
    predictions = to_predictions(s.task, logits)
    out: dict[int, dict[str, float]] = {c: {} for c in clients}
    start = 0
    for cid, prefix, indices in parts:
        end = start + len(indices)
        metrics = compute_metrics(s.task, predictions[start:end], data.labels[start:end])
        out[cid].update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
        out[cid][f"{prefix}examples"] = float(len(indices))
        start = end
    return dict(out)


def summarise(outcomes: Mapping[int, Outcome], metric: str, model: str) -> dict[str, Any]:
    """The per-client statistics of a history row or final/metrics.json (`personal.stats.client_stats`) on the
    local tests; with local validation splits, theirs too under `validation` (what a sweep tunes on)."""
    from fedlora_cli.personal.stats import client_stats

    scored = {c: o for c, o in outcomes.items() if isinstance(o, dict)}
    failed = {c: o for c, o in outcomes.items() if isinstance(o, str)}
    stats = client_stats(
        {c: o.get(metric, float("nan")) for c, o in scored.items()}, metric, model=model, failed=failed
    )
    held = f"{VALIDATION_PREFIX}{metric}"
    if any(held in o for o in scored.values()):
        values = {c: o.get(held, float("nan")) for c, o in scored.items()}
        stats["validation"] = client_stats(values, metric, model=model, failed=failed)
    return stats
