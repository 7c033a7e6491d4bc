"""Analytic tasks: losses with closed-form gradients and known minima.

The model is a :class:`Point`, a module holding one parameter vector ``x``. Each task also
exposes ``f(x)`` and ``grad(x)`` in closed form (for tests and studies), ``start`` (the start
point its source names) and ``f_star`` (the minimum value, 0 for all of these).

- ``quad-scalar``: ``(x - 3)^2`` (Polyak note, experiment 1);
- ``quad-sym``: ``(x - 1)^2 + (y - 2)^2`` from ``(10, 10)`` (experiment 2);
- ``quad-asym``: ``(x - 1)^2 + 100 (y - 2)^2`` from ``(10, 10)`` (experiment 3, c = 100);
- ``quad-cond1e2`` / ``quad-cond1e4``: ``0.5 (x - x*)^T H (x - x*)`` in 20 dimensions with a
  rotated ``H`` whose eigenvalues are log-spaced in ``[1/kappa, 1]``;
- ``rosenbrock``: ``(1 - x)^2 + 100 (y - x^2)^2`` from ``(-1.2, 1)``.

``init(seed)`` draws the start from ``start + spread * N(0, I)`` so that benchmark seeds differ;
``point(values)`` builds the model at an exact point (what the studies use).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_int, check_number, check_seed
from .base import Sampler, Task, generator


def _float_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is invalid: expected a floating-point torch.dtype (torch.float32, ...)")
    return dtype


class Point(nn.Module):
    """A model that is just a trainable vector ``x``."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(values.clone())

    def forward(self) -> torch.Tensor:  # pragma: no cover - analytic tasks read self.x directly
        return self.x


class AnalyticTask(Task):
    """Base for deterministic losses of a vector; batches are ignored (``None``)."""

    kind = "analytic"
    batch_size = 1
    spread = 0.5

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = _float_dtype(dtype)

    # -- closed forms ---------------------------------------------------------------------
    start: tuple[float, ...] = ()
    f_star: float = 0.0

    @abc.abstractmethod
    def f(self, x: torch.Tensor) -> torch.Tensor:
        """The loss at ``x``."""

    @abc.abstractmethod
    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """The gradient at ``x``, in closed form."""

    # -- Task interface ---------------------------------------------------------------------
    def start_tensor(self) -> torch.Tensor:
        return torch.tensor(self.start, dtype=self.dtype)

    def point(self, values: Sequence[float] | torch.Tensor) -> Point:
        try:
            x = torch.as_tensor(values, dtype=self.dtype)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"values={values!r} is invalid: expected {len(self.start)} numbers") from None
        if self.start and tuple(x.shape) != (len(self.start),):
            raise ValueError(f"values={values!r} is invalid: {self.name} is a function of {len(self.start)} "
                             f"numbers; got shape {tuple(x.shape)}")
        return Point(x)

    def init(self, seed: int) -> Point:
        x0 = self.start_tensor()
        noise = torch.randn(x0.shape, generator=generator(seed, stream=1), dtype=torch.float64)
        return Point(x0 + self.spread * noise.to(self.dtype))

    def sampler(self, seed: int) -> Sampler:
        return lambda step: None

    def loss(self, model: nn.Module, batch: object = None) -> torch.Tensor:
        return self.f(model.x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(self.f(model.x))}


class ScalarQuadratic(AnalyticTask):
    name = "quad-scalar"
    description = "(x - 3)^2 from x0 = 10 (Polyak note, experiment 1)"
    default_steps = 100
    start = (10.0,)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - 3.0) ** 2).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * (x - 3.0)


class AxisQuadratic(AnalyticTask):
    """``(x - a)^2 + c (y - b)^2``; ``c = 1`` is the symmetric case, ``c = 100`` the key one."""

    default_steps = 300
    start = (10.0, 10.0)

    def __init__(self, c: float = 100.0, target: tuple[float, float] = (1.0, 2.0),
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype)
        self.c = check_number("c", c, lo=0.0, lo_open=True)
        if (not isinstance(target, tuple | list) or len(target) != 2
                or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in target)):
            raise ValueError(f"target={target!r} is invalid: expected two finite numbers (a, b)")
        self.target = tuple(target)
        self.name = "quad-sym" if self.c == 1.0 else ("quad-asym" if self.c == 100.0 else f"quad-c{self.c:g}")
        self.description = f"(x - {target[0]:g})^2 + {self.c:g} (y - {target[1]:g})^2 from (10, 10)"

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, self.c], dtype=x.dtype)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(self.target, dtype=x.dtype)
        return (self._w(x) * (x - t) ** 2).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(self.target, dtype=x.dtype)
        return 2.0 * self._w(x) * (x - t)


class RotatedQuadratic(AnalyticTask):
    """``0.5 (x - x*)^T H (x - x*)`` with ``H = Q diag(lambda) Q^T``, ``lambda`` log-spaced
    in ``[1/cond, 1]`` and ``Q`` a fixed random rotation (so the axes are not eigenvectors)."""

    default_steps = 500
    spread = 1.0

    def __init__(self, cond: float = 1e2, dim: int = 20, dtype: torch.dtype = torch.float32,
                 structure_seed: int = 1234) -> None:
        super().__init__(dtype)
        self.cond = check_number("cond", cond, lo=1.0)
        self.dim = dim = check_int("dim", dim, lo=1)
        structure_seed = check_seed("structure_seed", structure_seed, lo=None)
        self.name = f"quad-cond1e{round(math.log10(self.cond))}" if self._is_pow10(self.cond) \
            else f"quad-cond{self.cond:g}"
        self.description = f"rotated {dim}-d quadratic, condition number {self.cond:g}"
        g = generator(structure_seed, stream=2)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        lam = torch.logspace(0.0, -math.log10(self.cond), dim, dtype=torch.float64)
        self.H64 = (q * lam) @ q.T
        self.H64 = 0.5 * (self.H64 + self.H64.T)
        self.x_star64 = torch.randn(dim, generator=g, dtype=torch.float64)
        self.start = tuple((self.x_star64 + 3.0 * torch.ones(dim, dtype=torch.float64) / math.sqrt(dim)).tolist())
        self.eigenvalues = lam

    @staticmethod
    def _is_pow10(v: float) -> bool:
        e = math.log10(v)
        return abs(e - round(e)) < 1e-12

    def f(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.x_star64.to(x.dtype)
        return 0.5 * d @ (self.H64.to(x.dtype) @ d)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.H64.to(x.dtype) @ (x - self.x_star64.to(x.dtype))


class Rosenbrock(AnalyticTask):
    name = "rosenbrock"
    description = "(1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1)"
    default_steps = 1000
    start = (-1.2, 1.0)
    spread = 0.1

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        gx = -2.0 * (1.0 - x[0]) - 400.0 * x[0] * (x[1] - x[0] ** 2)
        gy = 200.0 * (x[1] - x[0] ** 2)
        return torch.stack([gx, gy])
