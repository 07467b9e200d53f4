"""Atomic file and folder writes: a crash never leaves a half-written file that looks complete.

Temporary files and folders are created with the mode a plain `open()` / `mkdir()` gives (0666 / 0777
less the umask), so what fedlora writes on a shared volume is as readable as the user's umask says.
A write that fails (disk full, read-only file system, no permission) raises OutputError naming the
target, never the temporary name, and leaves neither the temporary nor a half-written target behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError, OutputError, io_message

_TRIES = 100  # random temporary names that may already exist before giving up (never happens in practice)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Report an OSError raised inside as OutputError: `cannot write PATH: <cause>; <what to do>`."""
    try:
        yield
    except FedloraError:
        raise
    except OSError as e:
        raise OutputError(io_message("write", path, e)) from e


def _temp_path(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """Create `.<name>.<random>.tmp` beside `path`, exclusively, with mode 0666 less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(_TRIES):
        tmp = _temp_path(path, ".tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _new_temp_dir(path: Path, suffix: str = ".tmp") -> Path:
    """Create `.<name>.<random><suffix>` beside `path`, with mode 0777 less the umask."""
    for _ in range(_TRIES):
        tmp = _temp_path(path, suffix)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then `os.replace` over `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp_file(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def occupied(path: Path) -> bool:
    """Something is at `path` that a write would replace: a file, a link, or a folder that is not empty."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def staged_dir(
    path: str | os.PathLike, *, may_replace: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `path`.

    Something already at `path` is replaced only when `may_replace(path)` approves (it raises to
    refuse; see ownership.py for fedlora's rule). Without it, an occupied `path` is an error: this
    function never drops files its caller has not vouched for. It asks before the work starts and
    again right before the swap. On an exception the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    _approve(path, may_replace)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_dir(path)
    try:
        with writing(path):
            yield tmp
            if path.exists() or path.is_symlink():
                _approve(path, may_replace)
                # Move the old folder aside first so that `path` is never missing its content mid-way
                # for long: rename is atomic, rmtree is not.
                old = _new_temp_dir(path, ".old")
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _approve(path: Path, may_replace: Callable[[Path], None] | None) -> None:
    if not occupied(path):
        return
    if may_replace is None:
        raise FileExistsError(f"{path} exists and nobody vouched that it may be replaced")  # a bug
    may_replace(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete leftovers of interrupted writes (`.<name>.*.tmp` / `.old`) directly inside `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if is_leftover(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def is_leftover(name: str) -> bool:
    """A temporary of an interrupted atomic write: `.<name>.<random>.tmp` or `.old`."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))
