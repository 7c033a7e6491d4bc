r"""Linear solvers for the implicit hypergradient: ``(H + damping I) x = b``.

A solver is a plain callable ``solve(matvec, b, **opts) -> (x, info)``;
:func:`~nestopt.hyper.implicit_hypergradient` (``solver=``) and :class:`~nestopt.hyper.Bilevel`
(``solver=``) take one of these or its name in :data:`SOLVERS` (``SOLVER_FUNCTIONS`` maps the names):

- :func:`conjugate_gradient` (``"cg"``), :func:`neumann` (``"neumann"``, a truncated Neumann series
  ``alpha * sum_k (I - alpha H)^k b``) and :func:`dense_solve` (``"dense"``, materialises the matrix;
  small problems).

The contract a user's solver follows:

- ``matvec(v) -> list[Tensor]``: the Hessian-vector product of the *inner* (training) loss with
  respect to the inner parameters, plus damping: ``(d2 L_T/dw2 + damping I) v``. ``v`` and the
  result are lists of tensors shaped like the leaves of ``params`` (flattened in pytree order).
  Every call is one backward pass through the training gradient's graph. The built-in operator also
  has ``matvec.damping`` and ``matvec.matrix()`` (the dense, symmetrised ``(n, n)`` matrix of
  ``H + damping I`` over the flattened parameters).
- ``b``: the right-hand side, the gradient of the *outer* (validation) loss with respect to the
  inner parameters, ``dL_V/dw`` (a list like ``v``).
- ``opts``: keyword options; a solver is passed those of ``iters``, ``tol``, ``alpha``, ``init``
  (initial guess, a list like ``b``, or ``None``) and ``check`` (compute the diagnostics; ``False``
  under ``torch.func.vmap``) that its signature names (all of them if it takes ``**opts``).
- returns ``x`` (a list like ``b``, approximately ``(H + damping I)^{-1} b``) and ``info``: a
  :class:`SolveInfo` or a dict of its fields: ``solver`` (a name for messages; default the function's
  name), ``iterations`` (matvecs used), ``residual`` (``||matvec(x) - b|| / ||b||``; ``None`` lets the
  caller compute it with one more matvec when checking), ``min_curvature`` (smallest
  ``v^T matvec(v) / v^T v`` seen, or ``None``; ``<= 0`` is reported as negative curvature) and
  ``alpha`` (``None`` unless meaningful). ``solution`` is filled in by the caller.

Example: a solver that counts its calls and delegates to CG.

>>> import torch
>>> from nestopt.hyper import conjugate_gradient, implicit_hypergradient
>>> calls = []
>>> def counted_cg(matvec, b, iters=20, check=True):
...     calls.append([tuple(t.shape) for t in b])
...     return conjugate_gradient(matvec, b, iters=iters, check=check)
>>> inner = lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # w* = 1 / (1 + lam)
>>> outer = lambda w, lam: 0.5 * ((w - 0.5) ** 2).sum()
>>> lam = torch.tensor(0.5, dtype=torch.float64)
>>> w = torch.full((3,), 1 / 1.5, dtype=torch.float64)
>>> hg = implicit_hypergradient(inner, outer, w, lam, solver=counted_cg)
>>> round(float(hg), 6), calls   # 3 * (1/6) * (-1 / 1.5**2)
(-0.222222, [[(3,)]])
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_int, check_number
from . import _tree as T

Solver = Callable[..., tuple[list[torch.Tensor], Any]]


class HypergradientError(RuntimeError):
    """A hypergradient that cannot be trusted: a linear solve with negative curvature, divergence or no
    convergence, an unrolled or bilevel inner loop that diverged, or a non-finite self-tuning-network loss."""


@dataclass
class SolveInfo:
    """What the linear solve did; ``solution`` can warm-start the next solve (``init=``)."""

    solver: str
    iterations: int
    residual: float | None
    """``||(H + damping I) x - b|| / ||b||`` (``None`` when ``check=False``)."""
    min_curvature: float | None
    """Smallest ``v^T (H + damping I) v / v^T v`` seen along the solver's directions (the smallest
    eigenvalue for ``dense``); negative means the Hessian is not positive definite there."""
    alpha: float | None
    """Neumann step size used (``None`` for the other solvers)."""
    solution: Any


def _rhs(b: Any, init: Any = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """``b`` (and ``init``) as lists of tensors, checked: a solver's right-hand side is a non-empty list of
    tensors (a bare Tensor would be split into its rows) and ``init`` is shaped like it."""
    if isinstance(b, torch.Tensor) or not isinstance(b, list | tuple):
        raise TypeError(f"b={b!r} is invalid: expected a list of tensors (one per parameter leaf)")
    b = list(b)
    if not b:
        raise ValueError("b=[] is invalid: expected a non-empty list of tensors (one per parameter leaf)")
    for i, t in enumerate(b):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"b[{i}]={t!r} is invalid: expected a list of tensors (one per parameter leaf)")
    if init is not None:
        if isinstance(init, torch.Tensor) or not isinstance(init, list | tuple) or len(init) != len(b) or any(
                not isinstance(x, torch.Tensor) or x.shape != t.shape for x, t in zip(init, b)):
            got = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in init] \
                if isinstance(init, list | tuple) else type(init).__name__
            raise ValueError(f"init={got} is invalid: expected a list of tensors shaped like b "
                             f"{[tuple(t.shape) for t in b]}")
        init = list(init)
    return b, init


def _as_float(x: torch.Tensor, what: str) -> float:
    try:
        return float(x.item())
    except RuntimeError as exc:  # a BatchedTensor under torch.func.vmap cannot be read on the host
        raise HypergradientError(
            f"cannot check the solve ({what}) inside torch.func.vmap: the checks read values on the host. "
            "Pass check=False (and tol=0) to vmap implicit_hypergradient, then check the results outside."
        ) from exc


def _cg(hvp, b: list, iters: int, tol: float, x0, check: bool) -> tuple[list, SolveInfo]:
    if x0 is None:
        x = [torch.zeros_like(t) for t in b]
        r = b
    else:
        x = x0
        r = T.sub(b, hvp(x))
    p = r
    rr = T.dot(r, r)
    b_norm = torch.sqrt(T.dot(b, b))
    # Once the residual reaches rounding level the iteration freezes (no host read, so vmap works).
    floor = (torch.finfo(rr.dtype).eps * b_norm) ** 2
    inf = torch.full_like(rr, math.inf)
    zero = torch.zeros_like(rr)
    one = torch.ones_like(rr)
    min_curv = inf
    it = 0
    for it in range(1, iters + 1):
        active = rr > floor
        ap = hvp(p)
        pap = T.dot(p, ap)
        pp = T.dot(p, p)
        min_curv = torch.minimum(min_curv, torch.where(active, pap / torch.where(active, pp, one), inf))
        a = torch.where(active, rr / torch.where(active, pap, one), zero)
        x = T.axpy(a, p, x)
        r = T.axpy(-a, ap, r)
        rr_new = T.dot(r, r)
        if tol > 0 and _as_float(torch.sqrt(rr_new) <= tol * b_norm, "tol"):
            rr = rr_new
            break
        p = T.axpy(torch.where(active, rr_new / torch.where(active, rr, one), zero), p, r)
        rr = rr_new
    info = SolveInfo("cg", it, None, None, None, None)
    if check:
        bn = _as_float(b_norm, "residual")
        info.residual = 0.0 if bn == 0 else _as_float(torch.sqrt(rr), "residual") / bn
        mc = _as_float(min_curv, "curvature")
        info.min_curvature = mc if math.isfinite(mc) else None
    return x, info


def _cg_host(hvp, b: list, iters: int, tol: float, x0, check: bool) -> tuple[list, SolveInfo]:
    """CG with the scalars on the host: on CPU reading them costs nothing, and Python-float step sizes
    let every vector update be one in-place foreach kernel."""
    if x0 is None:
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
    else:
        x = [t.clone() for t in x0]
        r = T.sub(b, hvp(x))
    p = [t.clone() for t in r]
    rr = float(T.dot(r, r))
    b_norm = math.sqrt(float(T.dot(b, b)))
    floor = (torch.finfo(b[0].dtype).eps * b_norm) ** 2
    min_curv = math.inf
    it = 0
    for it in range(1, iters + 1):
        if rr <= floor:
            break
        ap = hvp(p)
        pap = float(T.dot(p, ap))
        if check:
            min_curv = min(min_curv, pap / float(T.dot(p, p)))
        if not pap > 0:
            min_curv = min(min_curv, pap)
            break
        a = rr / pap
        torch._foreach_add_(x, p, alpha=a)
        torch._foreach_add_(r, ap, alpha=-a)
        rr_new = float(T.dot(r, r))
        if tol > 0 and math.sqrt(rr_new) <= tol * b_norm:
            rr = rr_new
            break
        torch._foreach_mul_(p, rr_new / rr)
        torch._foreach_add_(p, r)
        rr = rr_new
    info = SolveInfo("cg", it, None, None, None, None)
    if check:
        info.residual = 0.0 if b_norm == 0 else math.sqrt(rr) / b_norm
        info.min_curvature = min_curv if math.isfinite(min_curv) else None
    return x, info


def _power_lambda_max(hvp, b: list, n: int = 20) -> float:
    v = b
    lam = 0.0
    for _ in range(n):
        v = T.scale(1.0 / torch.sqrt(T.dot(v, v)), v)
        hv = hvp(v)
        lam = _as_float(T.dot(v, hv), "alpha estimate")
        v = hv
    return lam


def _neumann(hvp, b: list, iters: int, alpha: float | None, check: bool) -> tuple[list, SolveInfo]:
    if alpha is None:
        lam = _power_lambda_max(hvp, b)
        if not lam > 0:
            raise HypergradientError(f"Neumann series: the Hessian's dominant eigenvalue is {lam:.3g} <= 0; "
                                     "the weights are not at a minimum. Pass a larger damping.")
        alpha = 1.0 / lam
    # x_K = alpha * sum_{k<K} p_k with p_{k+1} = p_k - alpha H p_k, p_0 = b; the residual b - H x_K is p_K.
    tiny = torch.finfo(b[0].dtype).tiny
    inplace = not T._plain()  # outside torch.func transforms: update owned copies in place
    p = [t.clone() for t in b] if inplace else b
    acc = [t.clone() for t in b] if inplace else b
    min_curv = None
    for k in range(iters):
        hp = hvp(p)
        if check:
            curv = T.dot(p, hp) / torch.clamp(T.dot(p, p), min=tiny)
            min_curv = curv if min_curv is None else torch.minimum(min_curv, curv)
        if inplace:
            torch._foreach_add_(p, hp, alpha=-alpha)
            if k + 1 < iters:
                torch._foreach_add_(acc, p)
        else:
            p = T.axpy(-alpha, hp, p)
            if k + 1 < iters:
                acc = T.add(acc, p)
    if inplace:
        torch._foreach_mul_(acc, alpha)
    x = acc if inplace else T.scale(alpha, acc)
    info = SolveInfo("neumann", iters, None, None, alpha, None)
    if check:
        bn = _as_float(torch.sqrt(T.dot(b, b)), "residual")
        info.residual = 0.0 if bn == 0 else _as_float(torch.sqrt(T.dot(p, p)), "residual") / bn
        info.min_curvature = _as_float(min_curv, "curvature") if bn > 0 else None
    return x, info


def _dense(h: torch.Tensor, b: list, check: bool) -> tuple[list, SolveInfo]:
    bf = T.flat_cat(b)
    info = SolveInfo("dense", 1, None, None, None, None)
    if check:
        info.min_curvature = _as_float(torch.linalg.eigvalsh(h)[0], "curvature")
        if not info.min_curvature > 0:
            return [torch.zeros_like(t) for t in b], info  # _check raises on the curvature
    x = torch.linalg.solve(h, bf)
    if check:
        bn = _as_float(bf.norm(), "residual")
        info.residual = 0.0 if bn == 0 else _as_float((h @ x - bf).norm(), "residual") / bn
    return T.split_like(x, b), info


def matrix_from_matvec(matvec: Callable[[list], list], like: list) -> torch.Tensor:
    """The dense, symmetrised ``(n, n)`` matrix of ``matvec`` over the flattened ``like`` (``n`` matvecs)."""
    n = sum(t.numel() for t in like)
    eye = torch.eye(n, dtype=like[0].dtype, device=like[0].device)
    h = torch.stack([T.flat_cat(matvec(T.split_like(e, like))) for e in eye], dim=-1)
    return 0.5 * (h + h.transpose(-1, -2))


def conjugate_gradient(matvec: Callable[[list], list], b: list, *, iters: int = 20, tol: float = 0.0,
                       init: list | None = None, check: bool = True) -> tuple[list, SolveInfo]:
    """Conjugate gradient on ``matvec(x) = b`` (``"cg"``): ``iters`` matvecs at most, stopping early when
    the relative residual falls below ``tol`` (0: run them all; a positive ``tol`` reads the residual on
    the host every iteration, so it needs ``check``). ``init`` warm-starts it. On CPU outside
    ``torch.func`` transforms the scalars live on the host; elsewhere on the device (no host reads)."""
    check_int("iters", iters, lo=1)
    tol = check_number("tol", tol, lo=0.0)
    if tol > 0 and not check:
        raise ValueError(f"tol={tol!r} is invalid with check=False: early stopping reads the residual; use tol=0")
    b, init = _rhs(b, init)
    if torch._C._functorch.maybe_current_level() is None and b[0].device.type == "cpu":
        return _cg_host(matvec, b, iters, tol, init, check)
    return _cg(matvec, b, iters, tol, init, check)


def neumann(matvec: Callable[[list], list], b: list, *, iters: int = 20, alpha: float | None = None,
            check: bool = True) -> tuple[list, SolveInfo]:
    """A truncated Neumann series ``alpha * sum_{k<iters} (I - alpha matvec)^k b`` (``"neumann"``).
    ``alpha=None`` estimates ``1 / lambda_max`` with 20 power iterations (20 extra matvecs); the series
    converges when ``0 < alpha * lambda_max < 2`` and the matrix is positive definite."""
    check_int("iters", iters, lo=1)
    if alpha is not None:
        alpha = check_number("alpha", alpha, lo=0.0, lo_open=True)
    return _neumann(matvec, _rhs(b)[0], iters, alpha, check)


def dense_solve(matvec: Callable[[list], list], b: list, *, check: bool = True) -> tuple[list, SolveInfo]:
    """A direct solve of the materialised matrix (``"dense"``): ``matvec.matrix()`` when the operator
    has one (the built-in does, in one ``jacrev``), else ``n`` matvecs. With ``check``, the smallest
    eigenvalue is the ``min_curvature``; a matrix that is not positive definite is not solved."""
    b = _rhs(b)[0]
    h = matvec.matrix() if callable(getattr(matvec, "matrix", None)) else matrix_from_matvec(matvec, b)
    return _dense(h, b, check)


SOLVERS = ("cg", "neumann", "dense")
"""The built-in solvers' names."""
SOLVER_FUNCTIONS: dict[str, Solver] = {"cg": conjugate_gradient, "neumann": neumann, "dense": dense_solve}
"""Each name in :data:`SOLVERS` and the function it stands for."""
_NAMES = {fn: name for name, fn in SOLVER_FUNCTIONS.items()}


