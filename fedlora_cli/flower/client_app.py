"""The ClientApp: one client's turn of `fedlora rounds` (`federation.train_client`) behind Flower's Message
API.

Every message carries the server's resolved settings (a "run-config" ConfigRecord: clients always
train with exactly the server's options, however the ServerApp got them — from the run config in a
deployment, from the command over the relay in `--engine flower`). The SuperNode's node config says which
shard the node serves and where its node-local files are:

- `partition-id` (set by Flower's simulation): the i-th client of the run config's `shards` folder;
- `shard-manifest='/abs/client_3.json'`: that manifest (client id from the file name, or `client-id`);
- `client-id=3` (with the run config's `shards`, or a node-local `shards='/abs/folder'`);
- `data-dir`, `model`, `device`: node-local replacements for the run config's `data.data-dir`,
  `model.name` and `model.device`;
- `personal-dir='/abs/folder'`: where the client saves its own final model (a personalised run,
  `<personal-dir>/client_NNN/adapter`); without it, into the run folder when that folder is on this
  machine (the simulation), else nowhere.

Personalised runs (a method whose clients keep parts of the adapter, --client-test-fraction,
--personalize-epochs): the node trains on its shard less its local test split (carved as the server
carves it), keeps its personal parts in `Context.state` after each turn (one record per turn it may still
continue from) and never sends them; `evaluate.personal` scores its own model on its local test split, and
`train.personalize` makes its final model (fine-tuned, scored, saved), replying with metrics only.

The base model and the tokenized data are built once per process and kept: a Ray actor in simulation
serves many rounds, and so does `fedlora clientapp` (worker.py) beside a SuperNode. Flower's own
deployment runtime starts a fresh process per message, where they are built again (the tokenized data
from fedlora's disk cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.flower import codec
from fedlora_cli.flower.codec import ARRAYS, CONFIG, IDENTITY, METRICS, REPORT, RUN_CONFIG
from fedlora_cli.progress import NullProgress

app = ClientApp()


# ---------------------------------------------------------------------------------------------------
# handlers: thin, each one core call


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who am I: the client id this node serves, its example count and a fingerprint of its indices."""

    def answer() -> Message:
        config = node_config(settings(msg), context.node_config)
        shard = read_shard(config, context.node_config)
        return Message(RecordDict({IDENTITY: ConfigRecord(shard.identity())}), reply_to=msg)

    return _answer(msg, answer)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global adapter, train it on this node's shard with the (round, client) seed, reply."""

    def answer() -> Message:
        from fedlora_cli.federation import train_client

        config = node_config(settings(msg), context.node_config)
        shard = read_shard(config, context.node_config)
        try:
            plan = codec.plan_from_content(msg.content)
            round_no = int(msg.content.config_records[CONFIG]["server-round"])
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"malformed TRAIN message ({e})") from None
        if plan.client_id != shard.client_id:
            raise InputError(f"this node serves client {shard.client_id}, not client {plan.client_id}")
        deadline = Deadline.of(msg, config, round_no)
        deadline.check()  # a message that waited past its round (a busy node, a queue): no work at all
        worker = _worker(config, plan.adapter.lora)
        worker.check(shard)
        train_indices = _split(config, shard, worker).train
        report = train_client(
            worker.model,
            worker.data,
            train_indices,
            plan,
            config.train,
            round_no=round_no,
            rounds=config.rounds,
            run_seed=config.train.seed,
            device=worker.device,
            precision=worker.precision,
            task=worker.task if config.eval_clients else None,
            eval_batch_size=config.eval_batch_size,
            progress=deadline,
            personal=stored_personal(context, plan),
        )
        if report.personal is not None:  # kept here, never sent
            keep_personal(context, round_no, report.personal, since=plan.personal_round)
        content = RecordDict(
            {
                ARRAYS: codec.state_to_arrays(report.state),
                METRICS: MetricRecord(
                    {"num-examples": report.examples, "train-loss": float(report.train["loss"])}
                ),
                REPORT: codec.report_to_config(
                    report.client_id, report.examples, report.seed, report.lora, report.train, report.eval
                ),
            }
        )
        return Message(content, reply_to=msg)

    return _answer(msg, answer)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's dev split(s) (federated evaluation)."""

    def answer() -> Message:
        from fedlora_cli.evaluation import evaluate as evaluate_model

        config = node_config(settings(msg), context.node_config)
        lora = codec.lora_from_config(msg.content.config_records[CONFIG])
        worker = _worker(config, lora)
        worker.model.load_state(codec.arrays_to_state(msg.content.array_records[ARRAYS]), lora)
        result = evaluate_model(
            worker.model.module,
            worker.task,
            worker.data.evals,
            config.eval_batch_size,
            worker.device,
            worker.precision,
        )
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["num-examples"] = int(result.examples)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return _answer(msg, answer)


