"""Hypergradients through the implicit function theorem.

At a minimum ``w*`` of the training loss ``L_T(w, lam)`` the gradient vanishes, so the best-response
Jacobian is ``dw*/dlam = -H^{-1} d2L_T/dw dlam`` with ``H = d2L_T/dw2``. The hypergradient of a
validation loss ``L_V(w*(lam), lam)`` is then

    dL_V/dlam = dL_V/dlam (direct) - (d2L_T/dlam dw) H^{-1} dL_V/dw (implicit).

:func:`implicit_hypergradient` solves ``(H + damping I) x = dL_V/dw`` with a pluggable solver (conjugate
gradient, a truncated Neumann series, a dense solve for small problems, or a user's callable with the
contract of :mod:`nestopt.hyper.solvers`) using Hessian-vector products from autograd or ``torch.func``:
the gradient's graph is built once and every solver iteration is one backward pass through it, so memory
does not grow with the iteration count. It checks the solve and raises
:class:`HypergradientError` on negative curvature, divergence or a residual above ``max_residual`` instead
of returning a silently wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jacrev, vjp

from .._checks import check_callable, check_int, check_number
from . import _tree as T
from .solvers import (SOLVER_FUNCTIONS, SOLVERS, HypergradientError, Solver, SolveInfo, _as_float, call_solver,
                      conjugate_gradient, dense_solve, matrix_from_matvec, neumann, resolve_solver)

__all__ = ["SOLVERS", "SOLVER_FUNCTIONS", "HypergradientError", "SolveInfo", "conjugate_gradient", "dense_solve",
           "implicit_hypergradient", "neumann"]

_DEFAULT_MAX_RESIDUAL = {"cg": 0.1, "dense": 1e-6, "neumann": 1.0}


def implicit_hypergradient(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    solver: str | Solver = "cg",
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
        solver: ``"cg"`` (:func:`~nestopt.hyper.solvers.conjugate_gradient`), ``"neumann"`` (truncated
            Neumann series ``alpha * sum_k (I - alpha H)^k b``) or ``"dense"`` (materialises the Hessian;
            small problems), or a callable ``solve(matvec, b, **opts) -> (x, info)``: ``matvec(v)`` is
            ``(H + damping I) v``, the Hessian-vector product of ``inner_loss`` w.r.t. ``params``, ``b`` is
            ``dL_V/dw`` (both lists of tensors shaped like the leaves of ``params``), ``opts`` the options
            below that its signature names (``iters``, ``tol``, ``alpha``, ``init``, ``check``) and ``info``
            a :class:`SolveInfo` or dict of its fields (see :mod:`nestopt.hyper.solvers`).
        iters: solver iterations (Hessian-vector products); ignored by ``dense``.
        damping: adds ``damping * I`` to the Hessian (Tikhonov); makes an indefinite or singular
            Hessian solvable at the cost of bias.
        alpha: Neumann step; ``None`` estimates ``1 / lambda_max`` with 20 power iterations (20 extra
            Hessian-vector products). The series converges when ``0 < alpha * lambda_max < 2`` and H is
            positive definite.
        tol: CG stops early when the relative residual falls below ``tol`` (0: run all ``iters``; a
            positive ``tol`` reads the residual on the host every iteration).
        max_residual: raise :class:`HypergradientError` when the final relative residual is above this.
            Default: 0.1 for CG and a user's solver, 1e-6 for dense, 1.0 for Neumann (a truncated series
            is a deliberate approximation, so only a series that does not contract is an error).
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
    check_callable("inner_loss", inner_loss, "a function inner_loss(params, hparams) -> scalar Tensor")
    check_callable("outer_loss", outer_loss, "a function outer_loss(params, hparams) -> scalar Tensor")
    name, solve = resolve_solver(solver)
    check_int("iters", iters, lo=1)
    damping = check_number("damping", damping, lo=0.0)
    tol = check_number("tol", tol, lo=0.0)
    if alpha is not None:
        alpha = check_number("alpha", alpha, lo=0.0, lo_open=True)
    if max_residual is None:
        max_residual = _DEFAULT_MAX_RESIDUAL.get(name, 0.1)
    else:
        max_residual = check_number("max_residual", max_residual, lo=0.0, lo_open=True)
    if name == "cg" and tol > 0 and not check:
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
    if name == "dense" or under_transform:
        ops = _FuncOps(inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping)
    else:
        ops = _AutogradOps(inner_loss, outer_loss, w, w_spec, lam, lam_spec, damping)
    v_w, direct = ops.outer_grads()

    opts = {"iters": iters, "tol": tol, "alpha": alpha, "init": x0, "check": check}
    x, info = call_solver(solve, ops, v_w, opts)
    if name is None:  # a user's solver: hold it to its contract
        x, info = _user_result(solve, ops, v_w, x, info, check)
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

    __call__ = hvp

    def matrix(self) -> torch.Tensor:
        return matrix_from_matvec(self.hvp, self.w)

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

    __call__ = hvp

    def matrix(self) -> torch.Tensor:
        """``H + damping I``, symmetrised, over the flattened parameters (one ``jacrev``)."""
        h = self.hessian()
        h = 0.5 * (h + h.transpose(-1, -2))
        if self.damping:
            h = h + self.damping * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
        return h

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
    name = {"cg": "conjugate gradient", "neumann": "Neumann series", "dense": "dense solve"}.get(
        info.solver, f"solver {info.solver!r}")
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


def _user_result(solve: Solver, matvec: Callable[[list], list], b: list, x: Any, info: Any, check: bool
                 ) -> tuple[list, SolveInfo]:
    """A user's solver's ``(x, info)`` checked against the contract; ``info`` as a :class:`SolveInfo`,
    with the residual computed (one matvec) when checking and the solver left it out."""
    who = getattr(solve, "__name__", type(solve).__name__)
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)) or len(x) != len(b) or any(
            not isinstance(t, torch.Tensor) or t.shape != r.shape for t, r in zip(x, b)):
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x] \
            if isinstance(x, (list, tuple)) else type(x).__name__
        raise ValueError(f"solver {who} must return x as a list of tensors shaped like b "
                         f"{[tuple(t.shape) for t in b]}; got {got}")
    x = list(x)
    if isinstance(info, dict):
        info = SolveInfo(**{"solver": who, "iterations": 0, "residual": None, "min_curvature": None, "alpha": None,
                            "solution": None, **info})
    elif not isinstance(info, SolveInfo):
        raise ValueError(f"solver {who} must return (x, info) with info a SolveInfo or a dict of its fields; "
                         f"got {type(info).__name__}")
    if check and info.residual is None:
        r = T.sub(b, matvec(x))
        bn = _as_float(torch.sqrt(T.dot(b, b)), "residual")
        info.residual = 0.0 if bn == 0 else _as_float(torch.sqrt(T.dot(r, r)), "residual") / bn
    return x, info