def resolve_solver(solver: Any, arg: str = "solver") -> tuple[str | None, Solver]:
    """``(built-in name or None, function)`` for a solver name or callable; a ``ValueError`` naming
    ``arg`` and the valid names otherwise."""
    if isinstance(solver, str):
        if solver not in SOLVER_FUNCTIONS:
            raise ValueError(f"{arg}={solver!r} is invalid: expected one of {', '.join(SOLVERS)}")
        return solver, SOLVER_FUNCTIONS[solver]
    if callable(solver) and not isinstance(solver, type):
        return _NAMES.get(solver), solver
    raise ValueError(f"{arg}={solver!r} is invalid: expected one of {', '.join(SOLVERS)}, or a callable "
                     "solve(matvec, b, **opts) -> (x, info)")


@functools.lru_cache(maxsize=256)
def _accepted(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword options ``fn`` names (``None``: it takes ``**opts``, pass them all)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.KEYWORD_ONLY))


def call_solver(fn: Solver, matvec: Callable[[list], list], b: list, opts: dict[str, Any]) -> tuple[list, Any]:
    """``fn(matvec, b, **opts)`` with only the options its signature names."""
    try:
        accepted = _accepted(fn)
    except TypeError:  # an unhashable callable
        accepted = _accepted.__wrapped__(fn)
    if accepted is not None:
        opts = {k: v for k, v in opts.items() if k in accepted}
    return fn(matvec, b, **opts)