@app.evaluate("personal")
def evaluate_personal(msg: Message, context: Context) -> Message:
    """Score this client's own model (the shared parts received, its personal parts) on its local test
    split."""

    def answer() -> Message:
        from fedlora_cli.federation.personal import evaluate_client

        config, shard, plan, round_no = _personal_message(msg, context)
        worker = _worker(config, plan.adapter.lora)
        worker.check(shard)
        split = _split(config, shard, worker)
        metrics: dict[str, float] = {}
        if len(split.test):
            metrics = evaluate_client(
                worker.model,
                worker.data,
                split.test,
                plan,
                stored_personal(context, plan),
                worker.task,
                batch_size=config.eval_batch_size,
                device=worker.device,
                precision=worker.precision,
                validation=split.held,
            )
        return _metrics_reply(msg, shard.client_id, metrics, "")

    return _answer(msg, answer)


@app.train("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """This client's final model: its own (or the final global adapter) fine-tuned for --personalize-epochs on
    its local training split, scored on its local test split, and saved on this machine; only the metrics go
    back."""

    def answer() -> Message:
        from fedlora_cli.federation.personal import client_meta, personalize_client, save_client_adapter

        config, shard, plan, round_no = _personal_message(msg, context)
        meta = msg.content.config_records[CONFIG]
        epochs = float(meta.get("personalize-epochs", 0.0))
        deadline = Deadline.of(msg, config, round_no)
        worker = _worker(config, plan.adapter.lora)
        worker.check(shard)
        split = _split(config, shard, worker)
        state, metrics = personalize_client(
            worker.model,
            worker.data,
            split.train,
            split.test,
            plan,
            stored_personal(context, plan),
            config.train,
            epochs,
            run_seed=config.train.seed,
            task=worker.task,
            batch_size=config.eval_batch_size,
            device=worker.device,
            precision=worker.precision,
            progress=deadline,
            validation=split.held,
        )
        folder = _personal_folder(context.node_config, str(meta.get("save-to", "")), shard.client_id)
        if folder is not None:
            save_client_adapter(
                folder,
                state,
                plan.adapter.lora,
                base_model=config.model.resolved,
                meta=client_meta(worker.task, config, round_no),
                client_id=shard.client_id,
            )
        return _metrics_reply(msg, shard.client_id, metrics, str(folder or ""))

    return _answer(msg, answer)


def _personal_message(msg: Message, context: Context) -> tuple[RoundsConfig, Shard, Any, int]:
    config = node_config(settings(msg), context.node_config)
    shard = read_shard(config, context.node_config)
    try:
        plan = codec.plan_from_content(msg.content)
        round_no = int(msg.content.config_records[CONFIG]["server-round"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"malformed {msg.metadata.message_type} message ({e})") from None
    if plan.client_id != shard.client_id:
        raise InputError(f"this node serves client {shard.client_id}, not client {plan.client_id}")
    return config, shard, plan, round_no


def _metrics_reply(msg: Message, client_id: int, metrics: Mapping[str, float], saved: str) -> Message:
    content = RecordDict(
        {
            METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
            REPORT: ConfigRecord({"client-id": client_id, "saved": saved}),
        }
    )
    return Message(content, reply_to=msg)


def _personal_folder(node: Mapping[str, Any], save_to: str, client_id: int) -> Path | None:
    """Where this client's final model goes: `personal-dir` of the node config, else the run's final/clients/
    when the run folder is on this machine (the simulation); None: it is not saved (only its metrics go
    back)."""
    from fedlora_cli.ownership import RUN_RECORD

    if node.get("personal-dir"):
        return Path(str(node["personal-dir"])).expanduser() / f"client_{client_id:03d}" / "adapter"
    if save_to and (Path(save_to).parents[1] / RUN_RECORD).is_file():
        return Path(save_to) / f"client_{client_id:03d}" / "adapter"
    return None


# ---------------------------------------------------------------------------------------------------
# this client's personal parts, in its Context.state (never sent)

PERSONAL_RECORD = "fedlora.personal."  # + the round of the turn that left them


def keep_personal(context: Context, round_no: int, state: Mapping[str, Any], *, since: int) -> None:
    """Keep the personal parts this turn left; forget those of turns before `since` (the turn this one
    continued from: the server never names an older one again). A turn the server refused stays until a later
    one counts."""
    for name in list(context.state.array_records):
        if name.startswith(PERSONAL_RECORD) and int(name.removeprefix(PERSONAL_RECORD)) < since:
            del context.state[name]
    context.state[f"{PERSONAL_RECORD}{round_no}"] = codec.state_to_arrays(state)


def stored_personal(context: Context, plan: Any) -> dict[str, Any] | None:
    """The personal parts the plan continues from (None: its first turn, or a plan without personal parts)."""
    if not plan.personal or not plan.personal_round:
        return None
    record = context.state.array_records.get(f"{PERSONAL_RECORD}{plan.personal_round}")
    return codec.arrays_to_state(record) if record is not None else None


class Deadline(NullProgress):
    """Stops a client's turn once the server has stopped waiting for it (--round-timeout after the message
    was created): a timed-out client frees its worker (a Ray actor in simulation, the SuperNode's
    process) for the next message instead of finishing work nobody reads. Checked before training and
    at every optimizer step. Uses the server's clock (the message's creation time) against this
    machine's: clocks kept by NTP differ by far less than a sensible --round-timeout.
    """

    def __init__(self, deadline: float | None, round_no: int) -> None:
        self.deadline = deadline
        self.round_no = round_no

    @classmethod
    def of(cls, msg: Message, config: RoundsConfig, round_no: int) -> Deadline:
        timeout = config.round_timeout
        return cls(None if timeout is None else msg.metadata.created_at + timeout, round_no)

    def check(self) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise FedloraError(
                f"stopped: round {self.round_no}'s --round-timeout has passed, so the server no "
                f"longer waits for this client"
            )

    def start(self, key: str, description: str, total: int | None = None) -> None:
        self.check()

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        self.check()


def _answer(msg: Message, make_reply: Callable[[], Message]) -> Message:
    """Expected failures go back as an error reply with the one-line message; bugs propagate to Flower."""
    try:
        return make_reply()
    except FedloraError as e:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(e)), reply_to=msg)


# ---------------------------------------------------------------------------------------------------
# settings: the server's run config, then this node's replacements


def settings(msg: Message) -> RoundsConfig:
    """The server's RoundsConfig, from the message."""
    record = msg.content.config_records.get(RUN_CONFIG)
    if record is None:
        raise InputError("the message carries no fedlora run config: is the ServerApp fedlora's?")
    try:
        return codec.from_run_config(dict(record))
    except ValueError as e:
        raise InputError(str(e)) from None


