"""Atomic file and folder writes: a crash never leaves a half-written file that looks complete.

Temporary files and folders are created with the mode a plain `open()` / `mkdir()` gives (0666 / 0777
less the umask), so what fedlora writes on a shared volume is as readable as the user's umask says.
A write that fails (disk full, read-only file system, no permission) raises OutputError naming the
target, never the temporary name, and leaves neither the temporary nor a half-written target behind.

Temporaries are unmistakably fedlora's: `.<target>.fedlora-<host>-<pid>-<random>.tmp` (and `.old` for a
folder being replaced), where <host> is a short hash of the machine's name and <pid> the writing
process. Cleanup removes only names of that exact shape, never a user's `.thesis.old` or `.draft.tmp`.
Beside a target (outside any locked run folder), a temporary is removed only when the process that
made it, on this machine, is gone: a write killed by SIGKILL leaves one, and the next write to the
same target clears it; a write still running in another process keeps its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
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


# `.<target>.fedlora-<host>-<pid>-<random>.tmp|.old`: a name no user writes by accident
_LEFTOVER = re.compile(
    r"^\.(?P<target>.+)\.fedlora-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|old)$"
)


@functools.cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _temp_path(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.fedlora-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """Create a temporary file beside `path`, exclusively, with mode 0666 less the umask (leftovers of earlier
    writes to `path` whose process is gone are removed first)."""
    remove_dead_leftovers(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(_TRIES):
        tmp = _temp_path(path, ".tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def new_temp_dir(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create a temporary folder beside `path` (see the module docstring for its name), with mode 0777 less
    the umask; first remove the leftovers of earlier writes to `path` whose process is gone."""
    path = Path(path)
    remove_dead_leftovers(path)
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
        tmp = new_temp_dir(path)
    try:
        with writing(path):
            yield tmp
            if path.exists() or path.is_symlink():
                _approve(path, may_replace)
                # Move the old folder aside first so that `path` is never missing its content mid-way
                # for long: rename is atomic, rmtree is not.
                old = new_temp_dir(path, ".old")
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def honour_umask(folder: str | os.PathLike) -> None:
    """Give the files under `folder` the mode a plain `open()` gives (0666 less the umask), for writers that
    create theirs 0600 whatever the umask (safetensors' save_file, which transformers' save_pretrained
    uses)."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def _approve(path: Path, may_replace: Callable[[Path], None] | None) -> None:
    if not occupied(path):
        return
    if may_replace is None:
        raise FileExistsError(f"{path} exists and nobody vouched that it may be replaced")  # a bug
    may_replace(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete fedlora's temporaries directly inside `folder`, whoever made them: for a folder that only its
    lock holder writes (a run folder), where any temporary is a leftover of an interrupted write."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if is_leftover(entry.name):
            _remove(entry)


def remove_dead_leftovers(path: str | os.PathLike) -> None:
    """Delete the temporaries of earlier writes to `path` (beside it) whose process has ended on this machine.

    A temporary of a live process, or of another machine (a shared file system), is left alone."""
    path = Path(path)
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = _LEFTOVER.match(entry.name)
            ours = match is not None and match["target"] == path.name and match["host"] == _host_tag()
            if ours and not _alive(int(match["pid"])):
                _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or a pid this system cannot name): not ours to judge
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


def is_leftover(name: str) -> bool:
    """A temporary of an atomic write (`.<target>.fedlora-<host>-<pid>-<random>.tmp` or `.old`)."""
    return _LEFTOVER.match(name) is not None
