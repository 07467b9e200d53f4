"""The line between `fedlora rounds --engine flower` and its ServerApp, which Flower runs in another process.

On Flower's supported simulation path (`flwr run` against a SuperLink in simulation mode: simulation.py) the
ServerApp runs in a `flwr-simulation` process that the SuperLink's SuperExec starts, not in the command's
process, so it cannot be handed the command's settings, progress display, stop switch or result as
objects. The relay carries them over one loopback TCP connection, as JSON lines:

    ServerApp -> command: {"hello": token}, then progress and tracker calls
                          {"call": "advance", "args": [...]}, {"prepared": run_dir},
                          and last {"result": {...}} or {"error": {...}}
    command -> ServerApp: {"config": {...}, "argv": [...]} (the run config as `codec.to_run_config` writes
                          it, exact), then {"stop": true} on Ctrl-C / SIGTERM

The command puts the relay's address and a one-time token in the SuperLink's environment
(`FEDLORA_FLOWER_RELAY`), which the SuperExec and `flwr-simulation` inherit; a ServerApp started by
`flwr run .` in a real deployment finds no such variable and works as before. A closed connection
stops the run as Ctrl-C does (the command is gone: nobody would read on).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "FEDLORA_FLOWER_RELAY"
HELLO_SECONDS = 10.0  # a connection that does not say the token in time is dropped
PROGRESS_CALLS = ("start", "advance", "stop", "log")
TRACKER_CALLS = ("start_run", "log_params", "log_metrics", "log_artifact")
_PATH_ARGS = {"start_run": 0, "log_artifact": 0}  # calls whose first argument is a Path


def _send(sock: socket.socket, lock: threading.Lock, message: dict[str, Any]) -> None:
    data = (json.dumps(message, default=str, allow_nan=True) + "\n").encode()
    with lock:
        sock.sendall(data)


class _Lines:
    """Complete lines from a socket, however the bytes arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def read(self) -> list[dict[str, Any]]:
        """What one recv() completes (call when the socket is readable); sets `closed` at end of stream."""
        try:
            chunk = self.sock.recv(1 << 16)
        except InterruptedError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------------
# the command's side


