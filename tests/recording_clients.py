"""fedlora's ClientApp behind a Flower mod that records what crosses the wire, both ways (from the tests, never a
hook in the package). `recording_app_named(folder, log_dir)` writes a module in `folder` (put it on sys.path: the
simulation's processes import from there) whose `app` logs one JSON file per message into `log_dir`: its type,
direction, client and round, and for every record its kind and the tensor keys it carries (with a digest)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora_cli.flower import client_app as fedlora
from fedlora_cli.flower import codec


def digest(state) -> str:
    """sha256 over a state's keys and raw bytes, in key order: equal iff the tensors are bit-identical."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(msg: Message) -> dict:
    out: dict = {"type": msg.metadata.message_type, "arrays": {}, "configs": {}, "metrics": {}}
    if msg.has_error():
        out["error"] = msg.error.reason
        return out
    for name, record in msg.content.array_records.items():
        state = codec.arrays_to_state(record)
        out["arrays"][name] = {"keys": sorted(state), "digest": digest(state)}
    for name, record in msg.content.config_records.items():
        if name != codec.RUN_CONFIG:
            out["configs"][name] = {k: v for k, v in record.items() if isinstance(v, int | float | str)}
    for name, record in msg.content.metric_records.items():
        out["metrics"][name] = sorted(record)
    return out


def recording_app(log_dir: str) -> ClientApp:
    """fedlora's ClientApp (every handler) with every message in and out logged into `log_dir`."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        entry = {"request": describe(msg), "reply": describe(reply)}
        path = Path(log_dir) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(entry))
        return reply

    app = ClientApp(mods=[mod])
    app.query()(fedlora.query)
    app.train()(fedlora.train)
    app.evaluate()(fedlora.evaluate)
    app.evaluate("personal")(fedlora.evaluate_personal)
    app.train("personalize")(fedlora.personalize)
    return app


def recording_app_named(folder: Path, log_dir: Path, name: str = "recording_client_app") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        f"from recording_clients import recording_app\n\napp = recording_app({str(log_dir)!r})\n"
    )
    return f"{name}:app"


def read_log(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("*.json"))]
