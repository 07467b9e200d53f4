"""The one reader of "a JSON object from a file": every file fedlora reads this way fails by one rule.

Missing, a folder (or a device, FIFO, socket), larger than `limit`, unreadable, not UTF-8 JSON, or JSON
that is not an object: one InputError line that names the file, never a traceback, and never a read that
runs until the machine runs out of memory (`/dev/zero`). NaN and Infinity are accepted: fedlora writes
them (atomic.dumps_json) for metrics that have no finite value.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError, first_line

MAX_BYTES = 64 * 2**20  # far above anything fedlora writes (a run record of 10,000 clients is ~1 MB)


def read_json(
    path: str | os.PathLike,
    what: str = "file",
    *,
    hint: str | None = None,
    limit: int = MAX_BYTES,
    any_value: bool = False,
) -> Any:
    """The JSON object in `path`. `what` names the file in messages ("run record"); `hint` says what to do.
    `any_value`: return whatever JSON value it holds, for a caller that checks the shape itself."""
    path = Path(path).expanduser()
    fix = f": {hint}" if hint else ""

    def fail(problem: str) -> InputError:
        return InputError(f"{path}: {problem}{fix}")

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise fail(f"no such {what}") from None
    except OSError as e:
        raise fail(f"cannot read the {what} ({e.strerror or first_line(e)})") from None
    if stat.S_ISDIR(mode):
        raise fail(f"the {what} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise fail(f"the {what} is not a regular file (a device, FIFO or socket)")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise fail(f"cannot read the {what} ({e.strerror or first_line(e)})") from None
    if len(raw) > limit:
        size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
        raise fail(f"the {what} is larger than {size}, more than any {what} fedlora writes")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise fail(f"the {what} is not valid JSON: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise fail(f"the {what} is not valid JSON ({first_line(e)})") from None
    except RecursionError:
        raise fail(f"the {what} is not valid JSON (nested too deeply)") from None
    if not any_value and not isinstance(data, dict):
        raise fail(f"the {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_json_or_none(path: str | os.PathLike, what: str = "file") -> dict[str, Any] | None:
    """The same reader for callers that only look (is this fedlora's? what does it name?): None on any
    problem."""
    try:
        return read_json(path, what)
    except InputError:
        return None
