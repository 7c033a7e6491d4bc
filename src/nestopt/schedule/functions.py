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
from collections.abc import Sequence
from dataclasses import dataclass

from .._checks import check_number


class Schedule(abc.ABC):
    """Base class: ``schedule(t)`` is the value at step (or epoch) ``t >= 0``."""

    @abc.abstractmethod
    def __call__(self, t: float) -> float:
        """The value at ``t``."""


def _t(t: float) -> float:
    if t < 0:
        raise ValueError(f"t={t!r} is invalid: a schedule is defined for t >= 0")
    return t


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
        return self.start + (self.end - self.start) * t / self.steps


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
        return self.min_value + (self.base - self.min_value) * (1 + math.cos(math.pi * t / self.steps)) / 2


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``base * factor ** (number of milestones <= t)``."""

    base: float
    milestones: tuple[float, ...]
    factor: float

    def __post_init__(self) -> None:
        check_number("base", self.base, lo=0.0)
        check_number("factor", self.factor, lo=0.0, lo_open=True, hi=1.0)
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
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
        if len(self.pieces) != len(self.boundaries) + 1:
            raise ValueError(f"boundaries={self.boundaries!r} is invalid: {len(self.pieces)} pieces need "
                             f"{len(self.pieces) - 1} boundaries")
        if list(self.boundaries) != sorted(self.boundaries) or any(b < 0 for b in self.boundaries):
            raise ValueError(f"boundaries={self.boundaries!r} is invalid: expected non-negative, increasing values")

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
    return StepDecay(base, tuple(milestones), factor)


def exponential(base: float, factor: float, every: float = 1.0, min_value: float = 0.0) -> Exponential:
    return Exponential(base, factor, every, min_value)


def join(pieces: Sequence[Schedule], boundaries: Sequence[float]) -> Join:
    return Join(tuple(pieces), tuple(boundaries))


def warmup_then(decay: Schedule, warmup_start: float, base: float, warmup: float) -> Schedule:
    """Linear warmup from ``warmup_start`` to ``base`` over ``warmup``, then ``decay`` (its clock
    starting at the end of warmup); no warmup if ``warmup == 0``."""
    if warmup == 0:
        return decay
    return join([linear(warmup_start, base, warmup), decay], [warmup])
