"""The ServerApp: `fedlora rounds` on Flower. Flower's `Strategy.start` drives the rounds and carries the
messages; selection, aggregation, evaluation and the run tree are `federation`'s, as in engine `local`.

A run: `federation.prepare` (data, model, run folder; --resume) -> a QUERY to every SuperNode (which
client does it serve?) -> per round, `FedloraStrategy.configure_train` sends the global adapter to
the nodes of the clients `select_clients` picked, and `aggregate_train` turns the replies into
`ClientReport`s, tolerates failures down to --min-clients, and calls `finish_round` -> final adapter.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.flower import codec
from fedlora_cli.flower.codec import ARRAYS, IDENTITY, REPORT, RUN_CONFIG
from fedlora_cli.progress import Progress

if TYPE_CHECKING:  # the core loads when a run starts, not when Flower imports this app
    from fedlora_cli.federation import RoundDriver, RoundPlan
    from fedlora_cli.strategies.base import ClientReport

app = ServerApp()
POLL_SECONDS = 0.25  # how often replies are pulled (Flower's HTTP grid waits 3 s between pulls)
# The least time SuperNodes get to say which client they serve: the first answer costs a node its start-up
# (Ray starting actors, importing torch), which a --round-timeout sized for training need not cover.
IDENTIFY_SECONDS = 120.0
_log = logging.getLogger("flwr")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`fedlora rounds --engine flower` (simulation.py): settings, progress display, Ctrl-C and the result go
    over the relay to the command. Deployment (`flwr run .`): settings from the run config, progress as Flower
    log lines."""
    from fedlora_cli.flower import relay

    link = relay.link_from_env()
    if link is not None:
        from fedlora_cli.federation import cli_resume_hint

        def serve(config, argv, progress, abort, on_prepared) -> Any:  # what `Link.serve` calls
            flower = replace(config, engine="flower")
            options = dict(progress=progress, argv=argv, abort=abort, on_prepared=on_prepared)
            return run_server(grid, flower, resume_hint=cli_resume_hint, **options)

        link.serve(serve)
        return
    try:
        config = replace(codec.from_run_config(context.run_config), engine="flower")
    except ValueError as e:
        raise InputError(str(e)) from None
    overrides = codec.run_config_overrides(config)
    argv = [
        "flwr",
        "run",
        ".",
        "--run-config",
        " ".join(f"{k}={codec.toml_value(v)}" for k, v in overrides.items()),
    ]
    run_server(grid, config, progress=LogProgress(), argv=argv, resume_hint=flwr_resume_hint(config))


def flwr_resume_hint(config: RoundsConfig) -> Callable[[Path], str]:
    def hint(run_dir: Path) -> str:
        where = (
            f"output.output-dir={codec.toml_value(config.output.output_dir)}"
            if config.output.output_dir
            else f"output.run-name={codec.toml_value(run_dir.name)}"
        )
        return f"`flwr run . --run-config 'resume=true {where}'` (same other settings)"

    return hint


# ---------------------------------------------------------------------------------------------------
# one run


def run_server(
    grid: Grid,
    config: RoundsConfig,
    *,
    progress: Progress,
    argv: list[str] | None,
    resume_hint: Callable[[Path], str],
    abort: threading.Event | None = None,
    on_prepared: Callable[[Path], None] | None = None,
) -> Any:
    """All rounds of a run over the SuperNodes of `grid`; returns a `federation.RoundsResult`.

    The run's lifecycle is `federation.run_federated`'s, as for engine local; Flower brings the round loop.
    """
    from fedlora_cli.federation import client_count, run_federated

    clients = client_count(config)
    per_round = config.clients_in_round(clients)
    if config.min_clients is not None and config.min_clients > per_round:
        raise InputError(
            f"--min-clients {config.min_clients} is more than the {per_round} clients selected per round"
        )
    grid = PollingGrid(grid, abort)

    def flower_rounds(driver: RoundDriver) -> None:
        """Find which node serves which client, then let Flower's `Strategy.start` carry the rounds left."""
        nodes = identify_clients(grid, driver.s.shards, driver.s.config, progress)
        strategy = FedloraStrategy(driver, nodes)
        driver.clients = FlowerClients(
            strategy, grid
        )  # a client's own model is scored and finished on its node
        remaining = driver.rounds_to_run
        # --round-timeout None: wait for every reply (PollingGrid takes None, though Flower's type says float)
        timeout: Any = config.round_timeout
        if remaining > 0:
            strategy.start(grid, strategy.global_arrays(), num_rounds=remaining, timeout=timeout)

    return run_federated(
        config, flower_rounds, progress=progress, argv=argv, resume_hint=resume_hint, on_prepared=on_prepared
    )


