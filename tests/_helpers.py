"""Small models, data and closures shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn

from nestopt.optim import (ComplexAdam, ComplexMomentum, HypergradientAdam, HypergradientSGD, LearnedOptimizer,
                           NestedOptimizer, Polyak, PolyakAdam)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def regression_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def mse_closure(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``closure()`` for ``opt.step``: zero grads, MSE of ``model(x)`` against ``y``, backward, return it."""
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def nested_quadratic_run(lr: float, steps: int = 200, **kw):
    """A ``NestedOptimizer`` over SGD after ``steps`` steps on f(w) = 0.5 * sum(c_i w_i^2) with
    curvatures 1..4 (the best rate is about 0.4; SGD is unstable above 0.5)."""
    from nestopt.optim import NestedOptimizer

    w = torch.nn.Parameter(torch.ones(4))
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt = NestedOptimizer([w], torch.optim.SGD, lr=lr, features=("grad_norm", "loss"), window=4, period=8, **kw)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (c * w * w).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt


# one factory per optimizer configuration (params -> optimizer), for the tests that every optimizer
# must pass: transactional steps, validated groups, checked state dicts
NESTED_SMALL = dict(window=2, period=4, stats_every=1)

OPTIMIZERS = {
    "polyak": lambda ps: Polyak(ps),
    "polyak-group-momentum": lambda ps: Polyak(ps, scope="group", momentum=0.5, max_lr=0.5),
    "polyak-rms": lambda ps: Polyak(ps, precondition="rms", max_lr=0.1),
    "polyak-adam": lambda ps: PolyakAdam(ps, max_lr=0.05),
    "learned-default": lambda ps: LearnedOptimizer(ps, compile=False),
    "learned-mlp": lambda ps: LearnedOptimizer(ps, net="mlp"),
    "complex-momentum": lambda ps: ComplexMomentum(ps, lr=0.05),
    "complex-adam": lambda ps: ComplexAdam(ps, lr=0.01),
    "hypergradient-sgd": lambda ps: HypergradientSGD(ps, lr=0.05),
    "hypergradient-adam": lambda ps: HypergradientAdam(ps, lr=0.01),
    "nested-hindsight": lambda ps: NestedOptimizer(ps, lr=0.01, features=("grad_norm", "loss", "curvature"), **NESTED_SMALL),
    "nested-proxy": lambda ps: NestedOptimizer(ps, lr=0.01, signal="proxy", **NESTED_SMALL),
    "nested-validation": lambda ps: NestedOptimizer(ps, lr=0.01, signal="validation", **NESTED_SMALL),
    "nested-frozen": lambda ps: NestedOptimizer(ps, torch.optim.SGD, lr=0.01, signal="frozen", **NESTED_SMALL),
}
