"""Hypergradients through the implicit function theorem.

At a minimum ``w*`` of the training loss ``L_T(w, lam)`` the gradient vanishes, so the best-response
Jacobian is ``dw*/dlam = -H^{-1} d2L_T/dw dlam`` with ``H = d2L_T/dw2``. The hypergradient of a
validation loss ``L_V(w*(lam), lam)`` is then

    dL_V/dlam = dL_V/dlam (direct) - (d2L_T/dlam dw) H^{-1} dL_V/dw (implicit).

:func:`implicit_hypergradient` solves ``(H + damping I) x = dL_V/dw`` with a pluggable solver (conjugate
gradient, a truncated Neumann series, or a dense solve for small problems) using Hessian-vector products
from ``torch.func``: the gradient's graph is built once and every solver iteration is one backward pass
through it, so memory does not grow with the iteration count. It checks the solve and raises
:class:`HypergradientError` on negative curvature, divergence or a residual above ``max_residual`` instead
of returning a silently wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, jacrev, vjp

from .._checks import check_choice, check_int, check_number
from . import _tree as T

SOLVERS = ("cg", "neumann", "dense")
_DEFAULT_MAX_RESIDUAL = {"cg": 0.1, "dense": 1e-6, "neumann": 1.0}


class HypergradientError(RuntimeError):
    """A linear solve that cannot be trusted: negative curvature, divergence, or no convergence."""


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


def _as_float(x: torch.Tensor, what: str) -> float:
    try:
        return float(x.item())
    except RuntimeError as exc:  # a BatchedTensor under torch.func.vmap cannot be read on the host
        raise HypergradientError(
            f"cannot check the solve ({what}) inside torch.func.vmap: the checks read values on the host. "
            "Pass check=False (and tol=0) to vmap implicit_hypergradient, then check the results outside."
        ) from exc


def implicit_hypergradient(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    solver: str = "cg",
    iters: int = 20,
    damping: float = 0.0,
    alpha: float | None = None,
    tol: float = 0.0,
    max_residual: float | None = None,
    init: Any = None,
    check: bool = True,
    return_info: bool = False,
) -> Any:
    """The hypergradient ``dL_V(w*(lam), lam)/dlam`` at approximately optimal weights ``params``.

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar`` training loss; ``params`` is minimised.
        outer_loss: ``outer_loss(params, hparams) -> scalar`` validation loss.
        params: the trained weights (a Tensor or a dict/list/tuple of Tensors), near a minimum of
            ``inner_loss``. Use ``dict(model.named_parameters())`` with ``torch.func.functional_call``.
        hparams: hyperparameters of any shape: a 0-dim scalar, one per weight, an image, the
            parameters of a network (same container rules as ``params``).
        solver: ``"cg"`` (conjugate gradient), ``"neumann"`` (truncated Neumann series
            ``alpha * sum_k (I - alpha H)^k b``) or ``"dense"`` (materialises the Hessian; small problems).
        iters: solver iterations (Hessian-vector products); ignored by ``dense``.
        damping: adds ``damping * I`` to the Hessian (Tikhonov); makes an indefinite or singular
            Hessian solvable at the cost of bias.
        alpha: Neumann step; ``None`` estimates ``1 / lambda_max`` with 20 power iterations (20 extra
            Hessian-vector products). The series converges when ``0 < alpha * lambda_max < 2`` and H is
            positive definite.
        tol: CG stops early when the relative residual falls below ``tol`` (0: run all ``iters``; a
            positive ``tol`` reads the residual on the host every iteration).
        max_residual: raise :class:`HypergradientError` when the final relative residual is above this.
            Default: 0.1 for CG, 1e-6 for dense, 1.0 for Neumann (a truncated series is a deliberate
            approximation, so only a series that does not contract is an error).
        init: initial guess for CG, e.g. ``info.solution`` of the previous hyperparameter step.
        check: run the checks (one host synchronisation at the end). ``False`` is required under
            ``torch.func.vmap``: the function composes with ``vmap`` over ``hparams`` or ``params``
            with ``check=False`` and ``tol=0``.
        return_info: also return a :class:`SolveInfo`.

    Returns:
        The hypergradient, same structure as ``hparams`` (or ``(hypergradient, info)``).

    Raises:
        HypergradientError: negative curvature along a solver direction, a diverging or non-finite
            solve, or a final residual above ``max_residual``.
    """
    check_choice("solver", solver, SOLVERS)
    check_int("iters", iters, lo=1)
    damping = check_number("damping", damping, lo=0.0)
    tol = check_number("tol", tol, lo=0.0)
    if alpha is not None:
        alpha = check_number("alpha", alpha, lo=0.0, lo_open=True)
    if max_residual is None:
        max_residual = _DEFAULT_MAX_RESIDUAL[solver]
    else:
        max_residual = check_number("max_residual", max_residual, lo=0.0, lo_open=True)
    if solver == "cg" and tol > 0 and not check:
        raise ValueError(f"tol={tol!r} is invalid with check=False: early stopping reads the residual; use tol=0")
    w, w_spec = T.flatten(params, "params")
    lam, lam_spec = T.flatten(hparams, "hparams")
    x0 = None
    if init is not None:
        x0, _ = T.flatten(init, "init")
        if [t.shape for t in x0] != [t.shape for t in w]:
            raise ValueError("init must have the structure and shapes of params (pass info.solution of a previous call)")
        x0 = [t.detach() for t in x0]

    under_transform = torch._C._functorch.maybe_current_level() is not None
    if solver == "dense" or under_transform:
        ops = _FuncOps(inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping)
    else:
        ops = _AutogradOps(inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping)
    v_w, direct = ops.outer_grads()

    if solver == "cg" and not under_transform and v_w[0].device.type == "cpu":
        x, info = _cg_host(ops.hvp, v_w, iters, tol, x0, check)
    elif solver == "cg":
        x, info = _cg(ops.hvp, v_w, iters, tol, x0, check)
    elif solver == "neumann":
        x, info = _neumann(ops.hvp, v_w, iters, alpha, check)
    else:
        x, info = _dense(ops, v_w, damping, check)
    info.solution = T.unflatten(x, w_spec)

    if check:
        _check(info, max_residual, damping)

    hypergrad = T.sub(direct, ops.cross(x))
    hypergrad = T.unflatten(hypergrad, lam_spec)
    return (hypergrad, info) if return_info else hypergrad


class _AutogradOps:
    """Plain autograd: one graph of the training gradient serves every Hessian-vector product and the
    final mixed product (the engine prunes the hyperparameter branch from the HVPs)."""

    def __init__(self, inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping):
        self.w = [t.detach().requires_grad_(True) for t in w]
        self.lam = [t.detach().requires_grad_(True) for t in lam]
        self.damping = damping
        self.trees = (T.unflatten(self.w, w_spec), T.unflatten(self.lam, lam_spec))
        self.outer_loss = outer_loss
        with torch.enable_grad():
            loss = inner_loss(*self.trees)
            _scalar(loss, "inner_loss")
            self.g = torch.autograd.grad(loss, self.w, create_graph=True, allow_unused=True, materialize_grads=True)

    def outer_grads(self) -> tuple[list, list]:
        with torch.enable_grad():
            loss = self.outer_loss(*self.trees)
            _scalar(loss, "outer_loss")
            grads = torch.autograd.grad(loss, self.w + self.lam, allow_unused=True, materialize_grads=True)
        n = len(self.w)
        return [t.detach() for t in grads[:n]], [t.detach() for t in grads[n:]]

    def hvp(self, v: list) -> list:
        hv = list(torch.autograd.grad(self.g, self.w, v, retain_graph=True, allow_unused=True, materialize_grads=True))
        if self.damping:
            torch._foreach_add_(hv, v, alpha=self.damping)  # hv is freshly allocated: add in place
        return hv

    def cross(self, x: list) -> list:
        if not any(t.requires_grad for t in self.g):
            return [torch.zeros_like(t) for t in self.lam]
        out = torch.autograd.grad(self.g, self.lam, x, allow_unused=True, materialize_grads=True)
        self.g = None  # release the graph
        return [t.detach() for t in out]


class _FuncOps:
    """``torch.func`` transforms: used under ``vmap`` (plain autograd cannot run there) and for dense."""

    def __init__(self, inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping):
        self.w, self.lam, self.damping = [t.detach() for t in w], [t.detach() for t in lam], damping
        self.w_spec, self.lam_spec = w_spec, lam_spec

        def grad_flat(wv: list, lv: list) -> list:
            return T.flatten(grad(inner_loss)(T.unflatten(wv, w_spec), T.unflatten(lv, lam_spec)), "params")[0]

        def outer_flat(wv: list, lv: list) -> torch.Tensor:
            return _scalar(outer_loss(T.unflatten(wv, w_spec), T.unflatten(lv, lam_spec)), "outer_loss")

        self.grad_flat, self.outer_flat = grad_flat, outer_flat
        _, self._hvp = vjp(lambda wv: grad_flat(wv, self.lam), self.w)

    def outer_grads(self) -> tuple[list, list]:
        gw, gl = grad(self.outer_flat, argnums=(0, 1))(self.w, self.lam)
        return list(gw), list(gl)

    def hvp(self, v: list) -> list:
        hv = list(self._hvp(list(v))[0])
        return T.axpy(self.damping, v, hv) if self.damping else hv

    def cross(self, x: list) -> list:
        _, fn = vjp(lambda lv: self.grad_flat(self.w, lv), self.lam)
        return list(fn(list(x))[0])

    def hessian(self) -> torch.Tensor:
        w = self.w

        def flat_grad(vec: torch.Tensor) -> torch.Tensor:
            return T.flat_cat(self.grad_flat(T.split_like(vec, w), self.lam))

        return jacrev(flat_grad)(T.flat_cat(w))


def _scalar(loss: Any, name: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name} must return a scalar Tensor; got {shape}")
    return loss.reshape(())


def _check(info: SolveInfo, max_residual: float, damping: float) -> None:
    name = {"cg": "conjugate gradient", "neumann": "Neumann series", "dense": "dense solve"}[info.solver]
    if info.min_curvature is not None and not info.min_curvature > 0:
        raise HypergradientError(
            f"{name}: the Hessian (+ damping={damping}) is not positive definite along the solve: curvature "
            f"{info.min_curvature:.3g} <= 0. The weights are not at a minimum, or the loss is non-convex "
            "there: train the inner problem further or pass a larger damping.")
    if info.residual is None or not math.isfinite(info.residual):
        raise HypergradientError(f"{name}: the solve produced non-finite values (residual {info.residual})")
    if info.residual > max_residual:
        hint = ("the series does not contract: lower alpha (it needs alpha * lambda_max < 2)"
                if info.solver == "neumann" else "raise iters or add damping")
        raise HypergradientError(
            f"{name} did not converge: relative residual {info.residual:.3g} after {info.iterations} "
            f"iterations is above max_residual={max_residual:g}; {hint}, or pass a larger max_residual.")


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


def _dense(ops: _FuncOps, b: list, damping: float, check: bool) -> tuple[list, SolveInfo]:
    h = ops.hessian()
    h = 0.5 * (h + h.transpose(-1, -2))
    if damping:
        h = h + damping * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
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