# ---------------------------------------------------------------------------------------------------
# who serves which client


def identify_clients(
    grid: PollingGrid, shards: Any, config: RoundsConfig, progress: Progress
) -> dict[int, int]:
    """Ask every SuperNode which client it serves (a QUERY message); returns {client id: node id}.

    Waits until every client of `shards` is served, or --round-timeout passes (then the missing clients
    count as failed whenever they are selected). A node that serves a client with other indices than
    the server's manifest, or the same client as another node, is a setup error.
    """
    wait = identify_timeout(config)
    deadline = None if wait is None else time.monotonic() + wait
    served: dict[int, int] = {}
    asked: set[int] = set()
    said_waiting = False
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        asked.update(new)
        for cid, node in query_nodes(grid, new, shards, config, wait).items():
            if cid in served:
                raise InputError(
                    f"SuperNodes {served[cid]} and {node} both serve client {cid}: give each its own shard"
                )
            served[cid] = node
        if len(served) == len(shards.client_ids) or (deadline is not None and time.monotonic() > deadline):
            break
        if not said_waiting:
            progress.log(f"waiting for SuperNodes: {len(served)} of {len(shards.client_ids)} clients served")
            said_waiting = True
        grid.wait(1.0)
    missing = sorted(set(shards.client_ids) - set(served))
    if missing:
        progress.log(
            f"no SuperNode serves client(s) {', '.join(map(str, missing))}: they count as failed when "
            "selected"
        )
    return served


def identify_timeout(config: RoundsConfig) -> float | None:
    """How long to wait for SuperNodes to say which client they serve (None: until all have)."""
    return None if config.round_timeout is None else max(config.round_timeout, IDENTIFY_SECONDS)


