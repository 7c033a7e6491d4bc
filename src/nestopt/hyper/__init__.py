"""Hypergradients: implicit differentiation, unrolled differentiation, best-response hypernetworks.

- :func:`implicit_hypergradient`: the implicit function theorem with CG / Neumann / dense solves, or a
  user's solver ``solve(matvec, b, **opts) -> (x, info)`` (:mod:`.solvers` states the contract).
- :func:`unrolled_hypergradient`: reverse mode through K differentiable SGD steps, with truncation.
- :class:`SelfTuningMLP` / :class:`STNTrainer`: a self-tuning network (best-response hypernetwork)
  for weight decay and dropout rate.
- :class:`Bilevel`: alternates inner training and hyperparameter steps with either hypergradient.
"""

from .bilevel import HORIZONS, METHODS, Bilevel
from .implicit import implicit_hypergradient
from .solvers import SOLVER_FUNCTIONS, SOLVERS, HypergradientError, SolveInfo, conjugate_gradient, dense_solve, neumann
from .stn import SelfTuningMLP, STLinear, STNTrainer
from .unrolled import UnrollInfo, unrolled_hypergradient

__all__ = ["HORIZONS", "METHODS", "SOLVERS", "SOLVER_FUNCTIONS", "Bilevel", "HypergradientError", "STLinear",
           "STNTrainer", "SelfTuningMLP", "SolveInfo", "UnrollInfo", "conjugate_gradient", "dense_solve",
           "implicit_hypergradient", "neumann", "unrolled_hypergradient"]