def node_config(config: RoundsConfig, node: Mapping[str, Any]) -> RoundsConfig:
    """Apply the node config's node-local paths and device."""
    data, model = config.data, config.model
    try:
        if node.get("data-dir"):
            data = replace(data, data_dir=str(node["data-dir"]))
        if node.get("model"):
            model = replace(model, name=str(node["model"]))
        if node.get("device"):
            model = replace(model, device=str(node["device"]))
    except ValueError as e:
        raise InputError(f"node config: {e}") from None
    return replace(config, data=data, model=model)


# ---------------------------------------------------------------------------------------------------
# which shard this node serves


@dataclass(frozen=True)
class Shard:
    client_id: int
    indices: np.ndarray
    task: str | None  # the manifest's "dataset"
    source: str  # the manifest or folder it was read from (for messages)

    @property
    def fingerprint(self) -> str:
        from fedlora_cli.sharding import shard_fingerprint

        return shard_fingerprint([self.client_id], [self.indices])

    def identity(self) -> dict[str, Any]:
        return {
            "client-id": self.client_id,
            "num-examples": int(len(self.indices)),
            "fingerprint": self.fingerprint,
            "dataset": self.task or "",
        }


_SHARDS: dict[tuple, Shard] = {}


def read_shard(config: RoundsConfig, node: Mapping[str, Any]) -> Shard:
    """The shard named by the node config (cached per process)."""
    key = tuple(str(node.get(k, "")) for k in ("shard-manifest", "client-id", "partition-id", "shards"))
    key += (config.shards,)
    if key not in _SHARDS:
        _SHARDS[key] = _read_shard(config, node)
    return _SHARDS[key]


