"""Argument validation shared by every public constructor.

Each check raises ``ValueError`` whose message names the argument, the value it
got and what is allowed, so a user can fix the call without reading the source.
"""

from __future__ import annotations

import math
import numbers
import numbers
from collections.abc import Iterable
from typing import Any


def _fmt(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else f"{r[:40]}...({len(r)} characters)"


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``float(value)`` after checking it is a finite number inside the given bounds."""
    # numbers.Real takes NumPy's scalars too (np.float32 from a NumPy-based schedule)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected a real number")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range (10**400)
        v = math.inf
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


def check_seed(name: str, value: Any, *, lo: int | None = 0) -> int:
    """Return ``int(value)`` after checking it is an integer seed (a Python or NumPy integer, not a bool,
    a float or a string: a seed of 1.5 must not silently become 1) of at least ``lo`` (``None``: any)."""
    what = "an integer seed" if lo is None else f"an integer seed >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected {what}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected {what}")
    return int(value)


def check_callable(name: str, value: Any, what: str = "a callable") -> Any:
    """Return ``value`` after checking it can be called (a ``TypeError`` naming ``what`` is expected)."""
    if not callable(value):
        raise TypeError(f"{name}={_fmt(value)} is invalid: expected {what}")
    return value


def check_fraction_list(name: str, values: Any, *, lo: float = 0.0, hi: float = 1.0, hi_open: bool = True
                        ) -> tuple[float, ...]:
    """Return ``values`` as a tuple after checking it is a non-empty sequence of finite numbers in range."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}={_fmt(values)} is invalid: expected a sequence of numbers in "
                         f"{_range(lo, hi, False, hi_open)}")
    out = tuple(values)
    for v in out:
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < lo
                or v > hi or (hi_open and v == hi)):
            raise ValueError(f"{name}={_fmt(values)} is invalid: each must be a number in {_range(lo, hi, False, hi_open)}")
    return out


def as_real(name: str, value: Any, what: str = "a real number") -> float:
    """``float(value)`` for a number or a one-element tensor/array; a ``ValueError`` naming ``name`` otherwise
    (no finiteness check: the caller decides what a non-finite value means)."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected {what}")
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    n = numel() if callable(numel) else numel
    if isinstance(n, int) and n != 1:
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected {what}, got {n} elements")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}={_fmt(value)} is invalid: expected {what}") from None
