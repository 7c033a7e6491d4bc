"""Hypergradients by differentiating through K steps of a differentiable optimizer update.

Reverse mode through the whole unroll is exact for the training procedure it unrolls (including a
finite horizon: no assumption that the weights converged), at memory linear in the number of steps
kept in the graph. ``truncate=T`` keeps only the last T steps in the graph (the earlier steps run
without a graph), trading bias for memory, as in truncated backpropagation through time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_callable, check_int, check_number
from . import _tree as T
from .solvers import HypergradientError


@dataclass
class UnrollInfo:
    """The weights after the unroll (detached, same structure as ``params``) and the final outer loss."""

    params: Any
    outer_loss: float


def unrolled_hypergradient(
    inner_loss: Callable[..., torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    steps: int,
    lr: float | Callable[[Any], torch.Tensor] = 0.1,
    momentum: float = 0.0,
    truncate: int | None = None,
    batches: Sequence[Any] | Callable[[int], Any] | None = None,
    return_info: bool = False,
) -> Any:
    """``d outer_loss(w_K(lam), lam) / d lam`` where ``w_K`` is ``steps`` steps of SGD (heavy-ball momentum
    optional) on ``inner_loss`` from ``params``.

    Args:
        inner_loss: ``inner_loss(params, hparams)``, or ``inner_loss(params, hparams, batch)`` when
            ``batches`` is given.
        outer_loss: ``outer_loss(params, hparams)``.
        params: initial weights (Tensor or dict/list/tuple of Tensors); not modified.
        hparams: hyperparameters (same container rules); anything ``inner_loss``, ``outer_loss`` or a
            callable ``lr`` reads from them gets a hypergradient.
        steps: number of unrolled steps K.
        lr: step size, a float or ``lr(hparams) -> Tensor`` (a learned learning rate).
        momentum: heavy-ball coefficient in [0, 1).
        truncate: keep only the last ``truncate`` steps in the graph (``None``: all ``steps``).
        batches: a sequence indexed by step (cycled) or a function ``step -> batch``.
        return_info: also return an :class:`UnrollInfo` with the final weights and outer loss.

    Returns:
        The hypergradient with the structure of ``hparams`` (or ``(hypergradient, info)``).

    Raises:
        HypergradientError: the inner loop diverged (a non-finite inner loss or weights: the message
            names the first step and its learning rate), or the outer loss or the hypergradient is not
            finite. A non-finite hypergradient is never returned. The check reads the losses on the host
            once, after the unroll.
    """
    check_callable("inner_loss", inner_loss, "a function inner_loss(params, hparams[, batch]) -> scalar Tensor")
    check_callable("outer_loss", outer_loss, "a function outer_loss(params, hparams) -> scalar Tensor")
    check_int("steps", steps, lo=1)
    momentum = check_number("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
    if truncate is not None:
        check_int("truncate", truncate, lo=1)
    if not callable(lr):
        lr = check_number("lr", lr, lo=0.0, lo_open=True)
    if batches is not None and not callable(batches):
        if not isinstance(batches, Sequence) or isinstance(batches, str | bytes):
            raise ValueError(f"batches={batches!r} is invalid: expected a sequence indexed by step or a function "
                             "step -> batch")
        if len(batches) == 0:
            raise ValueError("batches is empty: give a non-empty sequence or a function step -> batch")
    w0, w_spec = T.flatten(params, "params")
    lam0, lam_spec = T.flatten(hparams, "hparams")
    lam = [t.detach().requires_grad_(True) for t in lam0]
    lam_tree = T.unflatten(lam, lam_spec)
    start = 0 if truncate is None else max(0, steps - truncate)

    def batch(t: int) -> Any:
        if batches is None:
            return None
        return batches(t) if callable(batches) else batches[t % len(batches)]

    losses: list[torch.Tensor] = []  # each step's inner loss, read once at the end (no host sync per step)
    rates: list[Any] = []
    with torch.enable_grad():
        w = [t.detach().clone().requires_grad_(True) for t in w0]
        buf = None
        for t in range(steps):
            tracked = t >= start
            b = batch(t)
            args = (T.unflatten(w, w_spec), lam_tree) if b is None else (T.unflatten(w, w_spec), lam_tree, b)
            loss = _scalar(inner_loss(*args), "inner_loss")
            losses.append(loss.detach())
            g = torch.autograd.grad(loss, w, create_graph=tracked, allow_unused=True, materialize_grads=True)
            step_lr = lr(lam_tree) if callable(lr) else lr
            rates.append(step_lr.detach() if isinstance(step_lr, torch.Tensor) else step_lr)
            if not tracked:
                g = [x.detach() for x in g]
                if isinstance(step_lr, torch.Tensor):
                    step_lr = step_lr.detach()
            if momentum:
                buf = list(g) if buf is None else [momentum * m + gi for m, gi in zip(buf, g)]
                d = buf
            else:
                d = g
            w = [wi - step_lr * di for wi, di in zip(w, d)]
            if not tracked:
                w = [wi.detach().requires_grad_(True) for wi in w]
                buf = None if buf is None else [m.detach() for m in buf]
        final = _scalar(outer_loss(T.unflatten(w, w_spec), lam_tree), "outer_loss")
        hg = torch.autograd.grad(final, lam, allow_unused=True, materialize_grads=True)
    _check_finite(losses, rates, w, final, hg)
    hypergrad = T.unflatten([h.detach() for h in hg], lam_spec)
    if return_info:
        return hypergrad, UnrollInfo(T.unflatten([wi.detach() for wi in w], w_spec), float(final.detach()))
    return hypergrad


def _scalar(loss: Any, name: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name} must return a scalar Tensor; got {got}")
    return loss


def _check_finite(losses: list[torch.Tensor], rates: list[Any], w: list[torch.Tensor], final: torch.Tensor,
                  hg: Sequence[torch.Tensor]) -> None:
    """One host read of every step's loss, the final weights, the outer loss and the hypergradient."""
    flags = torch.stack([torch.stack(losses).isfinite().all(), final.detach().isfinite().all(),
                         *(wi.detach().isfinite().all() for wi in w), *(h.isfinite().all() for h in hg)])
    if bool(flags.all()):
        return
    per_step = torch.stack(losses).isfinite().tolist()
    if not all(per_step):
        k = per_step.index(False)
        if k == 0:
            raise HypergradientError(f"unrolled_hypergradient: the inner loss is {float(losses[0]):g} at the initial "
                                     "weights (step 0), before any update: check params, hparams and inner_loss")
        raise HypergradientError(
            f"unrolled_hypergradient: the inner loop diverged at step {k} of {len(losses)} with "
            f"lr={_rate(rates[k - 1])}: the inner loss is {float(losses[k]):g} there (it was "
            f"{float(losses[k - 1]):g} at step {k - 1}); lower lr or steps")
    if not all(bool(wi.detach().isfinite().all()) for wi in w):
        raise HypergradientError(
            f"unrolled_hypergradient: the inner loop diverged at step {len(losses)} of {len(losses)} with "
            f"lr={_rate(rates[-1])}: the final weights are not finite; lower lr or steps")
    if not bool(final.detach().isfinite().all()):
        raise HypergradientError(f"unrolled_hypergradient: outer_loss is {float(final.detach()):g} at the unrolled weights "
                                 "(the inner loop stayed finite): the hypergradient would not be finite")
    raise HypergradientError("unrolled_hypergradient: the hypergradient is not finite (the inner loop, the weights "
                             "and the outer loss are): a gradient overflowed in the backward pass; lower lr or steps")


def _rate(lr: Any) -> str:
    if isinstance(lr, torch.Tensor):
        return f"{float(lr):g}" if lr.numel() == 1 else f"a tensor with max {float(lr.abs().max()):g}"
    return f"{lr:g}"
