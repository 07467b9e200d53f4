"""Process memory: bounded oneDNN shape caches, RSS and CUDA peaks per round, freed memory given back.

Where the memory of a `rounds` run went before (MiniLM, bf16, 3 clients x 200 SST-2 examples; the
README's performance section has the numbers and the commands):
- oneDNN, the library behind PyTorch's bf16 matmuls on CPU, and ideep, its C++ wrapper, each keep a
  compiled kernel per distinct input shape, up to 1024 entries each. Dynamic padding makes every
  (batch, length) pair a new shape, so each client and each evaluation added ~40 MB that was never
  given back, until the caches were full (the growth with the number of clients).
- glibc keeps freed heap pages for reuse: 150-300 MB between clients once the caches above were
  bounded. `release()` hands them back (`malloc_trim`).

No torch import at module level: the CLI imports this before it knows whether it will train.
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
from collections.abc import Iterator
from typing import Any

# oneDNN (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep (`LRU_CACHE_CAPACITY`) read their capacity once, when
# they create their first kernel, so modeling.py sets it when it is imported, before any model is built,
# and only where the user has not set it. 64 entries hold the kernels of about
# two batch shapes (forward and backward of every matmul shape in a layer): enough that the layers of
# one step share kernels (capacity 1 made steps ~20% slower), while the memory stays bounded.
KERNEL_CACHE_CAPACITY = 64
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
    """Peak RSS (and CUDA peak memory) over a stretch of work, such as one round.

    The kernel's own peak (`ru_maxrss`, VmHWM) covers the whole process and resetting it would change
    what `/usr/bin/time` reports, so a daemon thread samples the RSS every `interval` seconds instead:
    a peak that lasts less than one interval can be missed (a training step lasts longer than that).
    CUDA's peak is exact: `torch.cuda.reset_peak_memory_stats` at start, `max_memory_allocated` at stop.

        with PeakMemory() as peak:
            ...                       # the round
        row["memory"] = peak.summary()
    """

    def __init__(self, interval: float = 0.005, device: Any = None) -> None:
        self.interval = interval
        self.device = device  # a torch.device; CUDA peaks are read only for a CUDA device
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", None) == "cuda"

    def start(self) -> PeakMemory:
        self.peak = rss_mb()
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
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
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.summary()

    def summary(self) -> dict[str, float | None]:
        """{"peak_rss_mb", "rss_mb", "cuda_peak_mb"} in MiB; a value is None where it was not measured."""
        now = rss_mb()
        peak = max(p for p in (self.peak, now) if p is not None) if now is not None else self.peak
        cuda = None
        if self._cuda():
            import torch

            cuda = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {"peak_rss_mb": _round(peak), "rss_mb": _round(now), "cuda_peak_mb": _round(cuda)}

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    they pile up (6 passes, 0.6 s of a 3 s model load on MiniLM) and frees nothing. Reference
    counting still frees everything else; collection resumes, as it was, afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
