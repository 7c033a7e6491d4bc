"""The task suite: a registry of named tasks, task families, and two-player games.

    >>> import nestopt.tasks as T
    >>> "digits-mlp" in T.names()
    True
    >>> task = T.get("quad-asym")
    >>> family = T.family("quadratic"); variant = family.sample(3)

``get(name)`` builds a fresh task object each call (data behind it is cached per process).

Tasks, in registration order: the analytic problems (``quad-scalar``, ``quad-sym``, ``quad-asym``,
``quad-cond1e2``, ``quad-cond1e4``, ``rosenbrock``; :mod:`.analytic`); on scikit-learn's digits,
``digits-logreg``, ``digits-mlp``, ``digits-cnn`` (:mod:`.supervised`); ``gru-seq``, a GRU on a
generated temporal-order sequence task (:mod:`.sequence`); ``wide-mlp``, a ~1M-parameter MLP on
digits (:mod:`.supervised`); ``diabetes-mlp`` (regression, :mod:`.supervised`);
``charlm-transformer`` (:mod:`.charlm`); ``trading-multihorizon`` (:mod:`.trading`);
``logic-gates`` (:mod:`.logic_gates`). Families: ``quadratic``, ``teacher-mlp``, ``digits-mlp``,
``trading``, ``digits-cnn``, ``gru-seq`` (:mod:`.families`) and ``logic-gates`` (:mod:`.logic_gates`).
A task may carry ``target``, an absolute quality bar that tuned AdamW reaches (see :class:`Task`).
"""

from __future__ import annotations

from collections.abc import Callable

from .._checks import check_callable, unknown_name
from .analytic import AnalyticTask, AxisQuadratic, Point, RotatedQuadratic, Rosenbrock, ScalarQuadratic
from .base import Task, TaskFamily, generator
from .charlm import CharLMTask
from .families import (DigitsCNNFamily, DigitsMLPFamily, GRUSeqFamily, QuadraticFamily, TeacherMLPFamily,
                       TradingFamily)
from .games import BilinearGame, DiracGAN, Game, MixtureGAN, game_names, get_game, mixture_centers, mode_stats
from .logic_gates import LogicGatesFamily, logic_gates
from .sequence import GRUClassifier, gru_sequence
from .supervised import ArrayTask, DigitsCNN, diabetes_mlp, digits_cnn, digits_logreg, digits_mlp, wide_mlp
from .trading import HORIZON_BARS, HORIZON_NAMES, MarketConfig, TradingTask, auc

_TASKS: dict[str, Callable[[], Task]] = {
    "quad-scalar": ScalarQuadratic,
    "quad-sym": lambda: AxisQuadratic(c=1.0),
    "quad-asym": lambda: AxisQuadratic(c=100.0),
    "quad-cond1e2": lambda: RotatedQuadratic(cond=1e2),
    "quad-cond1e4": lambda: RotatedQuadratic(cond=1e4),
    "rosenbrock": Rosenbrock,
    "digits-logreg": digits_logreg,
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "gru-seq": gru_sequence,
    "wide-mlp": wide_mlp,
    "diabetes-mlp": diabetes_mlp,
    "charlm-transformer": CharLMTask,
    "trading-multihorizon": TradingTask,
    "logic-gates": logic_gates,
}

_FAMILIES: dict[str, Callable[[], TaskFamily]] = {
    "quadratic": QuadraticFamily,
    "teacher-mlp": TeacherMLPFamily,
    "digits-mlp": DigitsMLPFamily,
    "trading": TradingFamily,
    "digits-cnn": DigitsCNNFamily,
    "gru-seq": GRUSeqFamily,
    "logic-gates": LogicGatesFamily,
}


def _name(name: object, valid: dict) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} is invalid: expected a string, one of {', '.join(sorted(valid))}")


def names() -> list[str]:
    """Names of the registered tasks, in registration order."""
    return list(_TASKS)


def get(name: str) -> Task:
    """A fresh instance of the task called ``name`` (``KeyError`` lists the valid names)."""
    _name(name, _TASKS)
    if name not in _TASKS:
        raise unknown_name("task", name, _TASKS)
    return _TASKS[name]()


def register(name: str, factory: Callable[[], Task]) -> None:
    """Add a task to the registry (a ``ValueError`` if the name is taken)."""
    _name(name, _TASKS)
    check_callable("factory", factory, "a function () -> Task")
    if name in _TASKS:
        raise ValueError(f"name={name!r} is invalid: a task of that name is already registered")
    _TASKS[name] = factory


def family_names() -> list[str]:
    return list(_FAMILIES)


def family(name: str) -> TaskFamily:
    """The task family called ``name`` (``KeyError`` lists the valid names)."""
    _name(name, _FAMILIES)
    if name not in _FAMILIES:
        raise unknown_name("task family", name, _FAMILIES)
    return _FAMILIES[name]()


__all__ = [
    "AnalyticTask", "ArrayTask", "AxisQuadratic", "BilinearGame", "CharLMTask", "DigitsCNN", "DigitsCNNFamily",
    "DiracGAN", "GRUClassifier", "GRUSeqFamily", "Game", "HORIZON_BARS", "HORIZON_NAMES", "LogicGatesFamily",
    "MarketConfig", "Point", "RotatedQuadratic", "Rosenbrock", "ScalarQuadratic", "Task", "TaskFamily",
    "TradingTask", "auc", "diabetes_mlp", "digits_cnn", "digits_logreg", "digits_mlp", "family", "family_names",
    "game_names", "generator", "get", "get_game", "gru_sequence", "logic_gates", "MixtureGAN", "mixture_centers",
    "mode_stats", "names", "register", "wide_mlp",
]
