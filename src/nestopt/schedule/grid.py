"""Learning-rate grid search: run a training function at each rate, keep the best on validation."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GridResult:
    best_lr: float
    scores: dict[float, float]  # rate -> validation score (nan where training diverged)
    minimize: bool

    def table(self) -> str:
        rows = [f"{'lr':>8s}  {'score':>10s}"]
        rows += [f"{lr:8.3g}  {s:10.4g}{'  <- best' if lr == self.best_lr else ''}" for lr, s in self.scores.items()]
        return "\n".join(rows)


def grid_search(train: Callable[[float], float], grid: Sequence[float], *, minimize: bool = True) -> GridResult:
    """``train(lr)`` trains from scratch and returns a validation score (loss when ``minimize``,
    accuracy otherwise). A non-finite score (a diverged run) counts as the worst and never wins; a
    grid where every run diverged is refused (``ValueError``). The seed's grid is
    ``LargeLRConfig().lr_grid``.

        >>> grid_search(lambda lr: (lr - 0.3) ** 2, [0.1, 0.3, 1.0]).best_lr
        0.3
    """
    if not callable(train):
        raise TypeError(f"train={train!r} is invalid: expected a function train(lr) -> validation score")
    if not isinstance(minimize, bool):
        raise ValueError(f"minimize={minimize!r} is invalid: expected True (a loss) or False (an accuracy)")
    if isinstance(grid, str | bytes):
        raise ValueError(f"grid={grid!r} is invalid: expected a sequence of positive learning rates")
    try:
        rates = list(grid)  # read once: a generator is a valid grid
    except TypeError:
        raise ValueError(f"grid={grid!r} is invalid: expected a sequence of positive learning rates") from None
    if not rates:
        raise ValueError("grid=[] is invalid: expected at least one learning rate")
    for lr in rates:
        try:
            ok = not isinstance(lr, bool) and isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0
        except OverflowError:  # an int beyond float's range
            ok = False
        if not ok:
            raise ValueError(f"grid={rates!r} is invalid: every rate must be a positive number; got {lr!r}")
    if len({float(lr) for lr in rates}) != len(rates):
        twice = sorted({float(lr) for lr in rates if sum(float(x) == float(lr) for x in rates) > 1})
        raise ValueError(f"grid={rates!r} is invalid: {twice} appear twice (each rate is trained once)")
    scores: dict[float, float] = {}
    for lr in rates:
        value = train(float(lr))
        if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
            raise TypeError(f"train({float(lr)!r}) returned {value!r}: expected a number (the validation score)")
        try:
            scores[float(lr)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"train({float(lr)!r}) returned {value!r}: expected a number (the validation score)"
                            ) from None
    if not any(math.isfinite(s) for s in scores.values()):
        raise ValueError(f"grid_search: every run diverged (no finite score) on grid={list(scores)!r}; scores "
                         f"{scores!r}. Try smaller rates.")
    worst = math.inf if minimize else -math.inf

    def key(lr: float) -> float:
        s = scores[lr]
        s = s if math.isfinite(s) else worst
        return s if minimize else -s

    return GridResult(min(scores, key=key), scores, minimize)
