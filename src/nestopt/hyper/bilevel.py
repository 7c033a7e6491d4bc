"""A bilevel training loop: inner training steps, then a hyperparameter step, repeated."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._checks import check_callable, check_choice, check_int
from . import _tree as T
from .implicit import HypergradientError, implicit_hypergradient
from .solvers import Solver, resolve_solver
from .unrolled import unrolled_hypergradient

METHODS = ("implicit", "unrolled")
HORIZONS = ("continue", "retrain")
_SOLVER_KEYS = ("solver", "iters", "damping", "alpha", "tol", "max_residual", "check")
_UNROLL_KEYS = ("lr", "momentum", "truncate", "batches")


class _InnerDiverged(HypergradientError):
    """The implicit method's inner training produced a non-finite loss or weights."""


def _options(name: str, given: Any, allowed: tuple[str, ...], owned: str) -> dict:
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise TypeError(f"{name}={given!r} is invalid: expected a dict of options ({', '.join(allowed)})")
    bad = [k for k in given if k not in allowed]
    if bad:
        raise ValueError(f"{name}={dict(given)!r} is invalid: {', '.join(map(repr, bad))} "
                         f"{'is' if len(bad) == 1 else 'are'} not an option; allowed: {', '.join(allowed)} "
                         f"({owned})")
    return dict(given)


def _factory(name: str, factory: Any, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    opt = factory(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"{name} returned {type(opt).__name__}: expected a torch.optim.Optimizer over the tensors "
                        "it was given")
    return opt


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
        on_error: what a :class:`HypergradientError` (negative curvature, failed solve, a diverged inner
            loop) does: ``"raise"`` it, or ``"skip"`` the hyperparameter update and record the reason in
            :attr:`history`.

    Non-finite values never corrupt the state: an inner loop that diverges (a non-finite inner loss or
    weights, checked once per :meth:`step` on the host) leaves the weights, the inner optimizer and the
    hyperparameters exactly as they were before that :meth:`step`, and raises (or, with
    ``on_error="skip"``, records a skipped step). Any exception inside :meth:`step` leaves them so too.
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
        check_callable("inner_loss", inner_loss, "a function inner_loss(params, hparams) -> scalar Tensor")
        check_callable("outer_loss", outer_loss, "a function outer_loss(params, hparams) -> scalar Tensor")
        if hyper_optimizer is not None:
            check_callable("hyper_optimizer", hyper_optimizer, "a factory list_of_tensors -> torch.optim.Optimizer")
        if inner_optimizer is not None:
            check_callable("inner_optimizer", inner_optimizer, "a factory list_of_tensors -> torch.optim.Optimizer")
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        w0, self._w_spec = T.flatten(init_params, "init_params")
        lam0, self._lam_spec = T.flatten(hparams, "hparams")
        self._w0 = [t.detach().clone() for t in w0]
        self._w = [t.detach().clone().requires_grad_(True) for t in w0]
        self._lam = [t.detach().clone().requires_grad_(True) for t in lam0]
        hyper_optimizer = hyper_optimizer or (lambda p: torch.optim.Adam(p, lr=0.05))
        self._inner_factory = inner_optimizer or (lambda p: torch.optim.Adam(p, lr=1e-2))
        self.hyper_opt = _factory("hyper_optimizer", hyper_optimizer, self._lam)
        self.inner_opt = _factory("inner_optimizer", self._inner_factory, self._w) if method == "implicit" else None
        self.solver_kwargs = _options("solver_kwargs", solver_kwargs, _SOLVER_KEYS,
                                      "init and return_info are Bilevel's own")
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
        self.unroll_kwargs = _options("unroll_kwargs", unroll_kwargs, _UNROLL_KEYS,
                                      "steps is inner_steps; return_info is Bilevel's own")
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
            self.inner_opt = _factory("inner_optimizer", self._inner_factory, self._w)
        lam = self.hparams
        losses = []
        for _ in range(self.inner_steps):
            self.inner_opt.zero_grad(set_to_none=True)
            loss = self.inner_loss(T.unflatten(self._w, self._w_spec), lam)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"inner_loss must return a scalar Tensor; got {got}")
            loss.backward()
            self.inner_opt.step()
            losses.append(loss.detach().reshape(()))
        # one host read for the whole inner loop: every loss and the weights it ends at
        flags = torch.stack([torch.stack(losses).isfinite().all(), *(w.detach().isfinite().all() for w in self._w)])
        if not bool(flags.all()):
            per_step = torch.stack(losses).isfinite().tolist()
            k = per_step.index(False) if not all(per_step) else len(per_step)
            what = (f"the inner loss is {float(losses[k]):g} at inner step {k}" if k < len(per_step)
                    else "the weights are not finite after the last inner step")
            lr = self.inner_opt.param_groups[0].get("lr")
            raise _InnerDiverged(
                f"Bilevel.step: the inner training diverged at inner step {k} of {self.inner_steps} "
                f"(inner_optimizer lr={lr!r}): {what}; the weights, the inner optimizer and the hyperparameters "
                "are left as they were before this step. Lower the inner learning rate or inner_steps.")

    def _snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"w": [w.detach().clone() for w in self._w],
                                "lam": [t.detach().clone() for t in self._lam],
                                "inner_opt": self.inner_opt, "solution": self._solution}
        if self.inner_opt is not None and self.horizon == "continue":  # it steps in place: copy its state
            snap["inner_state"] = copy.deepcopy(self.inner_opt.state_dict())
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        with torch.no_grad():
            for w, s in zip(self._w, snap["w"]):
                w.copy_(s)
            for t, s in zip(self._lam, snap["lam"]):
                t.copy_(s)
        self.inner_opt, self._solution = snap["inner_opt"], snap["solution"]
        if "inner_state" in snap:
            self.inner_opt.load_state_dict(snap["inner_state"])

    def _skip(self, outer: float, exc: HypergradientError) -> dict[str, float]:
        self._solution = None
        record = {"outer_loss": outer, "hypergrad_norm": math.nan, "skipped": 1.0, "error": str(exc)}
        self.history.append(record)
        return record

    def step(self) -> dict[str, float]:
        """Inner training, one hypergradient, one hyperparameter update; returns what it measured.

        An exception leaves the weights, the inner optimizer and the hyperparameters as they were."""
        snap = self._snapshot()
        try:
            return self._step(snap)
        except BaseException:
            self._restore(snap)
            raise

    def _step(self, snap: dict[str, Any]) -> dict[str, float]:
        if self.method == "implicit":
            try:
                self._train_inner()
            except _InnerDiverged as exc:
                if self.on_error == "raise":
                    raise
                self._restore(snap)
                return self._skip(math.nan, exc)
            init = self._solution if self.horizon == "continue" else None
            outer = float(self.outer_loss(self.params, self.hparams))
            try:
                hg, info = implicit_hypergradient(self.inner_loss, self.outer_loss, self.params, self.hparams,
                                                  init=init, return_info=True, **self.solver_kwargs)
            except HypergradientError as exc:
                if self.on_error == "raise":
                    raise
                return self._skip(outer, exc)
            self._solution = info.solution
        else:
            start = self._w0 if self.horizon == "retrain" else [t.detach() for t in self._w]
            try:
                hg, info = unrolled_hypergradient(self.inner_loss, self.outer_loss,
                                                  T.unflatten(start, self._w_spec), self.hparams,
                                                  steps=self.inner_steps, return_info=True, **self.unroll_kwargs)
            except HypergradientError as exc:  # a diverged unroll: the weights were not touched
                if self.on_error == "raise":
                    raise
                return self._skip(math.nan, exc)
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
