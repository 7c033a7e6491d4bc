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


class HostReads:
    """Counts the host reads of the code run inside it: every ``aten._local_scalar_dense`` (what
    ``.item()``, ``float()``, ``int()`` and ``bool()`` of a tensor call, an ``if`` on one too),
    caught by a ``TorchDispatchMode``, plus ``Tensor.tolist()`` and ``Tensor.numpy()`` (and so
    ``np.asarray(t)``), which need no copy on the CPU and never reach the dispatcher. ``where``
    names the line of our code that made each read."""

    def __init__(self) -> None:
        self.where: list[str] = []

    @property
    def n(self) -> int:
        return len(self.where)

    def _note(self, what: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-2] if "nestopt" in f.filename and "/tests/" not in f.filename]
        self.where.append(f"{what} at {frames[-1].filename.split('src/')[-1]}:{frames[-1].lineno}" if frames else what)

    def __enter__(self) -> "HostReads":
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer._note("item")
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._saved = (torch.Tensor.tolist, torch.Tensor.numpy)
        tolist, numpy = self._saved

        def _tolist(t, *a, **k):
            outer._note("tolist")
            return tolist(t, *a, **k)

        def _numpy(t, *a, **k):
            outer._note("numpy")
            return numpy(t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.numpy = _tolist, _numpy
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
