"""Process memory: bounded oneDNN kernel caches, RSS and CUDA peaks per round, freed memory given back.

Where the memory of a `rounds` run went (MiniLM, bf16; README "Memory" has the numbers and commands):
- oneDNN, the library behind PyTorch's bf16 matmuls on CPU, and ideep, its C++ wrapper, each keep a
  compiled kernel per distinct input shape, up to 1024 entries each. Dynamic padding makes every
  (batch, length) pair a new shape, so each client and each evaluation added ~40 MB that stayed,
  until the caches were full: the growth with the number of clients. Bounded here.
- glibc keeps freed heap pages for reuse: ~150 MB after a round on MiniLM, ~550 MB on roberta-base
  size, more or less depending on the last client. `release()` hands them back.
- Elsewhere: bf16 autocast's per-step weight copies (training.hold_frozen_weights), and
  scikit-learn's imports for the metrics (evaluation.py).

No torch import at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

# oneDNN (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep (`LRU_CACHE_CAPACITY`) read their capacity once, when
# they create their first kernel, so modeling.py sets it when it is imported, before any model is built,
# and only where the user has not set it. 16 entries hold the kernels of one batch shape (forward and
# backward of each matmul shape in a layer), so the layers of a step share them. Measured on MiniLM
# (10 clients, CPU time, under load): capacity 1 made training ~30% slower; 16 against 64 was within
# noise (about 4%) and peaked 40 MB lower (roberta-base size: 50-90 MB lower).
KERNEL_CACHE_CAPACITY = 16
_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Bound oneDNN's and ideep's per-shape kernel caches (takes effect only before their first use)."""
    for name in _CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


# ---------------------------------------------------------------------------------------------------
# measuring


def rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (None where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:  # Linux: cheap enough to sample every few ms
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # macOS / Windows, where installed
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def process_peak_rss_mb() -> float:
    """The highest RSS this process has had since it started (getrusage: exact, never reset)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Peak RSS and CUDA peak memory over a stretch of work, such as one round or one client's turn.

    The kernel's own RSS peak (`ru_maxrss`, VmHWM) covers the whole process, and resetting it would change
    what `/usr/bin/time` reports, so a daemon thread samples the RSS every `interval` seconds instead: a
    peak shorter than one interval can be missed (a training step lasts longer). CUDA's peak is exact:
    `torch.cuda.max_memory_allocated` since this scope started. Scopes nest: a client's scope inside a
    round's resets CUDA's peak counter, so every reset first folds the peak so far into the open scopes.

        peak = PeakMemory(device=device).start()
        ...                                      # the round
        row["memory"] = peak.stop()              # {"peak_rss_mb", "rss_mb", "cuda_peak_mb"}
    """

    def __init__(self, device: Any = None, *, rss: bool = True, interval: float = 0.005) -> None:
        self.device = device  # a torch.device; CUDA memory is measured only for a CUDA device
        self.rss = rss  # False: CUDA only (no sampling thread)
        self.interval = interval
        self.peak: float | None = None
        self.cuda_peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: dict[str, float | None] | None = None

    @property
    def _cuda(self) -> bool:
        return getattr(self.device, "type", None) == "cuda"

    def start(self) -> PeakMemory:
        self._result = None
        if self._cuda:
            _reset_cuda_peak(self.device)
            self.cuda_peak = 0.0
            _OPEN_CUDA_SCOPES.add(self)
        if self.rss:
            self.peak = rss_mb()
            if self.peak is not None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, name="fedlora-rss-peak", daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_mb()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def stop(self) -> dict[str, float | None]:
        """End the scope; returns (and keeps) its summary."""
        if self._result is None:
            result = self.summary()
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._thread = None
            _OPEN_CUDA_SCOPES.discard(self)
            self._result = result
        return self._result

    def summary(self) -> dict[str, float | None]:
        """{"peak_rss_mb", "rss_mb", "cuda_peak_mb"} in MiB so far; None where not measured."""
        if self._result is not None:
            return self._result
        now = rss_mb() if self.rss else None
        peak = max((p for p in (self.peak, now) if p is not None), default=None)
        if self._cuda:
            import torch

            self.cuda_peak = max(self.cuda_peak or 0.0, torch.cuda.max_memory_allocated(self.device) / 2**20)
        return {"peak_rss_mb": _round(peak), "rss_mb": _round(now), "cuda_peak_mb": _round(self.cuda_peak)}

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Weak: a scope left open by an exception (a diverged client) disappears with it.
_OPEN_CUDA_SCOPES: weakref.WeakSet[PeakMemory] = weakref.WeakSet()


def _reset_cuda_peak(device: Any) -> None:
    import torch

    so_far = torch.cuda.max_memory_allocated(device) / 2**20
    for scope in _OPEN_CUDA_SCOPES:
        if scope.device == device:
            scope.cuda_peak = max(scope.cuda_peak or 0.0, so_far)
    torch.cuda.reset_peak_memory_stats(device)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------------------------------------
# giving memory back


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


_LIBC = _libc()


def release() -> None:
    """Give the free pages of glibc's heaps back to the system (`malloc_trim`); a no-op elsewhere.

    glibc keeps freed memory for reuse: after a client's turn on MiniLM ~170 MB of the heap is free
    (~600 MB on a roberta-base-size model), which the next turn reuses. Trimming costs 20-35 ms plus
    the page faults of touching that memory again, so call it once per round (or when a process goes
    idle, such as a SuperNode between messages), not after every client. It does not collect garbage:
    `gc.collect()` takes about a second with transformers loaded (400k objects) and finds nothing
    here; tensors are freed by reference counting.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while transformers and PEFT are imported and a model is built.

    Those imports create ~400k long-lived objects; the collector runs full passes over all of them as
    they pile up (6 passes, 0.3-0.6 s of CPU when MiniLM loads) and frees nothing. Reference
    counting still frees everything else; collection resumes, as it was, afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
