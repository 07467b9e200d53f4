"""history.jsonl: one `HistoryRow` per complete round, and the one reader and writer of the file.

The round driver builds each row once; the run tree keeps it twice: in the round's `global/metrics.json`
(written last, it marks the round complete; runs/integrity.py) and as one line of history.jsonl, which is
rewritten whole and atomically after every round, so fedlora itself never leaves a torn line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import InputError, first_line
from fedlora_cli.ownership import HISTORY, METRICS


@dataclass(frozen=True)
class HistoryRow:
    """A complete round: who trained, what the aggregation did, the global adapter's metrics, costs.

    `from_json` ignores keys it does not know (kept in `extra`), so rows of newer fedlora versions load, and
    gives missing ones neutral values, so rows of older versions do; a key of the wrong type is a ValueError.
    """

    round: int  # 0: the starting adapter, evaluated before any training (no clients, no aggregation)
    clients: list[int]  # client ids whose updates were aggregated
    failed: list[dict[str, Any]]  # {client, node, reason} of selected clients that did not count
    client_metrics: list[dict[str, Any]]  # ClientReport.summary() per aggregated client
    examples: int  # training examples behind the aggregated updates
    train_loss: float | None  # example-weighted mean of the clients' mean training loss (None: round 0)
    aggregation: dict[str, Any]  # method, rank, alpha, error, module_errors, and method-specific keys
    eval: dict[str, float] | None  # the global adapter on the dev split(s); None when not evaluated
    bytes_down: int  # server -> clients
    bytes_up: int  # clients -> server
    bytes_written: int  # to the run tree
    seconds: dict[str, float]  # wall, train, aggregate, eval, io
    time: str = ""  # ISO 8601, when the round completed
    # the clients' learning rate at the round's first step (with --lr-schedule global-*, each round starts
    # lower; the range over the round is in `learning_rate_range`)
    learning_rate: float | None = None
    eval_loss: float | None = None  # the global model's loss on the dev split(s), when evaluated
    # the global adapter on the held-out validation split (holdout.py), when there is one: what chooses
    validation: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # optional sections (e.g. memory, privacy)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HistoryRow:
        if not isinstance(data, Mapping):
            raise ValueError(f"a history row is a JSON object, got {type(data).__name__}")
        if "round" not in data:
            raise ValueError("it has no 'round'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key, value in known.items():
            accepts, shape = _SHAPES[key]
            if not accepts(value):
                raise ValueError(f"'{key}' must be {shape}, got {json.dumps(value, default=str)[:40]}")
        missing = {k: make() for k, make in _MISSING.items() if k not in known}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, **missing, extra=extra)

    def metric(self, name: str | None) -> float | None:
        """The global adapter's value of dev metric `name` this round (None: not evaluated, or no such
        metric)."""
        value = self.eval.get(name) if self.eval and name else None
        return float(value) if _number(value) else None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _of(*kinds: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, kinds) and not isinstance(v, bool)


def _optional_number(v: Any) -> bool:
    return v is None or _number(v)


# what each field must hold (how a message names it), and the value of one an older row does not have
_SHAPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "round": (lambda v: _of(int)(v) and v >= 0, "a round number >= 0"),
    "clients": (_of(list), "a list"),
    "failed": (_of(list), "a list"),
    "client_metrics": (_of(list), "a list"),
    "examples": (_of(int), "a whole number"),
    "train_loss": (_optional_number, "a number or null"),
    "aggregation": (_of(dict), "a JSON object"),
    "eval": (_of(dict, type(None)), "a JSON object or null"),
    "bytes_down": (_of(int), "a whole number"),
    "bytes_up": (_of(int), "a whole number"),
    "bytes_written": (_of(int), "a whole number"),
    "seconds": (_of(dict), "a JSON object"),
    "time": (_of(str), "a string"),
    "learning_rate": (_optional_number, "a number or null"),
    "eval_loss": (_optional_number, "a number or null"),
    "validation": (_of(dict, type(None)), "a JSON object or null"),
}
_MISSING: dict[str, Callable[[], Any]] = {
    "clients": list,
    "failed": list,
    "client_metrics": list,
    "examples": int,
    "train_loss": lambda: None,
    "aggregation": dict,
    "eval": lambda: None,
    "bytes_down": int,
    "bytes_up": int,
    "bytes_written": int,
    "seconds": dict,
}


def write_history(folder: str | os.PathLike, rows: list[HistoryRow]) -> Path:
    """Rewrite history.jsonl whole (atomically): a crash leaves the previous complete version."""
    text = "".join(json.dumps(row.to_json(), sort_keys=True) + "\n" for row in rows)
    return atomic.write_text(Path(folder) / HISTORY, text)


def read_history(folder: str | os.PathLike) -> list[HistoryRow]:
    """The one reader of history.jsonl: its rows, in file order ([] when the run has no history yet).

    One rule for a line that is not a row: when it is the last line and lacks its newline, it is a torn
    append (a crash of whatever was writing it) and is skipped; anywhere else it is one InputError naming
    the file and the line, because rows in the middle do not go missing by accident. Blank lines are skipped.
    """
    path = Path(folder) / HISTORY
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return []
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror or first_line(e)})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file: a run's history is a file of JSON lines")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as text ({first_line(e)})") from None
    lines = text.split("\n")  # the last element is "" when the file ends with its newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(HistoryRow.from_json(json.loads(line)))
        except (ValueError, RecursionError) as e:
            if number == len(lines):  # the last line, without its newline: a torn append
                break
            reason = first_line(e) if not isinstance(e, RecursionError) else "nested too deeply"
            raise InputError(
                f"{path}:{number}: not a history row ({reason}): the file was damaged or edited (each "
                f"round's own record is its round_NNN/global/{METRICS})"
            ) from None
    return rows
