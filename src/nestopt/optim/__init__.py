"""Optimizers, and the registry that the benchmark and the conformance tests read.

``registry.names()`` lists what is available; ``registry.get(name).make(params, lr)`` builds one.
"""

from . import registry
from .complex import ComplexAdam, ComplexMomentum
from .hypergradient import HypergradientAdam, HypergradientSGD
from .learned import LearnedOptimizer
from .nested import Controller, NestedOptimizer
from .polyak import Polyak, PolyakAdam
from .registry import OptimizerSpec, get, names, register

__all__ = ["ComplexAdam", "ComplexMomentum", "Controller", "HypergradientAdam", "HypergradientSGD", "LearnedOptimizer", "NestedOptimizer", "OptimizerSpec", "Polyak",
           "PolyakAdam", "get", "names", "register", "registry"]
