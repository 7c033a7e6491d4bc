"""glibc's allocator for the two halves of a measurement (no effect outside glibc).

Memory: blocks above 64 KB are mapped and returned to the system when freed, so a measured peak
RSS is not hidden by memory freed by whatever ran before. Time: blocks up to 32 MB come from the
heap and the heap is not trimmed, which is where glibc's own adaptive thresholds settle in a
long-running training process; timed under the memory setting, code that allocates temporaries
would pay fresh page faults for them on every call (measured: the per-element MLP optimizer's step
took 2.5 s instead of 1.0 s on a 10M-parameter model).
"""

from __future__ import annotations

import ctypes


def settle(measuring_memory: bool) -> None:
    """Set glibc's thresholds for measuring memory (``True``) or time (``False``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mmap_max, trim = (64 * 1024, 128 * 1024) if measuring_memory else (32 * 2**20, 64 * 2**20)
    libc.mallopt(-3, mmap_max)  # M_MMAP_THRESHOLD (setting it turns off glibc's adaptive growth)
    libc.mallopt(-1, trim)  # M_TRIM_THRESHOLD
