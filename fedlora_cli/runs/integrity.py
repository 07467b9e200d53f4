"""What a complete round wrote, fingerprinted, and the checks `--resume` runs on it before anything changes.

When a round completes, its `global/metrics.json` (written last) records the sha256 of every other file
the round wrote (`files`: path inside `round_NNN/` -> sha256) and the sha256 of its own content
(`record_sha256`). `--resume` reads that record back and checks the round it continues from: every
file is there, unchanged, parses, and holds finite numbers (the global adapter, the strategy's
`state.safetensors`). Only then does it discard what came after. A damaged round is one line naming
the file and the way out: `--resume-from-round N` continues from an earlier, intact round.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path, PurePosixPath
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import InputError, first_line
from fedlora_cli.ownership import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METRICS, ROUND_DIR, read_object
from fedlora_cli.runs import ADAPTER_DIR, RoundTree

FILES_KEY = "files"  # in round_NNN/global/metrics.json: {path inside round_NNN/: sha256}
RECORD_KEY = "record_sha256"  # in the same file: the sha256 of the file's content without this key
STATE_FILE = "state.safetensors"  # a strategy's server state, beside global/adapter
REQUIRED = (f"global/{ADAPTER_DIR}/{ADAPTER_CONFIG}", f"global/{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")


class DamagedRun(InputError):
    """A complete round's files are missing, changed or unreadable: resume from an earlier round."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_digest(record: dict[str, Any]) -> str:
    """The sha256 of a round record as fedlora writes it (sorted keys, `atomic.dumps_json`), without
    RECORD_KEY."""
    body = {k: v for k, v in record.items() if k != RECORD_KEY}
    return hashlib.sha256(atomic.dumps_json(body).encode()).hexdigest()


def round_digests(tree: RoundTree, round_no: int) -> dict[str, str]:
    """sha256 of every file of `round_NNN/` except the round record itself (written after, holding these)."""
    root = tree.round_dir(round_no)
    record = tree.global_dir(round_no) / METRICS
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path != record and not atomic.is_leftover(path.name):
            out[path.relative_to(root).as_posix()] = sha256_file(path)
    return out


def sealed(record: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """A round record with the digests of the round's files and of itself: what global/metrics.json holds."""
    out = {**record, FILES_KEY: files}
    out[RECORD_KEY] = record_digest(out)
    return out


def last_recorded_round(tree: RoundTree) -> int:
    """The highest round with a round record (global/metrics.json), 0 if none: the round `--resume` continues
    from."""
    numbers = [
        int(p.name.removeprefix("round_")) for p in tree.root.glob("round_*") if ROUND_DIR.match(p.name)
    ]
    return max((n for n in numbers if (tree.global_dir(n) / METRICS).is_file()), default=0)


def damaged(path: Path, what: str, round_no: int) -> DamagedRun:
    if round_no <= 1:
        way_out = "start it again from the beginning with `--resume-from-round 0` (discards every round)"
    else:
        way_out = (
            f"continue from round {round_no - 1} with `--resume-from-round {round_no - 1}` "
            f"(discards the rounds after it)"
        )
    return DamagedRun(f"--resume: {path} {what}, so round {round_no} of the run is damaged: {way_out}")


def read_round_record(tree: RoundTree, round_no: int) -> dict[str, Any]:
    """Round `round_no`'s record (its history row, file digests removed), checked against its own digest."""
    path = tree.global_dir(round_no) / METRICS
    if not path.is_file():
        raise damaged(path, "is missing", round_no)
    record = read_object(path)
    if record is None:
        raise damaged(path, "is not a readable JSON object", round_no)
    digest = record.get(RECORD_KEY)
    if digest is not None and digest != record_digest(record):
        raise damaged(path, "does not match the sha256 recorded when the round completed", round_no)
    return {k: v for k, v in record.items() if k not in (FILES_KEY, RECORD_KEY)}


def check_round(tree: RoundTree, round_no: int) -> bool:
    """Check everything round `round_no` wrote before a run continues from it; raise DamagedRun naming the
    file.

    Returns False when the round predates recorded digests (an older fedlora): its files are then only
    parsed and checked for finite numbers.
    """
    from fedlora_cli.modeling import read_adapter

    root, folder = tree.round_dir(round_no), tree.global_dir(round_no)
    read_round_record(tree, round_no)
    files = (read_object(folder / METRICS) or {}).get(FILES_KEY)
    if files is not None:
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise damaged(folder / METRICS, f"has an unreadable '{FILES_KEY}' map", round_no)
        unrecorded = sorted(set(REQUIRED) - set(files))
        if unrecorded:
            raise damaged(
                root / unrecorded[0], "is not among the files recorded when the round completed", round_no
            )
        for name, digest in sorted(files.items()):
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise damaged(folder / METRICS, f"names a file outside the round ({name!r})", round_no)
            path = root / relative
            if not path.is_file():
                raise damaged(path, "is missing", round_no)
            if sha256_file(path) != digest:
                raise damaged(path, "does not match the sha256 recorded when the round completed", round_no)
    try:
        read_adapter(folder / ADAPTER_DIR)  # parses, floating point, finite, r agrees with the tensors
    except InputError as e:
        raise damaged(folder / ADAPTER_DIR, f"cannot be used ({first_line(e)})", round_no) from None
    if (folder / STATE_FILE).exists() or (files is not None and f"global/{STATE_FILE}" in files):
        check_state_file(folder / STATE_FILE, round_no)
    return files is not None


def check_state_file(path: Path, round_no: int) -> None:
    """A strategy's server state: a safetensors file of finite floating-point tensors."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise damaged(path, "is missing", round_no)
    try:
        state = load_file(str(path))
    except Exception as e:  # a damaged file may fail in any way the parser has: it is still one line
        raise damaged(path, f"cannot be read ({first_line(e)})", round_no) from None
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise damaged(path, f"holds {key} as {tensor.dtype}, not floating point", round_no)
        if tensor.numel() and not math.isfinite(float(tensor.double().abs().max())):
            raise damaged(path, f"holds NaN or Inf in {key}", round_no)
