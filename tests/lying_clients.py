"""Untrusted clients for tests: fedlora's own ClientApp handlers behind a Flower mod that makes chosen
clients fail, stall, or lie in their TRAIN replies (fault injection from the tests, never a hook in the
package). The simulation's ClientApps run in Flower's processes, which load their app by name:
`run_flower_simulation(config, client_app=lying_app_named(folder, {...}))` writes a module in `folder` (which
must be on sys.path) whose `app` is `lying_app({...})`, and runs it on the simulation engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedlora_cli.flower import client_app as fedlora
from fedlora_cli.flower import codec


def _state(content: RecordDict) -> dict[str, torch.Tensor]:
    return codec.arrays_to_state(content.array_records[codec.ARRAYS])


def _set_state(content: RecordDict, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = _state(content)
    change(state)
    content[codec.ARRAYS] = codec.state_to_arrays(state)


_DELETE = object()  # a field the lying client leaves out


def _first(state: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in state if part in k)


def _nan(state):
    state[_first(state, "lora_B")].view(-1)[0] = float("nan")


def _int_tensor(state):
    key = _first(state, "lora_A")
    state[key] = state[key].round().to(torch.int64)


def _wrong_shape(state):
    key = _first(state, "lora_A")
    state[key] = state[key][:, :-1].contiguous()


def _claims(**fields) -> Callable[[RecordDict], None]:
    def lie(content: RecordDict) -> None:
        report = dict(content.config_records[codec.REPORT])
        for key, value in fields.items():
            if value is _DELETE:
                del report[key]
            else:
                report[key] = value
        content[codec.REPORT] = ConfigRecord(report)
        if "examples" in fields and fields["examples"] is not _DELETE:  # Flower's FedAvg weight too
            content[codec.METRICS] = MetricRecord({"num-examples": 0, "train-loss": 0.0})

    return lie


# What a lying client does to its honest reply; the server's reason for refusing it contains the value.
LIES: dict[str, tuple[Callable[[RecordDict], None], str]] = {
    "nan": (lambda c: _set_state(c, _nan), "holds NaN or Inf"),
    "int-tensor": (lambda c: _set_state(c, _int_tensor), "not a floating-point tensor"),
    "wrong-shape": (lambda c: _set_state(c, _wrong_shape), "has shape"),
    "10**12 examples": (_claims(examples=10**12), "reported 1000000000000 training examples"),
    "negative examples": (_claims(examples=-5), "examples must be a whole number"),
    "infinite examples": (_claims(examples=float("inf")), "examples must be a whole number"),
    "examples as text": (_claims(examples="60"), "examples must be a whole number"),
    "no seed": (_claims(seed=_DELETE), "the report has no seed"),
    "another client's id": (_claims(**{"client-id": 1}), "the reply is for client 1"),
    "loss as text": (_claims(**{"train.loss": "low"}), "train.loss must be a number"),
    "bytes order": (_claims(**{"train.order": b"\x00\xff"}), "train.order must be a short text"),
    "huge rank": (_claims(**{"lora-r": 10**12}), "lora-r must be a whole number"),
    "modules as number": (_claims(**{"lora-target-modules": 5}), "lora-target-modules must be a list"),
    "infinite eval": (_claims(**{"eval.accuracy": float("inf")}), "eval.accuracy must be a finite number"),
    "wrong seed": (_claims(seed=7), "trained with seed 7"),
}


class _Slow:
    """Progress that takes `seconds` per optimizer step: a slow machine, as fedlora's training loop sees it."""

    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def start(self, *args, **kwargs) -> None:
        self.inner.start(*args, **kwargs)

    def advance(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
        self.inner.advance(*args, **kwargs)

    def stop(self, *args, **kwargs) -> None:
        self.inner.stop(*args, **kwargs)

    def log(self, message: str) -> None:
        self.inner.log(message)


@contextlib.contextmanager
def _slow_steps(seconds: float):
    """Training in this (actor) process takes `seconds` per step while the block runs."""
    from fedlora_cli.federation import client

    real = client.train_model

    def slow(*args, progress=None, **kwargs):
        return real(*args, progress=_Slow(progress, seconds), **kwargs)

    client.train_model = slow
    try:
        yield
    finally:
        client.train_model = real


def scale_update(content: RecordDict, sent: RecordDict, factor: float) -> None:
    """The reply's adapter becomes the broadcast plus `factor` × the client's honest update: finite, of the
    right keys, shapes and dtype, so it passes every check (an update scaled to take over the model)."""
    broadcast = _state(sent)
    _set_state(content, lambda state: state.update(
        {k: broadcast[k] + factor * (v - broadcast[k]) for k, v in state.items()}))  # fmt: skip


def lying_app(behaviour: dict[int, dict[int, str]]) -> ClientApp:
    """fedlora's ClientApp, but client c in round r does `behaviour[c][r]`: a LIES key, "fail" (an error
    reply), "sleep:<seconds>" (stalls before its turn, holding its worker: a client that misses
    --round-timeout), "slow:<seconds>" (trains at that many seconds per optimizer step), or
    "scale:<factor>" (sends the broadcast plus factor × its update, `scale_update`)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        meta = msg.content.config_records[codec.CONFIG]
        client, round_no = int(meta["client-id"]), int(meta["server-round"])
        what = behaviour.get(client, {}).get(round_no)
        if what == "fail":
            reason = f"client {client} failed on purpose in round {round_no}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        if what is not None and what.startswith("sleep:"):
            time.sleep(float(what.removeprefix("sleep:")))
            return call_next(msg, context)
        if what is not None and what.startswith("slow:"):
            with _slow_steps(float(what.removeprefix("slow:"))):
                return call_next(msg, context)
        reply = call_next(msg, context)
        if what is not None and what.startswith("scale:") and not reply.has_error():
            scale_update(reply.content, msg.content, float(what.removeprefix("scale:")))
        elif what is not None and not reply.has_error():
            LIES[what][0](reply.content)
        return reply

    app = ClientApp(mods=[mod])
    app.query()(fedlora.query)
    app.train()(fedlora.train)
    app.evaluate()(fedlora.evaluate)
    # personalised runs (fedsa, local, --personalize-epochs)
    app.evaluate("personal")(fedlora.evaluate_personal)
    app.train("personalize")(fedlora.personalize)
    return app


def lying_app_named(
    folder: Path, behaviour: dict[int, dict[int, str]], name: str = "lying_client_app"
) -> str:
    """`lying_app(behaviour)` as Flower names a component ("module:attribute"), from a module written to
    `folder` (put it on sys.path: the simulation's processes import from there)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        f"from lying_clients import lying_app\n\napp = lying_app({behaviour!r})\n"
    )
    return f"{name}:app"
