"""glibc's allocator for the two halves of a measurement (no effect outside glibc).

Memory: blocks above 64 KB are mapped and returned to the system when freed, so a measured peak
RSS is not hidden by memory freed by whatever ran before. Time: blocks up to 32 MB come from the
heap and the heap is not trimmed, which is where glibc's own adaptive thresholds settle in a
long-running training process; timed under the memory setting, code that allocates temporaries
would pay fresh page faults for them on every call (measured: the per-element MLP optimizer's step
took 2.5 s instead of 1.0 s on a 10M-parameter model).

:func:`settled` sets one of them for a ``with`` block and puts back the one before; :func:`settle`
sets one from then on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's defaults for both thresholds (its adaptive growth of them stops once either is set)
_DEFAULTS = (128 * 1024, 128 * 1024)
# the setting made here last: True (memory), False (time) or None (glibc's defaults)
_current: bool | None = None


def _mallopt(mmap_max: int, trim: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, mmap_max)  # M_MMAP_THRESHOLD (setting it turns off glibc's adaptive growth)
    libc.mallopt(-1, trim)  # M_TRIM_THRESHOLD


def settle(measuring_memory: bool) -> None:
    """Set glibc's thresholds for measuring memory (``True``) or time (``False``)."""
    global _current
    _mallopt(*((64 * 1024, 128 * 1024) if measuring_memory else (32 * 2**20, 64 * 2**20)))
    _current = measuring_memory


def current() -> bool | None:
    """The setting made here last (``None``: none, or glibc's defaults put back)."""
    return _current


@contextmanager
def settled(measuring_memory: bool) -> Iterator[None]:
    """:func:`settle` for the block, then the setting before it: the other one, or, when none was made
    here, glibc's default thresholds (glibc cannot read them back, nor restart its adaptive growth
    of them once they are set)."""
    global _current
    before = _current
    settle(measuring_memory)
    try:
        yield
    finally:
        if before is None:
            _mallopt(*_DEFAULTS)
            _current = None
        else:
            settle(before)
