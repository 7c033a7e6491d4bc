"""Measurements for the hypergradient study: peak extra resident memory while a call runs, resident
memory, and best-of-n call times, each with glibc's allocator settled for it (:mod:`nestopt._malloc`)."""

from __future__ import annotations

import ctypes
import gc
import math
import time
from contextlib import AbstractContextManager
from typing import Any

from ..._malloc import settle, settled


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def measuring_memory() -> AbstractContextManager[None]:
    """For a ``with`` block: large blocks straight from mmap, so freed memory leaves the process and
    peak RSS is honest (:func:`_time` switches to the allocator's long-run setting while it times,
    and back); the allocator's setting before it afterwards."""
    return settled(measuring_memory=True)


def _mallopt_for_measurement() -> None:
    """:func:`measuring_memory`'s setting from now on, for a measurement outside the study (the
    study itself sets it for its run only)."""
    settle(measuring_memory=True)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mb(fn) -> float | None:
    """Peak resident memory above the starting level while ``fn()`` runs (Linux; ``None`` elsewhere)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    start = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if start is None or peak is None else (peak - start) / 1024


def rss_mb() -> float:
    v = _status_kb("VmRSS")
    return math.nan if v is None else v / 1024


def _time(fn, repeats: int) -> float:
    """Best of ``repeats`` calls after one warm-up, with the allocator as in a long run (freed blocks
    reused, :mod:`nestopt._malloc`); the allocator's setting before it is restored afterwards."""
    with settled(measuring_memory=False):
        fn()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
