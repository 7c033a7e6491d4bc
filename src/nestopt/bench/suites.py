"""Benchmark suites and the job plan.

``quick`` (a few minutes on 2 cores): seven tasks, 2 seeds, tuned baselines on every other rate of
their grids (a decade apart: 5 rates for Adam and AdamW), every available optimizer but the costly
matrix peers (``full_only`` in the registry: SOAP, AdEMAMix; Muon runs). ``full``: every registered
task, 3 seeds, the whole grids (half a decade apart), every available optimizer but the ones that run
only when named (``named_only``: PSGD-Kron).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import tasks as task_registry
from .._checks import check_int, unknown_name
from . import registry as opt_registry
from .runner import Job


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]
    seeds: int
    grid_stride: int = 1
    full: bool = False

    def optimizers(self) -> list[str]:
        """The available optimizers this suite runs when none are named."""
        return [s.name for s in opt_registry.specs() if not s.named_only and (self.full or not s.full_only)]


SUITES: dict[str, Suite] = {
    "quick": Suite("quick", ("quad-asym", "quad-cond1e2", "rosenbrock", "digits-logreg", "digits-mlp",
                             "diabetes-mlp", "trading-multihorizon"), seeds=2, grid_stride=2),
    "full": Suite("full", tuple(task_registry.names()), seeds=3, full=True),
}


def suite(name: str) -> Suite:
    if name not in SUITES:
        raise unknown_name("suite", name, SUITES)
    return SUITES[name]


def plan(tasks: Sequence[str], optimizers: Sequence[str], seeds: int, steps: int | None = None,
         grid_stride: int = 1) -> list[Job]:
    """All jobs for the given tasks and optimizers. ``adamw`` is always added (it sets the
    targets); a tuned optimizer runs every ``grid_stride``-th rate of its grid, and its default
    rate where it is also reported at its default (:meth:`OptimizerSpec.grid`); ``steps``
    overrides every task's budget."""
    check_int("grid_stride", grid_stride, lo=1)
    check_int("seeds", seeds, lo=1)
    if steps is not None:
        check_int("steps", steps, lo=1)
    for t in tasks:
        if t not in task_registry.names():
            raise unknown_name("task", t, task_registry.names())
    available = opt_registry.names()
    for o in optimizers:
        if o not in available:
            raise unknown_name("optimizer", o, available)
    names = list(dict.fromkeys(["adamw", *optimizers]))
    jobs = []
    for t in tasks:
        budget = steps if steps is not None else task_registry.get(t).default_steps
        for o in names:
            jobs += [Job(t, o, float(lr), s, budget) for lr in opt_registry.get(o).grid(grid_stride)
                     for s in range(seeds)]
    return jobs