def query_nodes(
    grid: Grid, nodes: list[int], shards: Any, config: RoundsConfig, timeout: float | None
) -> dict[int, int]:
    """One QUERY to each of `nodes`; {client id: node id} of those that answered, checked against `shards`."""
    from fedlora_cli.sharding import shard_fingerprint

    if not nodes:
        return {}
    expected = {
        cid: shard_fingerprint([cid], [idx])
        for cid, idx in zip(shards.client_ids, shards.clients, strict=True)
    }
    record = codec.run_config_record(config)
    messages = [
        Message(RecordDict({RUN_CONFIG: record}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            crash = crash_reason(reply.error.code, reply.error.reason)
            if crash is not None:  # not the input's fault: exit 1, as any failure of the machine
                raise FedloraError(
                    f"SuperNode {node} failed while starting its client ({crash}); if the machine ran "
                    "out of memory, run fewer clients at once (a larger --client-cpus) or give "
                    "it more memory"
                )
            raise InputError(f"SuperNode {node} cannot serve a client: {one_line(reply.error.reason)}")
        try:
            identity = reply.content.config_records[IDENTITY]
            cid = codec.whole(identity, "client-id", 0, codec.MAX_EXAMPLES)
        except (KeyError, ValueError) as e:
            raise InputError(
                f"SuperNode {node} gave a malformed answer to which client it serves ({e})"
            ) from None
        if cid not in expected:
            raise InputError(f"SuperNode {node} serves client {cid}, which is not in {shards.directory}")
        if identity.get("fingerprint") != expected[cid]:
            raise InputError(
                f"SuperNode {node} serves client {cid} with other indices than {shards.directory}/"
                f"client_{cid}.json: give every node its manifest from the same `fedlora shard` run"
            )
        if cid in found:
            raise InputError(
                f"SuperNodes {found[cid]} and {node} both serve client {cid}: give each its own shard"
            )
        found[cid] = node
    return found


# ---------------------------------------------------------------------------------------------------
# the strategy


@dataclass
class RoundInFlight:
    """One round as `configure_train` sent it, for `aggregate_train` to read the replies against."""

    plan: RoundPlan
    grid: Grid  # what carried the messages; its `unanswered` after the round: the nodes that timed out
    sent: dict[int, int] = field(default_factory=dict)  # node id -> client id, one TRAIN message each
    failed: list[dict[str, Any]] = field(default_factory=list)  # selected, but sent nothing: why
    bytes_down: int = 0  # the TRAIN messages' array bytes


class FedloraStrategy(Strategy):
    """Flower's round loop (`Strategy.start`) carrying fedlora's rounds: each round is planned and closed by
    the same `federation.RoundDriver` engine local uses (selection, the method's per-client plans,
    checks of every reply, aggregation, evaluation, the run tree). Clients are evaluated on the server, in
    `close_round`, so the evaluation half of Flower's loop sends nothing.
    """

    def __init__(self, driver: RoundDriver, nodes: dict[int, int]) -> None:
        self.driver = driver
        self.nodes = nodes  # client id -> node id
        self.round: RoundInFlight | None = None  # the round in flight
        # Nodes still working on a TRAIN message whose round stopped waiting for them: node -> (message id,
        # round). They get no new work until that message is answered (see `_free_nodes`).
        self.busy: dict[int, tuple[str, int]] = {}

    def summary(self) -> None:
        d = self.driver
        _log.info(
            "fedlora: %d of %d clients per round (need %d replies), aggregation %s",
            d.per_round,
            len(d.client_ids),
            d.need,
            d.s.config.aggregation.method,
        )

    def global_arrays(self) -> ArrayRecord:
        return codec.state_to_arrays(self.driver.current.state)

    def round_no(self, server_round: int) -> int:
        return self.driver.s.start_round + server_round  # Flower counts the rounds of this call from 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each selected client its own plan (adapter, LoRA shape, what trains) on its node; nothing once
        the run has stopped early (--early-stop): Flower's remaining rounds then pass without work."""
        if self.driver.stopped is not None:
            self.round = None
            return []
        plan = self.driver.plan_round(self.round_no(server_round))
        cfg = self.driver.s.config
        if any(c not in self.nodes for c in plan.selected):
            self.nodes.update(_late_nodes(grid, self.nodes, self.driver.s.shards, cfg))
        self._free_nodes(grid)
        run_config = codec.run_config_record(cfg)
        flight = RoundInFlight(plan, grid)
        messages = []
        for cid in plan.selected:
            node = self.nodes.get(cid)
            reason = None
            if node is None:
                reason = "no SuperNode serves this client"
            elif node in self.busy:  # more work would only queue behind it (and hold a worker in simulation)
                old_round = self.busy[node][1]
                reason = f"still busy with round {old_round}, which stopped waiting for it (--round-timeout)"
            if reason is not None:
                flight.failed.append({"client": cid, "node": node, "reason": reason})
                continue
            content = codec.plan_to_content(plan.plans[cid], plan.round_no, run_config)
            flight.bytes_down += sum(r.count_bytes() for r in content.array_records.values())
            messages.append(
                Message(
                    content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(plan.round_no)
                )
            )
            flight.sent[node] = cid
        self.round = flight
        return messages

    def _free_nodes(self, grid: Grid) -> None:
        """Busy nodes whose old TRAIN message has been answered since (a late reply, which is discarded, or
        Flower's error for a message that expired or a node that left) may work again."""
        if not self.busy:
            return
        waiting = {message_id: node for node, (message_id, _) in self.busy.items()}
        for reply in grid.pull_messages(list(waiting)):
            self.busy.pop(waiting.get(reply.metadata.reply_to_message_id, -1), None)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies -> ClientReports -> `RoundDriver.close_round` (checks, aggregates, evaluates, records)."""
        r = self.round
        if r is None and self.driver.stopped is not None:
            return None, None
        assert r is not None and r.plan.round_no == self.round_no(server_round), "aggregate before configure"
        ok, failed = sort_replies(r.sent, replies, self.driver.s.config.round_timeout)
        failed += r.failed
        for message_id, node in getattr(r.grid, "unanswered", {}).items():
            if node in r.sent:  # timed out: it is still working on this round, or never got to it
                self.busy[node] = (message_id, r.plan.round_no)
        reports = []
        for cid, msg in ok:
            report = self._report(cid, msg)
            if isinstance(report, str):
                failed.append({"client": cid, "node": msg.metadata.src_node_id, "reason": report})
            else:
                reports.append(report)
        row = self.driver.close_round(r.plan, reports, failed, bytes_down=r.bytes_down)
        self.round = None
        summary = {"train-loss": float(row.train_loss)}
        if (
            row.aggregation.get("error") is not None
        ):  # none for a method whose clients keep parts (fedsa, local)
            summary["aggregation-error"] = float(row.aggregation["error"])
        return self.global_arrays(), MetricRecord(summary)

    def _report(self, client_id: int, msg: Message) -> ClientReport | str:
        """A reply as a ClientReport, or why it cannot be read (the driver checks the rest)."""
        from fedlora_cli.strategies.base import ClientReport

        try:
            arrays = msg.content.array_records[ARRAYS]
            info = codec.report_from_config(msg.content.config_records[REPORT])
            state = codec.arrays_to_state(arrays)
        except (KeyError, ValueError, TypeError) as e:
            return f"malformed reply ({e})"
        if info["client_id"] != client_id:
            return f"the reply is for client {info['client_id']}"
        return ClientReport(
            client_id=client_id,
            state=state,
            lora=info["lora"],
            examples=info["examples"],
            seed=info["seed"],
            train=info["train"],
            eval=info["eval"],
            wire_bytes=arrays.count_bytes(),
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The global adapter is evaluated on the server's dev split in `close_round`, as in engine local."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class FlowerClients:
    """What only a client can do with its personal parts (federation.personal.ClientRunner), on its SuperNode:
    score its own model on its local test split (`evaluate.personal`), make its final model
    (`train.personalize`: it is saved on the node's machine). Each message carries the shared parts and the
    round its personal parts continue from; each reply carries metrics only. A node that fails or does not
    reply within --round-timeout is a failure with its reason; a node still busy with a timed-out round gets
    no message."""

    def __init__(self, strategy: FedloraStrategy, grid: Grid) -> None:
        self.strategy = strategy
        self.grid = grid

    def evaluate(self, round_no: int, plans: Any) -> dict[int, Any]:
        return self._ask(round_no, plans, f"{MessageType.EVALUATE}.personal", {})

    def personalize(self, rounds: int, plans: Any, epochs: float) -> dict[int, Any]:
        from fedlora_cli.federation.personal import CLIENTS_DIR

        save_to = str(self.strategy.driver.s.recorder.tree.final_dir / CLIENTS_DIR)
        extra = {"personalize-epochs": float(epochs), "save-to": save_to}
        return self._ask(rounds, plans, f"{MessageType.TRAIN}.personalize", extra)

    def _ask(self, round_no: int, plans: Any, message_type: str, extra: dict[str, Any]) -> dict[int, Any]:
        strategy, config = self.strategy, self.strategy.driver.s.config
        strategy._free_nodes(self.grid)
        run_config = codec.run_config_record(config)
        out: dict[int, Any] = {}
        sent: dict[int, int] = {}
        messages = []
        for cid, plan in sorted(plans.items()):
            node = strategy.nodes.get(cid)
            if node is None or node in strategy.busy:
                out[cid] = (
                    "no SuperNode serves this client" if node is None else "still busy with a timed-out round"
                )
                continue
            content = codec.plan_to_content(plan, round_no, run_config, extra)
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=message_type,
                    group_id=f"{round_no}.{message_type}",
                )
            )
            sent[node] = cid
        replies = self.grid.send_and_receive(messages, timeout=config.round_timeout) if messages else []
        ok, failed = sort_replies(sent, replies, config.round_timeout)
        for f in failed:
            out[f["client"]] = f["reason"]
        for cid, msg in ok:
            out[cid] = _metrics_of(cid, msg)
        return out


def _metrics_of(client_id: int, msg: Message) -> dict[str, float] | str:
    """A client's metrics from its reply, or why they cannot be read (an untrusted reply: numbers only)."""
    try:
        report = msg.content.config_records[REPORT]
        metrics = msg.content.metric_records[codec.METRICS]
        cid = codec.whole(report, "client-id", 0, codec.MAX_EXAMPLES)
    except (KeyError, ValueError, TypeError) as e:
        return f"malformed reply ({e})"
    if cid != client_id:
        return f"the reply is for client {cid}"
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if type(value) not in (int, float):
            return f"its metric {key} is not a number"
        out[str(key)] = float(value)
    return out


def _late_nodes(grid: Grid, known: dict[int, int], shards: Any, config: RoundsConfig) -> dict[int, int]:
    """Identify SuperNodes that connected after the start (a node that restarted gets a new id)."""
    fresh = [n for n in grid.get_node_ids() if n not in set(known.values())]
    try:
        found = query_nodes(grid, fresh, shards, config, config.round_timeout or 60.0)
    except InputError as e:
        _log.warning("fedlora: ignoring newly connected SuperNodes: %s", e)
        return {}
    return {c: n for c, n in found.items() if c not in known}


def sort_replies(
    sent: dict[int, int], replies: Iterable[Message], timeout: float | None
) -> tuple[list[tuple[int, Message]], list[dict[str, Any]]]:
    """Split a round's replies into (client id, reply) pairs and failures {client, node, reason}.

    `sent` maps node id -> client id. Error replies and nodes with no reply (timed out) are failures.
    """
    ok: list[tuple[int, Message]] = []
    failed: list[dict[str, Any]] = []
    seen: set[int] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in sent or node in seen:
            continue
        seen.add(node)
        if msg.has_error():
            failed.append({"client": sent[node], "node": node, "reason": one_line(msg.error.reason)})
        else:
            ok.append((sent[node], msg))
    for node, cid in sent.items():
        if node not in seen:
            reason = f"no reply within {timeout:g} s (--round-timeout)" if timeout is not None else "no reply"
            failed.append({"client": cid, "node": node, "reason": reason})
    return sorted(ok, key=lambda p: p[0]), sorted(failed, key=lambda f: f["client"])


_FLOWER_WRAPPED = re.compile(r"^<class '(?P<type>[\w.]+)'>:<'(?P<message>.*)'>$", re.DOTALL)
_EXCEPTION_FIRST = re.compile(r"^\w*(?:Error|Exception|Interrupt|Exit)\w*: ")


def crash_reason(code: int, reason: str | None) -> str | None:
    """None when an error reply is fedlora's ClientApp answering with an expected failure (its one line: a bad
    node config, shard or model); else what crashed, in one line: the ClientApp raised something else (a bug,
    memory), or the worker under it died (Ray's out-of-memory killer, a lost node), as Flower reports it."""
    from flwr.common.constant import ErrorCode

    text = (reason or "").strip()
    wrapped = _FLOWER_WRAPPED.match(text)
    if wrapped:  # Flower's `str(type(ex)) + ":<'" + str(ex) + "'>"`
        lines = [line.strip() for line in wrapped["message"].splitlines() if line.strip()]
        first = (
            lines[0].removeprefix("Exception ClientAppException occurred. Message:").strip() if lines else ""
        )
        return one_line(f"{wrapped['type'].rsplit('.', 1)[-1]}: {first}" if first else wrapped["type"])
    if code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION or _EXCEPTION_FIRST.match(text):
        return one_line(text or f"error code {code}")
    return None


def one_line(reason: str | None) -> str:
    """Flower's error reasons can be multi-line tracebacks; keep the last meaningful line."""
    lines = [line.strip() for line in (reason or "unknown error").splitlines() if line.strip()]
    text = lines[-1] if lines else "unknown error"
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------
# plumbing


class PollingGrid(Grid):
    """The run's Grid with a faster reply poll and a stop switch (Ctrl-C in a simulation).

    `send_and_receive` is Flower's own loop over `push_messages` / `pull_messages`, pulling every
    POLL_SECONDS instead of the HTTP grid's 3 s, and giving up when `abort` is set.
    """

    def __init__(self, grid: Grid, abort: threading.Event | None = None) -> None:
        self.grid = grid
        self.abort = abort or threading.Event()
        # message id -> node of the messages the last send_and_receive got no reply to
        self.unanswered: dict[str, int] = {}

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def wait(self, seconds: float) -> None:
        self._check()
        if self.abort.wait(seconds):
            self._check()

    def _check(self) -> None:
        if self.abort.is_set():
            from fedlora_cli.errors import Interrupted

            raise Interrupted("interrupted")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        pending = set(self.push_messages(messages))  # pushing also gives each message its id
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            self.wait(POLL_SECONDS)
        self.unanswered = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in messages
            if m.metadata.message_id in pending
        }
        return replies


class LogProgress:
    """Progress as Flower log lines, which `flwr run --stream` and `flwr log <run-id>` show."""

    def __init__(self) -> None:
        self.done, self.total = 0, 0

    def start(self, key: str, description: str, total: int | None = None) -> None:
        if key == "rounds":
            self.done, self.total = 0, total or 0

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        if key == "rounds":
            self.done += n
            if info:
                _log.info("fedlora: round %d/%d: %s", self.done, self.total, info)

    def stop(self, key: str) -> None:
        pass

    def log(self, message: str) -> None:
        _log.info("fedlora: %s", message)
