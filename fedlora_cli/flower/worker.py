"""fedlora's ClientApp in one long-lived process beside a SuperNode: the model and the tokenized data stay
loaded from one message to the next (`fedlora clientapp`).

Flower 1.42's deployment runtime runs every message in a fresh `flwr-clientapp` process, in both of its
isolation modes: with `--isolation subprocess` the SuperNode's own SuperExec starts one per message;
with `--isolation process` the SuperNode starts none and waits for an executor outside it to acquire
each task over its Runtime API (Flower's `flower-superexec`, which again starts one `flwr-clientapp`
per task, and `flwr-clientapp` handles exactly one message, then exits). Every round each client then
imports torch and transformers and loads the base model again.

This module is such an executor for `--isolation process`, doing the work of `flwr-clientapp` itself,
task after task, in one process: it acquires the SuperNode's next ClientApp task, pulls its message
and context, calls fedlora's ClientApp (which keeps the model and data per process: client_app.py
`_worker`), and pushes the reply and the task's outcome, as `flwr-clientapp` does. It runs the fedlora
installed on this machine, never code from the network: a task of a run whose app is not fedlora's gets
an error reply. It relies on Flower 1.42's Runtime API client (the pieces `flwr-clientapp` and
`flower-superexec` are made of), so it checks the Flower version it runs with.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlora_cli.errors import FedloraError, InputError

CLIENT_APP = "fedlora_cli.flower.client_app:app"
SUPPORTED_FLOWER = "1.42."  # the Runtime API this executor speaks
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the call SuperExec authentication signs


@dataclass
class Served:
    """One task, for the log line."""

    kind: str  # the message type: query, train, evaluate …
    run_id: int
    round: str  # the message's group id (fedlora: the round), "" for none
    seconds: float
    error: str | None = None

    def line(self) -> str:
        where = f"run {self.run_id}" + (f", round {self.round}" if self.round else "")
        return f"{self.kind} ({where}): " + (
            f"failed: {self.error}" if self.error else f"{self.seconds:.1f} s"
        )


def check_flower() -> None:
    """The Runtime API pieces used here are Flower 1.42's: say so instead of failing obscurely on another."""
    from flwr.supercore.version import package_version

    if not package_version.startswith(SUPPORTED_FLOWER):
        raise InputError(
            f"`fedlora clientapp` speaks Flower {SUPPORTED_FLOWER}x's Runtime API, this is Flower "
            f"{package_version}: run the SuperNode with its default --isolation subprocess instead"
        )


