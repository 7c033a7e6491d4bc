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
``logic-gates`` (:mod:`.logic_gates`); ``stopping-maxcall-d2``, ``stopping-maxcall-d5`` and
``stopping-exit``, deep optimal stopping (:mod:`.stopping`). Families: ``quadratic``, ``teacher-mlp``, ``digits-mlp``,
``trading``, ``digits-cnn``, ``gru-seq`` (:mod:`.families`), ``logic-gates`` (:mod:`.logic_gates`) and
``trading-daily``, one walk-forward market refit every day (:mod:`.daily`).

``family(spec)`` also takes a user's family by import path (``"mypkg.tasks:MyFamily"``: a
:class:`TaskFamily` subclass built with no arguments, or an instance), and a range of its seeds
(days) after ``@``: ``family("trading-daily@0:60")`` samples days 0 to 59 only
(:class:`DayRange`, seed ``s`` giving day ``0 + s % 60``), which is how meta-training keeps to the
past days.
A task may carry ``target``, an absolute quality bar that tuned AdamW reaches (see :class:`Task`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .._checks import check_callable, check_seed, unknown_name
from .analytic import AnalyticTask, AxisQuadratic, Point, RotatedQuadratic, Rosenbrock, ScalarQuadratic
from .base import Task, TaskFamily, generator
from .charlm import CharLMTask
from .daily import DailyMarketConfig, DailyTradingTask, TradingDailyFamily
from .families import (DigitsCNNFamily, DigitsMLPFamily, GRUSeqFamily, QuadraticFamily, TeacherMLPFamily,
                       TradingFamily)
from .games import BilinearGame, DiracGAN, Game, MixtureGAN, game_names, get_game, mixture_centers, mode_stats
from .logic_gates import LogicGatesFamily, logic_gates
from .sequence import GRUClassifier, gru_sequence
from .stopping import MaxCall, StoppingTask, TradeExit, exit_task, maxcall_task
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
    "stopping-maxcall-d2": lambda: maxcall_task(2),
    "stopping-maxcall-d5": lambda: maxcall_task(5),
    "stopping-exit": exit_task,
}

_FAMILIES: dict[str, Callable[[], TaskFamily]] = {
    "quadratic": QuadraticFamily,
    "teacher-mlp": TeacherMLPFamily,
    "digits-mlp": DigitsMLPFamily,
    "trading": TradingFamily,
    "digits-cnn": DigitsCNNFamily,
    "gru-seq": GRUSeqFamily,
    "logic-gates": LogicGatesFamily,
    "trading-daily": TradingDailyFamily,
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


class DayRange(TaskFamily):
    """The seeds (days) ``lo`` to ``hi - 1`` of ``base``: ``sample(s)`` is ``base.sample(lo + s % (hi - lo))``."""

    def __init__(self, base: TaskFamily, lo: int, hi: int, spec: str | None = None) -> None:
        if not isinstance(base, TaskFamily):
            raise TypeError(f"base={base!r} is invalid: expected a TaskFamily")
        check_seed("lo", lo)
        check_seed("hi", hi, lo=lo + 1)
        days = getattr(base, "days", None)
        if isinstance(days, range) and (lo < days.start or hi > days.stop):
            raise ValueError(f"days={lo}:{hi} is invalid: family {base.name!r} has days {days.start}:{days.stop}")
        self.base, self.lo, self.hi = base, lo, hi
        self.name = spec or f"{base.name}@{lo}:{hi}"
        self.description = f"{base.description} (days {lo} to {hi - 1})"
        self.days = range(lo, hi)

    def sample(self, seed: int) -> Task:
        return self.base.sample(self.lo + check_seed("seed", seed) % (self.hi - self.lo))


def _by_path(path: str) -> TaskFamily:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"task family {path!r} cannot be imported ({type(e).__name__}: {e}); expected "
                       "'module:Class' with the module on the Python path, or one of "
                       f"{', '.join(sorted(_FAMILIES))}") from None
    if isinstance(obj, type) and issubclass(obj, TaskFamily):
        obj = obj()
    if not isinstance(obj, TaskFamily):
        raise KeyError(f"task family {path!r} is a {type(obj).__name__}, not a nestopt.tasks.TaskFamily (subclass "
                       "it and give it sample(seed) -> Task)")
    return obj


def family(name: str) -> TaskFamily:
    """The task family ``name``: a registered name, or ``module:Class``; either may end in
    ``@LO:HI`` to keep to seeds (days) ``LO`` to ``HI - 1`` (``KeyError`` lists the valid names)."""
    _name(name, _FAMILIES)
    base, at, days = name.partition("@")
    if at:
        lo, colon, hi = days.partition(":")
        if not (colon and lo.isdigit() and hi.isdigit() and int(hi) > int(lo)):
            raise KeyError(f"task family {name!r}: the days after '@' must be LO:HI with 0 <= LO < HI, e.g. "
                           f"{base}@0:60")
        try:
            return DayRange(family(base), int(lo), int(hi), spec=name)
        except ValueError as e:
            raise KeyError(f"task family {name!r}: {e}") from None
    if ":" in name:
        return _by_path(name)
    if name not in _FAMILIES:
        raise unknown_name("task family", name, _FAMILIES)
    return _FAMILIES[name]()


__all__ = [
    "AnalyticTask", "ArrayTask", "AxisQuadratic", "BilinearGame", "CharLMTask", "DailyMarketConfig",
    "DailyTradingTask", "DayRange", "DigitsCNN", "DigitsCNNFamily",
    "DiracGAN", "GRUClassifier", "GRUSeqFamily", "Game", "HORIZON_BARS", "HORIZON_NAMES", "LogicGatesFamily",
    "MarketConfig", "MaxCall", "Point", "RotatedQuadratic", "Rosenbrock", "ScalarQuadratic", "StoppingTask", "Task", "TaskFamily", "TradeExit",
    "TradingDailyFamily", "TradingTask", "auc", "diabetes_mlp", "digits_cnn", "exit_task", "digits_logreg", "digits_mlp", "family", "family_names",
    "game_names", "generator", "get", "get_game", "gru_sequence", "logic_gates", "maxcall_task", "MixtureGAN", "mixture_centers",
    "mode_stats", "names", "register", "wide_mlp",
]
