"""The task interface every benchmark, study and meta-trainer talks to.

A :class:`Task` is one optimization problem:

- ``init(seed)`` builds the model (an ``nn.Module`` holding every trainable tensor),
  bitwise identical for the same seed;
- ``sampler(seed)`` returns ``next_batch(step)``, the training batch at a step, also a pure
  function of the seed;
- ``loss(model, batch)`` is the differentiable training loss on a batch;
- ``evaluate(model)`` returns validation metrics, at least ``val_loss`` (and ``val_accuracy``
  where it applies);
- ``default_steps`` and ``batch_size`` are the budget and batch size the benchmark uses;
- ``goal`` (optional) is an absolute quality bar, e.g. ``{"val_accuracy": 0.95}``: metrics that
  tuned AdamW reaches within ``default_steps`` on the seeds the tests run (0, 1, 2). A key ending
  in ``loss`` is an upper bound, any other key (accuracy, AUC) a lower bound; :meth:`Task.meets_goal`
  checks it. (The benchmark's own *target*, the loss tuned AdamW reaches on every seed of a run, is
  another thing: it is measured per run, see :mod:`nestopt.bench.scoring`.)

A :class:`TaskFamily` samples task variants from a seed (for meta-training)::

    >>> import nestopt.tasks as T
    >>> task = T.get("digits-logreg")
    >>> model = task.init(seed=0)
    >>> next_batch = task.sampler(seed=0)
    >>> loss = task.loss(model, next_batch(0))
    >>> sorted(task.evaluate(model))[:2]
    ['val_accuracy', 'val_loss']
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_int, check_seed

Batch = Any
Sampler = Callable[[int], Batch]


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for ``seed`` (an integer); ``stream`` separates independent uses of one seed."""
    seed = check_seed("seed", seed, lo=None)
    check_int("stream", stream, lo=0)
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + stream * 7_919) % (2**63 - 1))
    return g


class Task(abc.ABC):
    """One optimization problem. Subclasses set the class attributes and the four methods."""

    name: str = "task"
    kind: str = "generic"
    default_steps: int = 200
    batch_size: int = 1
    has_accuracy: bool = False
    description: str = ""
    goal: dict[str, float] | None = None

    @abc.abstractmethod
    def init(self, seed: int) -> nn.Module:
        """A freshly initialised model, identical for identical seeds."""

    @abc.abstractmethod
    def sampler(self, seed: int) -> Sampler:
        """``next_batch(step)``: the training batch at ``step`` for run ``seed``."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (differentiable)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics: ``val_loss`` always, ``val_accuracy`` where it applies."""

    def info(self) -> dict[str, Any]:
        """A JSON-able summary for listings and reports."""
        return {"name": self.name, "kind": self.kind, "default_steps": self.default_steps,
                "batch_size": self.batch_size, "has_accuracy": self.has_accuracy,
                "description": self.description,
                "goal": None if self.goal is None else dict(self.goal)}

    def meets_goal(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` (from :meth:`evaluate`) reach :attr:`goal`: each key ending in
        ``loss`` at or below its bound, each other key at or above it (``ValueError`` without a
        goal; a missing or NaN metric fails)."""
        if self.goal is None:
            raise ValueError(f"task {self.name!r} has no goal")
        for key, bound in self.goal.items():
            v = metrics.get(key)
            if v is None or v != v:
                return False
            if (v > bound) if key.endswith("loss") else (v < bound):
                return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class TaskFamily(abc.ABC):
    """A distribution over tasks: ``sample(seed)`` returns a task, the same one for a seed."""

    name: str = "family"
    description: str = ""

    @abc.abstractmethod
    def sample(self, seed: int) -> Task:
        """The task variant drawn for ``seed``."""


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Cross-entropy and accuracy of ``model`` on a full validation set."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    loss = nn.functional.cross_entropy(logits, y)
    acc = (logits.argmax(dim=-1) == y).float().mean()
    return {"val_loss": float(loss), "val_accuracy": float(acc)}