def connect(
    address: str,
    *,
    root_certificates: str | None = None,
    token: str | None = None,
    auth_secret: bytes | None = None,
) -> Any:
    """A Runtime API client for the SuperNode at `address`: as an executor (signing its requests for tasks
    with `auth_secret` when the SuperNode asks for SuperExec authentication), or for one task with its
    token."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if auth_secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods={ACQUIRE_TASK})
        )
    certificates = None
    if root_certificates is not None:
        try:
            with open(root_certificates, "rb") as f:
                certificates = f.read()
        except OSError as e:
            raise InputError(f"--root-certificates {root_certificates}: {e.strerror or e}") from None
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=interceptors,
        # a task's calls are retried as flwr-clientapp's are; the executor's own polling waits by itself
        retry_invoker=make_simple_http_retry_invoker() if token is not None else None,
    )


def serve(
    address: str,
    *,
    root_certificates: str | None = None,
    stop: threading.Event | None = None,
    poll: float = 0.1,
    on_task: Callable[[Served], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    max_tasks: int | None = None,
    auth_secret: bytes | None = None,
) -> int:
    """Serve the SuperNode's ClientApp tasks until `stop` is set (or `max_tasks` were served); returns how
    many.

    `poll`: seconds between two requests for a task while there is none (on the SuperNode's local API). A
    SuperNode that does not answer (not started yet, restarting) is waited for; `on_wait` hears about it once.
    """
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    check_flower()
    stop = stop or threading.Event()
    client = connect(address, root_certificates=root_certificates, auth_secret=auth_secret)
    served, waiting, trimmed = 0, False, True
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's retry notices: this loop says when it waits
    try:
        while not stop.is_set() and (max_tasks is None or served < max_tasks):
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPStatusError as e:
                if e.response.status_code in (401, 403):
                    raise InputError(
                        f"the SuperNode at {address} refuses this process's requests for tasks "
                        f"(HTTP {e.response.status_code}): give `fedlora clientapp` the SuperNode's "
                        "--superexec-auth-secret-file"
                    ) from None
                raise
            except httpx.TransportError as e:
                if not waiting and on_wait is not None:
                    on_wait(f"waiting for the SuperNode at {address} ({type(e).__name__})")
                waiting = True
                stop.wait(1.0)
                continue
            waiting = False
            if res.HasField("task") and res.token:
                outcome = run_task(address, res.token, root_certificates=root_certificates)
                served, trimmed = served + 1, False
                if on_task is not None:
                    on_task(outcome)
            else:
                if not trimmed:  # idle after a task (between rounds): give the freed heap back once
                    from fedlora_cli import memory

                    memory.release()
                    trimmed = True
                stop.wait(poll)
    finally:
        flwr_log.setLevel(level)
        client.close()
    return served


def run_task(address: str, token: str, *, root_certificates: str | None = None) -> Served:
    """What `flwr-clientapp --token TOKEN` does, in this process: pull the task's message and context, run
    fedlora's ClientApp, push the reply and the task's outcome."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from fedlora_cli.flower import client_app

    started = time.perf_counter()
    client = connect(address, root_certificates=root_certificates, token=token)
    heartbeat = HeartbeatSender(_heartbeat(client))
    message = context = reply = None
    status, details, kind, run_id, group = SubStatus.FAILED, "ClientApp task failed", "?", 0, ""
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        kind, run_id, group = message.metadata.message_type, run.run_id, message.metadata.group_id
        component = fab_client_app(fab.content)
        if component != CLIENT_APP:
            raise FedloraError(
                f"this SuperNode serves fedlora's ClientApp ({CLIENT_APP}) only; the run's app "
                f"names {component or 'none'}: run its SuperNode without `fedlora clientapp`"
            )
        reply = client_app.app(message, context)
        status, details = SubStatus.COMPLETED, ""
    except BaseException as e:  # Ctrl-C too: the task gets its answer before this process stops
        details = f"{type(e).__name__}: {e}"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
        if not isinstance(e, Exception):
            raise
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as e:  # the SuperNode went away: its SuperLink counts the client as failed
            details = f"could not push the reply: {type(e).__name__}: {e}"
            reply = None
        finally:
            heartbeat.stop()
            client.close()
    if reply is None:
        return Served(kind, run_id, group, time.perf_counter() - started, details)
    error = _one_line(reply.error.reason) if reply.has_error() else None
    return Served(kind, run_id, group, time.perf_counter() - started, error)


PULL_FIRST_RETRY = 0.05  # seconds; Flower's default is 1 s (see pull_task_input)


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's `run_clientapp.pull_task_input` with a short first retry: the message, context, run and FAB.

    A SuperNode hands out a task as soon as it has the message's header and pulls the message's content from
    the SuperLink afterwards; Flower's puller waits 1 s before asking again for content that is not there yet,
    which a fresh `flwr-clientapp` never notices (its start-up takes longer) but a process that is already
    running pays on every message. Here the first retry comes after 50 ms, doubling up to 1 s.
    """
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode gave this task no message")
    from flwr.app import Message

    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_FIRST_RETRY,
        backoff_cap=1.0,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the content's id
    return message, context, run, fab


def _heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the SuperNode gave up on does not stop this process
    (`flwr-clientapp` raises SIGINT on itself then; here the reply is merely late and ignored)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        with contextlib.suppress(httpx.HTTPStatusError):
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.TransportError:
                return False
        return True

    return beat


def fab_client_app(content: bytes) -> str | None:
    """The ClientApp component a FAB's pyproject.toml names."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            config = tomllib.loads(fab.read("pyproject.toml").decode())
        return config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, zipfile.BadZipFile, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine (plain HTTP to it never crosses a network)."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
