"""Progress and metrics reporting behind small protocols: the core calls ONE object, listeners fan out.

The display is Rich bars on a terminal or plain log lines elsewhere (nohup, SLURM, `| tee`); trackers
(TensorBoard, MLflow, W&B: trackers.py) listen to the same events. The CLI picks the display in one
place (commands/_common.py); tests pass a RecordingProgress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

DEFAULT_LOG_EVERY = 50  # optimizer steps between two training-loss reports (plain lines and trackers)


class Progress(Protocol):
    """What the core may say while it works. Keys name a bar; `info` is a short status text."""

    def start(self, key: str, description: str, total: int | None = None) -> None: ...

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None: ...

    def stop(self, key: str) -> None: ...

    def log(self, message: str) -> None: ...


class Tracker(Protocol):
    """What an experiment tracker hears: the run's parameters, metrics by step, artifacts, the end.

    Metric names are namespaced like Hugging Face Trainer's: `train/loss`, `train/learning_rate` (per
    step, averaged over `--log-every` steps), `eval/<metric>`, `round/<quantity>` (per round).
    """

    def start_run(self, run_dir: Path, name: str) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_artifact(self, path: Path, name: str) -> None: ...

    def close(self, status: str) -> None: ...


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

    def start_run(self, run_dir: Path, name: str) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: Path, name: str) -> None:
        pass

    def close(self, status: str) -> None:
        pass


def as_tracker(progress: Any) -> Tracker:
    """The tracker side of a progress object, or one that ignores everything (e.g. Flower's log progress)."""
    return progress if hasattr(progress, "log_metrics") else NullProgress()


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

    def start_run(self, run_dir: Path, name: str) -> None:
        self.events.append(("start_run", str(run_dir), name))

    def log_params(self, params: dict[str, Any]) -> None:
        self.events.append(("params", params))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.events.append(("metrics", step, dict(metrics)))

    def log_artifact(self, path: Path, name: str) -> None:
        self.events.append(("artifact", str(path), name))

    def close(self, status: str) -> None:
        self.events.append(("close", status))

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
        # soft_wrap: a long line (a path) is wrapped by the terminal, never cut with a newline by Rich
        self._bars.console.print(message, highlight=False, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Plain log lines for logs people read later (nohup, SLURM, `| tee`): no control codes, no wrapping.

    One line per round (bar `rounds`), per epoch (training logs it), every `--log-every` optimizer steps
    (the Reporter's averaged `train/*` metrics), and when a bar ends (except each client's turn, which
    the round line sums up). Every line is flushed at once, so a pipe shows it while the run goes.
    """

    QUIET_STOP = ("client",)  # bars whose end is not worth a line: every round already gets one

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._bars: dict[str, list[Any]] = {}  # key -> [description, total, done, started]
        self._current: str | None = None  # the bar the latest training metrics belong to

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr  # looked up late: tests swap sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def start(self, key: str, description: str, total: int | None = None) -> None:
        self._bars[key] = [description, total, 0, time.monotonic()]
        if key != "rounds":
            self._current = key

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        bar = self._bars.get(key)
        if bar is None:
            return
        bar[2] += n
        if key == "rounds" and n > 0:
            total = f"/{bar[1]}" if bar[1] else ""
            detail = f" · {info}" if info else ""
            self._write(f"{bar[0]}: {bar[2]}{total}{detail} · {_clock(time.monotonic() - bar[3])}")

    def stop(self, key: str) -> None:
        bar = self._bars.pop(key, None)
        if bar is None or key in self.QUIET_STOP:
            return
        total = f"/{bar[1]}" if bar[1] else ""
        self._write(f"{bar[0]}: done {bar[2]}{total} in {_clock(time.monotonic() - bar[3])}")

    def log(self, message: str) -> None:
        self._write(message)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """An averaged training window from the Reporter: one line, on the bar it belongs to."""
        bar = self._bars.get(self._current or "")
        where = f"{bar[0]}: step {bar[2]}/{bar[1]}" if bar else f"step {step}"
        parts = [where]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "train/learning_rate" in metrics:
            parts.append(f"lr {metrics['train/learning_rate']:.2e}")
        if bar:
            parts.append(_clock(time.monotonic() - bar[3]))
        self._write(" · ".join(parts))


class Reporter:
    """The one object the core reports to: a display (Rich bars or plain lines) and any trackers.

    Per-step training metrics (`train/*`, one call per optimizer step) are averaged over windows of
    `log_every` steps and numbered by a counter that keeps growing across bars (every client of every
    round), so trackers see one monotonic step axis; 0 turns step reports off. Everything else goes to
    the trackers as it comes. A tracker that fails is reported once and then left out: a tracking
    server that goes away must not cost the run.
    """

    def __init__(
        self, display: Any, trackers: Sequence[Tracker] = (), log_every: int = DEFAULT_LOG_EVERY
    ) -> None:
        if log_every < 0:
            raise ValueError(f"--log-every must be >= 0, got {log_every}")
        self.display = display
        self.trackers = list(trackers)
        self.log_every = log_every
        self._train_steps = 0
        self._window: list[float] = []
        self._last: dict[str, float] = {}
        self._closed = False
        self._started = False  # trackers hear nothing before the run (its folder, its name) is known

    def __enter__(self) -> Reporter:
        if hasattr(self.display, "__enter__"):
            self.display.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        from fedlora_cli.runs.record import status_for

        try:
            self._flush()
            self.close(status_for(exc))
        finally:
            if hasattr(self.display, "__exit__"):
                self.display.__exit__(exc_type, exc, tb)

    # the display
    def start(self, key: str, description: str, total: int | None = None) -> None:
        self.display.start(key, description, total)

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        self.display.advance(key, n, info)

    def stop(self, key: str) -> None:
        self._flush()
        self.display.stop(key)

    def log(self, message: str) -> None:
        self.display.log(message)

    # the trackers
    def _each(self, method: str, *args: Any) -> None:
        if not self._started:
            return
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker's own failure: say it once, carry on without it
                from fedlora_cli.errors import first_line

                self.trackers.remove(tracker)
                name = getattr(tracker, "name", type(tracker).__name__)
                self.display.log(f"warning: {name}: {first_line(e)}; no more logging to it in this run")

    def start_run(self, run_dir: Path, name: str) -> None:
        self._started = True
        self._each("start_run", run_dir, name)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss" not in metrics:
            self._each("log_metrics", step, metrics)
            return
        self._train_steps += 1
        if not self.log_every:
            return
        self._window.append(float(metrics["train/loss"]))
        self._last = {k: float(v) for k, v in metrics.items() if k != "train/loss"}
        if len(self._window) >= self.log_every:
            self._flush()

    def _flush(self) -> None:
        if not self._window:
            return
        window = {"train/loss": sum(self._window) / len(self._window), **self._last}
        self._window = []
        if hasattr(self.display, "log_metrics"):
            self.display.log_metrics(self._train_steps, window)
        self._each("log_metrics", self._train_steps, window)

    def log_artifact(self, path: Path, name: str) -> None:
        self._each("log_artifact", path, name)

    def close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.trackers and not self._started:
            names = ", ".join(getattr(t, "name", type(t).__name__) for t in self.trackers)
            self.display.log(f"warning: --report-to {names}: this command reported nothing to trackers")
        self._each("close", status)
