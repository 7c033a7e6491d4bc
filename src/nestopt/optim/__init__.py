"""Optimizers: real ``torch.optim.Optimizer`` subclasses. What the benchmark runs them with (grids,
schedules, the conformance table's rates) lives in :mod:`nestopt.bench.registry`; the networks the
learned and nested optimizers run live in :mod:`nestopt.nets`.
"""

from .averaging import BEMA, EMA
from .complex import ComplexAdam, ComplexMomentum
from .hypergradient import HypergradientAdam, HypergradientSGD
from .learned import LearnedOptimizer
from .muon import MuonAdamW, muon_param_groups
from ..nets import Controller
from .nested import NestedOptimizer
from .polyak import Polyak, PolyakAdam

__all__ = ["BEMA", "EMA", "ComplexAdam", "ComplexMomentum", "Controller", "HypergradientAdam", "HypergradientSGD", "LearnedOptimizer", "MuonAdamW", "NestedOptimizer", "Polyak",
           "PolyakAdam", "muon_param_groups"]
