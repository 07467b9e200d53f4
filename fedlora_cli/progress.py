"""Progress reporting behind a small protocol: the core calls it, the CLI shows Rich bars, tests record."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """What the core may say while it works. Keys name a bar; `info` is a short status text."""

    def start(self, key: str, description: str, total: int | None = None) -> None: ...

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None: ...

    def stop(self, key: str) -> None: ...

    def log(self, message: str) -> None: ...


class NullProgress:
    """Says nothing (library use, Flower clients)."""

    def start(self, key: str, description: str, total: int | None = None) -> None:
        pass

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        pass

    def stop(self, key: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class RecordingProgress:
    """Keeps every call as a tuple, for tests."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def start(self, key: str, description: str, total: int | None = None) -> None:
        self.events.append(("start", key, description, total))

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        self.events.append(("advance", key, n, info))

    def stop(self, key: str) -> None:
        self.events.append(("stop", key))

    def log(self, message: str) -> None:
        self.events.append(("log", message))

    def messages(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "log"]


class RichProgress:
    """Rich bars, one per key; use as a context manager around the core call."""

    def __init__(self, console: Any = None, transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _RichProgress

        self._bars = _RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=transient,
        )
        self._ids: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def start(self, key: str, description: str, total: int | None = None) -> None:
        if key in self._ids:
            self._bars.reset(self._ids[key], total=total, description=description, info="", visible=True)
        else:
            self._ids[key] = self._bars.add_task(description, total=total, info="")

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        if key in self._ids:
            fields = {"info": info} if info is not None else {}
            self._bars.update(self._ids[key], advance=n, **fields)

    def stop(self, key: str) -> None:
        if key in self._ids:
            task_id = self._ids.pop(key)
            self._bars.remove_task(task_id)

    def log(self, message: str) -> None:
        self._bars.console.print(message, highlight=False, markup=False, soft_wrap=True)