def _read_shard(config: RoundsConfig, node: Mapping[str, Any]) -> Shard:
    from fedlora_cli.sharding import CLIENT_FILE, read_shards

    explicit = node.get("client-id")
    manifest = node.get("shard-manifest")
    if manifest:
        path = Path(str(manifest)).expanduser()
        if explicit is None:
            m = CLIENT_FILE.match(path.name)
            if not m:
                raise InputError(
                    f"node config: cannot tell the client id from {path.name}: name the "
                    f"manifest client_<i>.json or add client-id=<i>"
                )
            explicit = m.group(1)
        from fedlora_cli.sharding import read_manifest

        manifest = read_manifest(path, option="node config: shard-manifest")
        return Shard(_int("client-id", explicit), manifest.indices, manifest.dataset, str(path))
    folder = node.get("shards") or config.shards
    if not folder:
        raise InputError(
            "node config: give shard-manifest='/path/client_<i>.json' (or partition-id / "
            "client-id with the run config's shards folder)"
        )
    shards = read_shards(str(folder))
    if explicit is not None:
        client_id = _int("client-id", explicit)
        if client_id not in shards.client_ids:
            raise InputError(
                f"node config: client-id {client_id} is not in {folder} "
                f"(clients {shards.client_ids[0]}..{shards.client_ids[-1]})"
            )
        position = shards.client_ids.index(client_id)
    elif "partition-id" in node:
        position = _int("partition-id", node["partition-id"])
        if not 0 <= position < len(shards.client_ids):
            raise InputError(
                f"node config: partition-id {position}, but {folder} has {len(shards.client_ids)} clients"
            )
    else:
        raise InputError("node config: give shard-manifest, client-id or partition-id")
    return Shard(shards.client_ids[position], shards.clients[position], shards.task, str(shards.directory))


def _int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"node config: {name} must be a whole number, got {value!r}") from None


# ---------------------------------------------------------------------------------------------------
# the model and data, built once per process


_SPLITS: dict[tuple, Any] = {}  # personal.split.ClientSplit by (client, shard, fractions, seed)


def _split(config: RoundsConfig, shard: Shard, worker: _Worker) -> Any:
    """This node's shard carved as the server carves it (--client-test-fraction,
    --client-validation-fraction): a personal.split.ClientSplit (`.train`, `.test`, `.held`)."""
    from fedlora_cli.personal.split import ClientSplit, split_client

    personal = config.personal
    if personal.client_test_fraction <= 0:
        return ClientSplit(shard.client_id, shard.indices, shard.indices[:0])
    key = (
        shard.client_id,
        shard.fingerprint,
        personal.client_test_fraction,
        personal.client_validation_fraction,
        config.train.seed,
    )
    if key not in _SPLITS:
        _SPLITS[key] = split_client(
            shard.client_id,
            shard.indices,
            worker.data.train.labels,
            personal.client_test_fraction,
            config.train.seed,
            regression=worker.task.is_regression,
            validation_fraction=personal.client_validation_fraction,
        )
    return _SPLITS[key]


@dataclass
class _Worker:
    model: Any  # modeling.LoraModel
    data: Any  # features.TaskData
    task: Any  # tasks.GlueTask
    device: Any
    precision: str
    checked: set[tuple[int, str]]

    def check(self, shard: Shard) -> None:
        """The shard fits this node's training data (task, index range, not empty); once per shard."""
        from fedlora_cli.sharding import ShardSet, validate_shards

        if (shard.client_id, shard.fingerprint) in self.checked:
            return
        one = ShardSet(
            Path(shard.source), [shard.indices], [shard.client_id], shard.task, None, shard.fingerprint
        )
        validate_shards(one, self.task.name, len(self.data.train))
        self.checked.add((shard.client_id, shard.fingerprint))


_WORKERS: dict[tuple, _Worker] = {}


def _worker(config: RoundsConfig, lora: Any) -> _Worker:
    from fedlora_cli.modeling import LoraModel, resolve_device, resolve_precision
    from fedlora_cli.preamble import load_model_and_data
    from fedlora_cli.progress import NullProgress

    key = (config.model, config.data, config.train.seed, config.train.precision)
    if key not in _WORKERS:
        _WORKERS.clear()  # one base model per process
        device = resolve_device(config.model.device)
        precision = resolve_precision(config.train.precision, device)
        base, data, _ = load_model_and_data(
            config.model, config.data, config.train.seed, train=True, progress=NullProgress()
        )
        model = LoraModel(base, lora, device, base_name=config.model.resolved)
        _WORKERS[key] = _Worker(model, data, config.data.glue_task, device, precision, set())
    return _WORKERS[key]
