"""Learning-rate grid search: run a training function at each rate, keep the best on validation."""

from __future__ import annotations

import math
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
    accuracy otherwise). A non-finite score counts as the worst. The seed's grid is
    ``LargeLRConfig().lr_grid``.

        >>> grid_search(lambda lr: (lr - 0.3) ** 2, [0.1, 0.3, 1.0]).best_lr
        0.3
    """
    if not grid:
        raise ValueError("grid=[] is invalid: expected at least one learning rate")
    for lr in grid:
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"grid={list(grid)!r} is invalid: every rate must be a positive number")
    scores = {float(lr): float(train(float(lr))) for lr in grid}
    worst = math.inf if minimize else -math.inf

    def key(lr: float) -> float:
        s = scores[lr]
        s = s if math.isfinite(s) else worst
        return s if minimize else -s

    return GridResult(min(scores, key=key), scores, minimize)
