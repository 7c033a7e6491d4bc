"""Schedules as pure functions ``t -> value`` (``t`` a step or a fractional epoch), validated when
built and composed by joining pieces, in the optax manner::

    >>> from nestopt.schedule import linear, cosine, join
    >>> s = join([linear(0.01, 0.3, 5), cosine(0.3, 1e-5, 95)], boundaries=[5])
    >>> round(s(0), 4), round(s(5), 4), round(s(100), 6)
    (0.01, 0.3, 1e-05)

Each piece is a frozen dataclass (so a schedule pickles, prints and compares by value).
"""

from __future__ import annotations

import abc
import bisect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._checks import check_number


class Schedule(abc.ABC):
    """Base class: ``schedule(t)`` is the value at step (or epoch) ``t >= 0``."""

    @abc.abstractmethod
    def __call__(self, t: float) -> float:
        """The value at ``t``."""


def _t(t: float) -> float:
    if isinstance(t, bool | str | bytes):
        raise ValueError(f"t={t!r} is invalid: expected a number >= 0 (a step or an epoch)")
    try:
        v = float(t)  # a 0-dim tensor or array is a number too
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"t={t!r} is invalid: expected a number >= 0 (a step or an epoch)") from None
    if math.isnan(v):
        raise ValueError(f"t={t!r} is invalid: a schedule is defined for t >= 0, not NaN")
    if v < 0:
        raise ValueError(f"t={t!r} is invalid: a schedule is defined for t >= 0")
    return t


def _numbers(name: str, values: Any, what: str) -> tuple[float, ...]:
    """``values`` as a tuple after checking it is a sequence of finite real numbers (not bools)."""
    if isinstance(values, str | bytes):
        raise ValueError(f"{name}={values!r} is invalid: expected a sequence of {what}")
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name}={values!r} is invalid: expected a sequence of {what}") from None
    for v in out:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name}={out!r} is invalid: expected a sequence of finite {what}; got {v!r}")
    return out


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __post_init__(self) -> None:
        check_number("value", self.value, lo=0.0)

    def __call__(self, t: float) -> float:
        _t(t)
        return self.value


@dataclass(frozen=True)
class Linear(Schedule):
    """``start + (end - start) * t / steps`` for ``t <= steps``, then ``end``."""

    start: float
    end: float
    steps: float

    def __post_init__(self) -> None:
        check_number("start", self.start, lo=0.0)
        check_number("end", self.end, lo=0.0)
        check_number("steps", self.steps, lo=0.0, lo_open=True)

    def __call__(self, t: float) -> float:
        t = min(_t(t), self.steps)
        d = (self.end - self.start) * t / self.steps
        if not math.isfinite(d):  # (end - start) * t overflowed: the fraction first (same value otherwise)
            d = (self.end - self.start) * (t / self.steps)
        return self.start + d


