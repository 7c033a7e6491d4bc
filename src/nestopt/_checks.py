"""Argument validation shared by every public constructor.

Each check raises ``ValueError`` whose message names the argument, the value it
got and what is allowed, so a user can fix the call without reading the source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _fmt(value: Any) -> str:
    return repr(value)


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``float(value)`` after checking it is a finite number inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected a real number")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}={_fmt(value)} is invalid: allowed range is {_range(lo, hi, lo_open, hi_open)}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name}={_fmt(value)} is invalid: allowed range is {_range(lo, hi, lo_open, hi_open)}")
    return v


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """Return ``value`` after checking it is an ``int`` (not a bool) inside ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={_fmt(value)} is invalid: allowed range is "
                         f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` after checking it is one of ``choices``."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected one of {', '.join(map(str, options))}")
    return value


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> KeyError:
    """The error for a registry miss: it lists every valid name."""
    return KeyError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
