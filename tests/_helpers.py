"""Small models, data and closures shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


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