@dataclass(frozen=True)
class Cosine(Schedule):
    """``min + (base - min) (1 + cos(pi t / steps)) / 2`` for ``t <= steps``, then ``min``."""

    base: float
    min_value: float
    steps: float

    def __post_init__(self) -> None:
        check_number("base", self.base, lo=0.0)
        check_number("min_value", self.min_value, lo=0.0, hi=self.base)
        check_number("steps", self.steps, lo=0.0, lo_open=True)

    def __call__(self, t: float) -> float:
        t = min(_t(t), self.steps)
        c = 1 + math.cos(math.pi * t / self.steps)
        d = (self.base - self.min_value) * c / 2
        if not math.isfinite(d):  # (base - min) * c overflowed for a base near float's largest: halve first
            d = (self.base - self.min_value) * (c / 2)
        return self.min_value + d


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``base * factor ** (number of milestones <= t)``."""

    base: float
    milestones: tuple[float, ...]
    factor: float

    def __post_init__(self) -> None:
        check_number("base", self.base, lo=0.0)
        check_number("factor", self.factor, lo=0.0, lo_open=True, hi=1.0)
        milestones = _numbers("milestones", self.milestones, "positive, increasing numbers")
        object.__setattr__(self, "milestones", milestones)  # a list would make the frozen dataclass unhashable
        if list(milestones) != sorted(milestones) or any(m <= 0 for m in milestones):
            raise ValueError(f"milestones={self.milestones!r} is invalid: expected positive, increasing values")

    def __call__(self, t: float) -> float:
        return self.base * self.factor ** bisect.bisect_right(self.milestones, _t(t))


@dataclass(frozen=True)
class Exponential(Schedule):
    """``base * factor ** (t / every)`` (smooth), floored at ``min_value``."""

    base: float
    factor: float
    every: float = 1.0
    min_value: float = 0.0

    def __post_init__(self) -> None:
        check_number("base", self.base, lo=0.0)
        check_number("factor", self.factor, lo=0.0, lo_open=True, hi=1.0)
        check_number("every", self.every, lo=0.0, lo_open=True)
        check_number("min_value", self.min_value, lo=0.0, hi=self.base)

    def __call__(self, t: float) -> float:
        return max(self.base * self.factor ** (_t(t) / self.every), self.min_value)


@dataclass(frozen=True)
class Join(Schedule):
    """Piece ``i`` runs from ``boundaries[i-1]`` on, with its own clock restarted at 0."""

    pieces: tuple[Schedule, ...]
    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.pieces, Schedule | str | bytes) or not isinstance(self.pieces, Iterable):
            raise ValueError(f"pieces={self.pieces!r} is invalid: expected a sequence of schedules")
        pieces = tuple(self.pieces)
        for i, piece in enumerate(pieces):
            if not callable(piece):
                raise ValueError(f"pieces[{i}]={piece!r} is invalid: expected a Schedule (constant, linear, ...)")
        boundaries = _numbers("boundaries", self.boundaries, "non-negative, increasing numbers")
        object.__setattr__(self, "pieces", pieces)
        object.__setattr__(self, "boundaries", boundaries)
        if len(pieces) != len(boundaries) + 1:
            raise ValueError(f"boundaries={self.boundaries!r} is invalid: {len(pieces)} pieces need "
                             f"{len(pieces) - 1} boundaries")
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])) or any(b < 0 for b in boundaries):
            raise ValueError(f"boundaries={self.boundaries!r} is invalid: expected non-negative, strictly increasing "
                             "values (a piece between equal boundaries would never run)")

    def __call__(self, t: float) -> float:
        i = bisect.bisect_right(self.boundaries, _t(t))
        start = self.boundaries[i - 1] if i > 0 else 0.0
        return self.pieces[i](t - start)


def constant(value: float) -> Constant:
    return Constant(value)


def linear(start: float, end: float, steps: float) -> Linear:
    return Linear(start, end, steps)


def cosine(base: float, min_value: float, steps: float) -> Cosine:
    return Cosine(base, min_value, steps)


def step_decay(base: float, milestones: Sequence[float], factor: float) -> StepDecay:
    return StepDecay(base, _numbers("milestones", milestones, "positive, increasing numbers"), factor)


def exponential(base: float, factor: float, every: float = 1.0, min_value: float = 0.0) -> Exponential:
    return Exponential(base, factor, every, min_value)


def join(pieces: Sequence[Schedule], boundaries: Sequence[float]) -> Join:
    return Join(pieces, boundaries)  # Join checks both and stores them as tuples


def warmup_then(decay: Schedule, warmup_start: float, base: float, warmup: float) -> Schedule:
    """Linear warmup from ``warmup_start`` to ``base`` over ``warmup``, then ``decay`` (its clock
    starting at the end of warmup); no warmup if ``warmup == 0``."""
    if not callable(decay):
        raise ValueError(f"decay={decay!r} is invalid: expected a Schedule (cosine, step_decay, ...)")
    check_number("warmup", warmup, lo=0.0)
    if warmup == 0:
        return decay
    return join([linear(warmup_start, base, warmup), decay], [warmup])
