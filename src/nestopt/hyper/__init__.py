"""Hypergradients: implicit differentiation, unrolled differentiation, best-response hypernetworks.

- :func:`implicit_hypergradient`: the implicit function theorem with CG / Neumann / dense solves.
- :func:`unrolled_hypergradient`: reverse mode through K differentiable SGD steps, with truncation.
- :class:`SelfTuningMLP` / :class:`STNTrainer`: a self-tuning network (best-response hypernetwork)
  for weight decay and dropout rate.
- :class:`Bilevel`: alternates inner training and hyperparameter steps with either hypergradient.
"""

from .bilevel import HORIZONS, METHODS, Bilevel
from .implicit import SOLVERS, HypergradientError, SolveInfo, implicit_hypergradient
from .stn import SelfTuningMLP, STLinear, STNTrainer
from .unrolled import UnrollInfo, unrolled_hypergradient

__all__ = ["HORIZONS", "METHODS", "SOLVERS", "Bilevel", "HypergradientError", "STLinear", "STNTrainer",
           "SelfTuningMLP", "SolveInfo", "UnrollInfo", "implicit_hypergradient", "unrolled_hypergradient"]