class Relay:
    """Listens on loopback for the ServerApp of this run; feeds its calls to `progress` (in the caller's
    thread)."""

    def __init__(self, config_record: dict[str, Any], argv: list[str] | None, progress: Any) -> None:
        self.start_message = {"config": config_record, "argv": argv}
        self.progress = progress
        self.token = secrets.token_hex(16)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.lines: _Lines | None = None
        self.lock = threading.Lock()
        self.pending: list[tuple[socket.socket, _Lines, float]] = []  # accepted, not yet said the token
        self.run_dir: Path | None = None
        self.outcome: dict[str, Any] | None = None  # {"result": …} or {"error": …}

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}:{self.token}"

    @property
    def connected(self) -> bool:
        return self.conn is not None

    @property
    def lost(self) -> bool:
        """The ServerApp connected, then went away without an outcome."""
        return self.lines is not None and self.lines.closed and self.outcome is None

    def stop(self) -> bool:
        """Ask the ServerApp to stop at its next wait; False when no ServerApp is connected (yet)."""
        if self.conn is None or self.lines is None or self.lines.closed:
            return False
        with contextlib.suppress(OSError):
            _send(self.conn, self.lock, {"stop": True})
            return True
        return False

    def pump(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the ServerApp; handle what it said."""
        watched: list[socket.socket] = [self.listener, *(s for s, _, _ in self.pending)]
        if self.conn is not None and self.lines is not None and not self.lines.closed:
            watched.append(self.conn)
        readable, _, _ = select.select(watched, [], [], timeout)
        for sock in readable:
            if sock is self.listener:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    conn, _ = self.listener.accept()
                    conn.setblocking(True)  # reads only when select() says so; sends are a few bytes
                    self.pending.append((conn, _Lines(conn), time.monotonic()))
            elif sock is self.conn:
                for message in self.lines.read():  # type: ignore[union-attr]
                    self._handle(message)
            else:
                self._hello(sock)
        now = time.monotonic()
        for conn, _, since in list(self.pending):
            if now - since > HELLO_SECONDS:
                self._drop(conn)

    def _hello(self, sock: socket.socket) -> None:
        entry = next(p for p in self.pending if p[0] is sock)
        try:
            messages = entry[1].read()
        except ValueError:  # not ours: not JSON
            self._drop(sock)
            return
        said = messages[0].get("hello") if messages and isinstance(messages[0], dict) else None
        if (
            entry[1].closed
            or (messages and not secrets.compare_digest(str(said), self.token))
            or self.conn is not None
        ):
            self._drop(sock)
            return
        if not messages:
            return
        self.pending.remove(entry)
        self.conn, self.lines = sock, entry[1]
        _send(sock, self.lock, self.start_message)
        for message in messages[1:]:
            self._handle(message)

    def _drop(self, sock: socket.socket) -> None:
        self.pending = [p for p in self.pending if p[0] is not sock]
        with contextlib.suppress(OSError):
            sock.close()

    def _handle(self, message: dict[str, Any]) -> None:
        from fedlora_cli.progress import as_tracker

        if "call" in message:
            name, args = message["call"], list(message.get("args", []))
            if name in _PATH_ARGS and args:
                args[_PATH_ARGS[name]] = Path(args[_PATH_ARGS[name]])
            if name in PROGRESS_CALLS:
                getattr(self.progress, name)(*args)
            elif name in TRACKER_CALLS:
                getattr(as_tracker(self.progress), name)(*args)
        elif "prepared" in message:
            self.run_dir = Path(message["prepared"])
        elif "result" in message or "error" in message:
            self.outcome = message

    def close(self) -> None:
        for sock in [self.listener, *(s for s, _, _ in self.pending), *([self.conn] if self.conn else [])]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def result_to_json(result: Any) -> dict[str, Any]:
    """A `federation.RoundsResult` as JSON."""
    return {
        "run_dir": str(result.run_dir),
        "final_adapter": str(result.final_adapter),
        "history": [row.to_json() for row in result.history],
        "final_metrics": result.final_metrics,
        "resumed_after": result.resumed_after,
        "clients": result.clients,
        "main_metric": result.main_metric,
        "stopped": result.stopped,
        "selected": result.selected,
        "last": result.last,
        "per_client": result.per_client,
    }


def result_from_json(data: dict[str, Any]) -> Any:
    from fedlora_cli.federation import RoundsResult
    from fedlora_cli.runs.history import HistoryRow

    return RoundsResult(
        run_dir=Path(data["run_dir"]),
        final_adapter=Path(data["final_adapter"]),
        history=[HistoryRow.from_json(row) for row in data["history"]],
        final_metrics=dict(data["final_metrics"]),
        resumed_after=int(data["resumed_after"]),
        clients=int(data["clients"]),
        main_metric=data["main_metric"],
        stopped=data.get("stopped"),
        selected=data.get("selected"),
        last=data.get("last"),
        per_client=data.get("per_client"),
    )


def error_to_json(error: BaseException) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "message": str(error),
        "exit_code": getattr(error, "exit_code", None),
        "expected": _is_fedlora_error(error),
    }


def _is_fedlora_error(error: BaseException) -> bool:
    from fedlora_cli.errors import FedloraError

    return isinstance(error, FedloraError)


def error_from_json(data: dict[str, Any]) -> Exception:
    """The ServerApp's expected failure as the same FedloraError subclass (same message, same exit code);
    anything else becomes one FedloraError line that names the error."""
    from fedlora_cli.errors import FedloraError, InputError, Interrupted, OutputError
    from fedlora_cli.federation import RoundFailed
    from fedlora_cli.runlock import RunBusy
    from fedlora_cli.runs.integrity import DamagedRun

    message = str(data.get("message", ""))
    if not data.get("expected"):
        text = message.strip().splitlines()[0] if message.strip() else ""
        name = data.get("type", "error")
        return FedloraError(
            f"the Flower simulation failed: {name}: {text}"
            if text
            else f"the Flower simulation failed: {name}"
        )
    known = {
        c.__name__: c
        for c in (FedloraError, InputError, OutputError, Interrupted, RoundFailed, DamagedRun, RunBusy)
    }
    cls = known.get(str(data.get("type")), FedloraError)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    if isinstance(data.get("exit_code"), int) and data["exit_code"] != cls.exit_code:
        error.exit_code = data["exit_code"]
    return error


# ---------------------------------------------------------------------------------------------------
# the ServerApp's side


class RelayProgress:
    """The command's progress display and trackers, as seen from the ServerApp: every call goes over the
    line."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def _call(self, name: str, *args: Any) -> None:
        self._link.send({"call": name, "args": list(args)})

    def start(self, key: str, description: str, total: int | None = None) -> None:
        self._call("start", key, description, total)

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        self._call("advance", key, n, info)

    def stop(self, key: str) -> None:
        self._call("stop", key)

    def log(self, message: str) -> None:
        self._call("log", message)

    def start_run(self, run_dir: Path, name: str) -> None:
        self._call("start_run", str(run_dir), name)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._call("log_metrics", step, metrics)

    def log_artifact(self, path: Path, name: str) -> None:
        self._call("log_artifact", str(path), name)

    def close(self, status: str) -> None:
        pass  # the command closes its trackers itself


class Link:
    """The ServerApp's end of the relay."""

    def __init__(self, address: str) -> None:
        host, port, token = address.rsplit(":", 2)
        self.sock = socket.create_connection((host, int(port)), timeout=HELLO_SECONDS)
        self.lock = threading.Lock()
        self.abort = threading.Event()
        _send(self.sock, self.lock, {"hello": token})
        self.sock.settimeout(None)
        self.lines = _Lines(self.sock)
        start: dict[str, Any] | None = None
        while start is None and not self.lines.closed:
            messages = self.lines.read()
            if messages:
                start, rest = messages[0], messages[1:]
                self._take(rest)
        if start is None:
            raise ConnectionError("fedlora's command closed the relay before sending the run's settings")
        self.config_record: dict[str, Any] = start["config"]
        self.argv: list[str] | None = start.get("argv")
        threading.Thread(target=self._listen, name="fedlora-relay", daemon=True).start()

    def _take(self, messages: list[dict[str, Any]]) -> None:
        if any(m.get("stop") for m in messages):
            self.abort.set()

    def _listen(self) -> None:
        while not self.lines.closed:
            self._take(self.lines.read())
        self.abort.set()  # the command is gone: stop as for Ctrl-C

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the command is gone; `abort` stops the run
            _send(self.sock, self.lock, message)

    def serve(self, run: Callable[..., Any]) -> None:
        """`run(config, argv, progress, abort, on_prepared)` -> RoundsResult; its outcome goes back to the
        command.

        An expected failure (FedloraError) is reported and not raised again: the run ended as the command
        will say. A bug is reported and raised, so that Flower logs its traceback.
        """
        from fedlora_cli.flower import codec

        try:
            config = codec.from_run_config(self.config_record)
            result = run(
                config,
                self.argv,
                RelayProgress(self),
                self.abort,
                lambda run_dir: self.send({"prepared": str(run_dir)}),
            )
        except BaseException as e:
            self.send({"error": error_to_json(e)})
            if not _is_fedlora_error(e):
                raise
        else:
            self.send({"result": result_to_json(result)})
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()


def link_from_env() -> Link | None:
    """The relay to the command that started this simulation, if one did."""
    address = os.environ.get(ENV)
    return Link(address) if address else None
