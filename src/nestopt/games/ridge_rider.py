r"""Ridge Rider (Parker-Holder et al., 2020): diverse solutions by following Hessian eigenvectors.

From a saddle ``x0`` (a stationary point with negative curvature) each eigenvector ``e`` of the
Hessian with a negative eigenvalue, in either sign, starts a *ridge*: step ``x <- x + step * e``,
then replace ``e`` by the new Hessian's eigenvector most aligned with it, until the curvature
along ``e`` turns non-negative (the ridge ends) or ``max_ridge`` steps pass. At the end of a
ridge, any remaining negative-curvature directions branch again (depth-first); where none remain,
gradient descent finishes the descent and the point is a solution. Symmetric problems have many
equivalent solutions that all ridges reach systematically, where random restarts keep finding
the same basins.

Compute is counted in gradient evaluations: a gradient is 1, a full Hessian of ``d`` parameters
``2 d`` (``d`` Hessian-vector products of two gradient evaluations each), so Ridge Rider and
random restarts are compared at equal cost (:func:`random_restarts`).

Example::

    >>> import torch
    >>> f = SymmetricWells(dim=3, coupling=0.0)
    >>> out = ridge_rider(f, torch.zeros(3, dtype=torch.float64), budget=5_000)
    >>> len(distinct(out["solutions"]))  # all 2^3 wells
    8
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_int, check_number, check_seed

Loss = Callable[[torch.Tensor], torch.Tensor]


class SymmetricWells:
    """``f(x) = sum_i w_i (x_i^2 - 1)^2 + c (sum_i x_i)^2``: ``2^d`` wells at the sign patterns
    ``x_i = +-1`` when ``c = 0``; the coupling ``c`` penalises unbalanced signs, which makes the
    balanced wells' basins larger (random restarts favour them) and removes the most unbalanced
    ones when ``c`` is large. Weights ``w_i = 1 + 0.1 i`` break the eigenvalue ties at the saddle
    ``x = 0``. Symmetric under ``x -> -x``."""

    def __init__(self, dim: int = 4, coupling: float = 0.1) -> None:
        self.dim = check_int("dim", dim, lo=1)
        self.coupling = check_number("coupling", coupling, lo=0.0)
        self.w = 1.0 + 0.1 * torch.arange(dim, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * (x * x - 1) ** 2).sum() + self.coupling * x.sum() ** 2


class _Counter:
    def __init__(self, f: Loss) -> None:
        self.f, self.evals = f, 0

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        self.evals += 1
        return torch.func.grad(self.f)(x)

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        self.evals += 2 * x.numel()
        return torch.func.hessian(self.f)(x)


def _descend(c: _Counter, x: torch.Tensor, lr: float, tol: float, max_steps: int, budget: int) -> torch.Tensor | None:
    for _ in range(max_steps):
        if c.evals >= budget:
            return None
        g = c.grad(x)
        if float(g.norm()) < tol:
            return x
        x = x - lr * g
    return x


def _start(x0: Any) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() != 1:
        what = (f"a {x0.dtype} tensor of shape {tuple(x0.shape)}" if isinstance(x0, torch.Tensor)
                else type(x0).__name__)
        raise TypeError(f"x0={what} is invalid: expected a 1-D floating-point tensor (the saddle to start from)")


def _descent_args(lr: float, tol: float, max_descent: int) -> None:
    check_number("lr", lr, lo=0.0, lo_open=True)
    check_number("tol", tol, lo=0.0)
    check_int("max_descent", max_descent, lo=1)


def ridge_rider(f: Loss, x0: torch.Tensor, *, budget: int, step: float = 0.05, max_ridge: int = 100,
                lr: float = 0.02, tol: float = 1e-6, max_descent: int = 2000, max_depth: int = 8,
                merge: float | None = None) -> dict[str, Any]:
    """Follow ridges from the saddle ``x0`` until ``budget`` gradient evaluations are spent.

    ``merge``: a ridge end within this distance of one already branched from is not branched
    again (different orders of ridges often reach the same point; default ``step``; 0 turns it
    off). Returns ``{"solutions": [points], "evals": int, "ridges": int, "merged": int}``."""
    check_int("budget", budget, lo=1)
    check_number("step", step, lo=0.0, lo_open=True)
    _start(x0)
    check_int("max_ridge", max_ridge, lo=1)
    check_int("max_depth", max_depth, lo=0)
    _descent_args(lr, tol, max_descent)
    if merge is not None:
        check_number("merge", merge, lo=0.0)
    c = _Counter(f)
    solutions: list[torch.Tensor] = []
    stack: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    ridges = merged = 0
    radius = step if merge is None else merge
    visited: list[torch.Tensor] = []

    def branch(x: torch.Tensor, depth: int) -> None:
        nonlocal merged
        if radius > 0 and any(float((x - v).norm()) <= radius for v in visited):
            merged += 1
            return
        visited.append(x)
        vals, vecs = torch.linalg.eigh(c.hessian(x))
        neg = [i for i in range(len(vals)) if float(vals[i]) < 0]
        if not neg or depth >= max_depth:
            sol = _descend(c, x, lr, tol, max_descent, budget)
            if sol is not None:
                solutions.append(sol)
            return
        for i in reversed(neg):  # most negative explored first (popped last-in first-out)
            for sign in (1.0, -1.0):
                stack.append((x, sign * vecs[:, i], depth))

    branch(x0, 0)
    while stack and c.evals < budget:
        x, e, depth = stack.pop()
        ridges += 1
        for _ in range(max_ridge):
            if c.evals >= budget:
                break
            x = x + step * e
            vals, vecs = torch.linalg.eigh(c.hessian(x))
            k = int((vecs.T @ e).abs().argmax())
            e = vecs[:, k] * torch.sign(vecs[:, k] @ e)
            if float(vals[k]) >= 0:  # the ridge ends where its curvature turns non-negative
                break
        if c.evals < budget:
            branch(x, depth + 1)
    return {"solutions": solutions, "evals": c.evals, "ridges": ridges, "merged": merged}


def random_restarts(f: Loss, dim: int, *, budget: int, scale: float = 1.0, seed: int = 0, lr: float = 0.02,
                    tol: float = 1e-6, max_descent: int = 2000, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """Gradient descent from ``N(0, scale^2 I)`` starts until ``budget`` gradient evaluations are spent."""
    check_int("budget", budget, lo=1)
    check_int("dim", dim, lo=1)
    check_number("scale", scale, lo=0.0)
    check_seed("seed", seed)
    _descent_args(lr, tol, max_descent)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is invalid: expected a floating-point torch.dtype")
    c = _Counter(f)
    gen = torch.Generator().manual_seed(seed)
    solutions: list[torch.Tensor] = []
    runs = 0
    while c.evals < budget:
        x = scale * torch.randn(dim, generator=gen, dtype=dtype)
        sol = _descend(c, x, lr, tol, max_descent, budget)
        runs += 1
        if sol is not None:
            solutions.append(sol)
    return {"solutions": solutions, "evals": c.evals, "runs": runs}


def distinct(points: list[torch.Tensor], tol: float = 1e-3) -> list[torch.Tensor]:
    """Points more than ``tol`` apart (greedy clustering)."""
    out: list[torch.Tensor] = []
    for p in points:
        if all(float((p - q).norm()) > tol for q in out):
            out.append(p)
    return out
