"""One process per run folder: an OS file lock held while a command writes the run, and who holds it.

`<run>/.fedlora.lock` is locked with `filelock` (flock on Unix) without waiting; beside it,
`.fedlora.lock.json` names the holder (pid, host, command, since), so a second process on the same
run — a fresh run, a `--resume`, a `train --overwrite` — stops with one line naming the first. The
operating system releases the lock when its process ends, however it ends (even SIGKILL or a power
cut on a local disk), so a crashed run never blocks the next one: its stale note is simply replaced.
Both names are fedlora's (`ownership.LOCK_FILES`): they never make a folder look foreign or occupied.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fedlora_cli import atomic
from fedlora_cli.errors import FedloraError
from fedlora_cli.ownership import LOCK_FILES, read_object

LOCK_FILE, HOLDER_FILE = LOCK_FILES


class RunBusy(FedloraError):
    """Another process holds the run folder's lock."""


def holder_record(command: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": _dt.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[:8],
    }


def describe_holder(folder: Path) -> str:
    """`process 1234 on host-a (fedlora rounds, since 2025-01-01T10:00:00)`, from the holder's note."""
    note = read_object(folder / HOLDER_FILE) or {}
    pid, host = note.get("pid"), note.get("host")
    if not isinstance(pid, int):
        return "another process (it has not recorded which yet)"
    where = f" on {host}" if isinstance(host, str) and host else ""
    what = note.get("command") if isinstance(note.get("command"), str) else "?"
    since = f", since {note['since']}" if isinstance(note.get("since"), str) else ""
    return f"process {pid}{where} (fedlora {what}{since})"


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class RunLock:
    """The lock of one run folder. `acquire` creates the folder if needed; `release` removes the lock files,
    and the folder too when this lock created it and nothing else was written there.

    Use as a context manager, or `acquire()` / `release()` when the lock outlives a function (a rounds run).
    """

    def __init__(self, folder: str | os.PathLike, command: str) -> None:
        self.folder = Path(folder).expanduser()
        self.command = command
        self._lock: Any = None
        self._created: list[Path] = []  # the folders acquire() made, deepest first

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> RunLock:
        import filelock

        if self._lock is not None:
            return self
        folder = self.folder
        with atomic.writing(folder):
            self._created = _missing_ancestors(folder)
            folder.mkdir(parents=True, exist_ok=True)
            # thread_local=False: a Flower ServerApp may take the lock in one thread and release it in
            # another.
            lock = filelock.FileLock(folder / LOCK_FILE, timeout=0, thread_local=False)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise RunBusy(
                    f"{folder} is in use by {describe_holder(folder)}: wait for it to finish or stop it, "
                    f"or choose another --run-name / --output-dir"
                ) from None
        self._lock = lock
        try:
            atomic.write_json(folder / HOLDER_FILE, holder_record(self.command))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Give the lock back. The lock files are removed while the lock is still held, so no other
        process can be holding a lock on a file that is about to disappear."""
        if self._lock is None:
            return
        for name in (HOLDER_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
        lock, self._lock = self._lock, None
        with contextlib.suppress(OSError):
            lock.release()
        if self._created:
            atomic.remove_stale_temporaries(self.folder)
        for folder in self._created:  # deepest first; rmdir only succeeds when the run wrote nothing there,
            try:  # so a run that failed before writing leaves no stub that blocks its name
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
