"""A bilevel training loop: inner training steps, then a hyperparameter step, repeated."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_choice, check_int
from . import _tree as T
from .implicit import HypergradientError, implicit_hypergradient
from .solvers import Solver, resolve_solver
from .unrolled import unrolled_hypergradient

METHODS = ("implicit", "unrolled")
HORIZONS = ("continue", "retrain")


class Bilevel:
    """Alternate ``inner_steps`` of training with one hyperparameter step.

    The inner horizon is explicit, because a hypergradient only answers the question for the training
    procedure it differentiates:

    - ``horizon="retrain"``: every hyperparameter step trains from ``init_params`` for ``inner_steps``
      steps, exactly how a final model is trained from scratch with the hyperparameters found. With
      ``method="unrolled"`` the hypergradient is then exact for that procedure (plain or momentum SGD).
    - ``horizon="continue"``: the weights carry over (warm start) and train ``inner_steps`` more each
      hyperparameter step; cheaper, but the hyperparameters are tuned for a model that keeps training.

    ``method="implicit"`` trains the inner problem with ``inner_optimizer`` (any torch optimizer) and
    takes :func:`implicit_hypergradient` at the result; the linear solve is warm-started from the
    previous solution when ``horizon="continue"``. ``method="unrolled"`` differentiates through the
    inner steps themselves (SGD with ``inner_lr`` and ``momentum``), see :func:`unrolled_hypergradient`.

    Args:
        inner_loss, outer_loss: ``f(params, hparams) -> scalar`` (params/hparams as given here).
        init_params: initial weights (Tensor or dict/list/tuple of Tensors); copied.
        hparams: initial hyperparameters; copied. Read the current ones from :attr:`hparams`.
        hyper_optimizer: ``factory(list_of_tensors) -> torch.optim.Optimizer`` for the hyperparameters.
        inner_optimizer: ``factory(list_of_tensors) -> torch.optim.Optimizer`` (implicit method only).
        solver: the implicit method's linear solver: a name in :data:`~nestopt.hyper.SOLVERS` or a callable
            ``solve(matvec, b, **opts) -> (x, info)`` (see :func:`implicit_hypergradient`); default
            ``solver_kwargs.get("solver", "cg")``.
        solver_kwargs: passed to :func:`implicit_hypergradient` (``solver``, ``iters``, ``damping``...).
        unroll_kwargs: passed to :func:`unrolled_hypergradient` (``lr``, ``momentum``, ``truncate``).
        on_error: what a :class:`HypergradientError` (negative curvature, failed solve) does: ``"raise"``
            it, or ``"skip"`` the hyperparameter update and record the reason in :attr:`history`.
    """

    def __init__(
        self,
        inner_loss: Callable[[Any, Any], torch.Tensor],
        outer_loss: Callable[[Any, Any], torch.Tensor],
        init_params: Any,
        hparams: Any,
        *,
        method: str = "implicit",
        horizon: str = "continue",
        inner_steps: int = 50,
        hyper_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        inner_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        solver: str | Solver | None = None,
        solver_kwargs: dict | None = None,
        unroll_kwargs: dict | None = None,
        on_error: str = "raise",
    ) -> None:
        self.method = check_choice("method", method, METHODS)
        self.on_error = check_choice("on_error", on_error, ("raise", "skip"))
        self.horizon = check_choice("horizon", horizon, HORIZONS)
        self.inner_steps = check_int("inner_steps", inner_steps, lo=1)
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        w0, self._w_spec = T.flatten(init_params, "init_params")
        lam0, self._lam_spec = T.flatten(hparams, "hparams")
        self._w0 = [t.detach().clone() for t in w0]
        self._w = [t.detach().clone().requires_grad_(True) for t in w0]
        self._lam = [t.detach().clone().requires_grad_(True) for t in lam0]
        hyper_optimizer = hyper_optimizer or (lambda p: torch.optim.Adam(p, lr=0.05))
        self._inner_factory = inner_optimizer or (lambda p: torch.optim.Adam(p, lr=1e-2))
        self.hyper_opt = hyper_optimizer(self._lam)
        self.inner_opt = self._inner_factory(self._w) if method == "implicit" else None
        self.solver_kwargs = dict(solver_kwargs or {})
        if solver is not None:
            if "solver" in self.solver_kwargs:
                raise ValueError(f"solver={solver!r} is given twice: also solver_kwargs['solver']="
                                 f"{self.solver_kwargs['solver']!r}; pass one")
            if method != "implicit":
                raise ValueError(f"solver={solver!r} is invalid with method={method!r}: only the implicit method "
                                 "solves")
            self.solver_kwargs["solver"] = solver
        if method == "implicit" and "solver" in self.solver_kwargs:  # a bad name fails here, not at the first step
            resolve_solver(self.solver_kwargs["solver"])
        self.unroll_kwargs = dict(unroll_kwargs or {})
        self._solution = None
        self.history: list[dict[str, float]] = []

    @property
    def params(self) -> Any:
        return T.unflatten([t.detach() for t in self._w], self._w_spec)

    @property
    def hparams(self) -> Any:
        return T.unflatten([t.detach() for t in self._lam], self._lam_spec)

    def _train_inner(self) -> None:
        if self.horizon == "retrain":
            with torch.no_grad():
                for w, w0 in zip(self._w, self._w0):
                    w.copy_(w0)
            self.inner_opt = self._inner_factory(self._w)
        lam = self.hparams
        for _ in range(self.inner_steps):
            self.inner_opt.zero_grad(set_to_none=True)
            loss = self.inner_loss(T.unflatten(self._w, self._w_spec), lam)
            loss.backward()
            self.inner_opt.step()

    def step(self) -> dict[str, float]:
        """Inner training, one hypergradient, one hyperparameter update; returns what it measured."""
        if self.method == "implicit":
            self._train_inner()
            init = self._solution if self.horizon == "continue" else None
            outer = float(self.outer_loss(self.params, self.hparams))
            try:
                hg, info = implicit_hypergradient(self.inner_loss, self.outer_loss, self.params, self.hparams,
                                                  init=init, return_info=True, **self.solver_kwargs)
            except HypergradientError as exc:
                if self.on_error == "raise":
                    raise
                self._solution = None
                record = {"outer_loss": outer, "hypergrad_norm": math.nan, "skipped": 1.0, "error": str(exc)}
                self.history.append(record)
                return record
            self._solution = info.solution
        else:
            start = self._w0 if self.horizon == "retrain" else [t.detach() for t in self._w]
            hg, info = unrolled_hypergradient(self.inner_loss, self.outer_loss,
                                              T.unflatten(start, self._w_spec), self.hparams,
                                              steps=self.inner_steps, return_info=True, **self.unroll_kwargs)
            with torch.no_grad():
                for w, new in zip(self._w, T.flatten(info.params, "params")[0]):
                    w.copy_(new)
            outer = info.outer_loss
        grads, _ = T.flatten(hg, "hypergradient")
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:  # a non-finite hypergradient never reaches the hyperparameters
            for lam, g in zip(self._lam, grads):
                lam.grad = g.to(lam.dtype)
            self.hyper_opt.step()
            self.hyper_opt.zero_grad(set_to_none=True)
        record = {"outer_loss": outer, "hypergrad_norm": float(torch.sqrt(T.dot(grads, grads))),
                  "skipped": float(not finite)}
        self.history.append(record)
        return record

    def run(self, hyper_steps: int) -> list[dict[str, float]]:
        """``hyper_steps`` calls of :meth:`step`; returns their records."""
        check_int("hyper_steps", hyper_steps, lo=1)
        return [self.step() for _ in range(hyper_steps)]
