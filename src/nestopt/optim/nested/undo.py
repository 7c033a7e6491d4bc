"""How a failed nested step puts the host state back (see :mod:`nestopt.optim.transaction`).

:func:`undo_point` keeps, shallowly, what a step changes before its base step: the counters, the
multipliers, the running statistics, the features', the signal's and the loss tracker's
attributes (their tensors are replaced by a step, never written into; see
:class:`~.features.Feature`). :func:`keep_controller` keeps the controller's weights, gradients
and Adam state, once per step, just before it first trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..transaction import current

if TYPE_CHECKING:
    from .optimizer import NestedOptimizer


def undo_point(opt: NestedOptimizer) -> Callable[[], None]:
    """A way back to the host state as it is now: the counters, the running statistics, the
    features' and the signal's state (shallow: the tensors they keep are replaced by a step,
    never written into; see :class:`~.features.Feature`). The controller's weights are kept
    only once a step is about to train them (:func:`keep_controller`)."""
    entry = opt.counter_entry
    counters = [(g[entry], dict(g[entry])) for g in opt.param_groups]
    mults = [g["nested_mult"] for g in opt.param_groups]
    own = {k: opt.__dict__[k] for k in ("memory", "last_features", "last_raw", "_val")}
    own["_val"] = dict(own["_val"])
    norm = dict(vars(opt.norm))
    objs = [(o, _keep(vars(o))) for o in (*opt.features, opt.signal_impl, opt.loss_tracker)]
    opt.__dict__["_controller_kept"] = False

    def undo() -> None:
        for live, saved in counters:
            live.clear()
            live.update(saved)
        for g, m in zip(opt.param_groups, mults):
            g["nested_mult"] = m
        opt.__dict__.update(own)
        vars(opt.norm).update(norm)
        for o, saved in objs:
            vars(o).clear()
            vars(o).update(_put_back(saved))

    return undo

def keep_controller(opt: NestedOptimizer) -> None:
    """Called before the controller trains inside a step: keep its weights, gradients and Adam
    state (once per step), so that a step failing afterwards puts them back."""
    txn = current(opt)
    if txn is None or opt.__dict__.get("_controller_kept"):
        return
    opt.__dict__["_controller_kept"] = True
    ps = list(opt.controller.parameters())
    weights = [p.detach().clone() for p in ps]
    grads = [p.grad for p in ps]
    opt_state = copy.deepcopy(opt.controller_opt.state_dict())

    def undo() -> None:
        with torch.no_grad():
            for p, w, g in zip(ps, weights, grads):
                p.copy_(w)
                p.grad = g
        opt.controller_opt.load_state_dict(opt_state)

    txn.on_rollback(undo)


class _Gen:
    """A generator and its state when kept (its state changes in place as it draws)."""

    __slots__ = ("gen", "state")

    def __init__(self, gen: torch.Generator) -> None:
        self.gen, self.state = gen, gen.get_state()


def _keep(v: Any) -> Any:
    """A copy of the containers of ``v`` that shares their leaves (tensors, arrays, numbers)."""
    if isinstance(v, dict):
        return {k: _keep(x) for k, x in v.items()}
    if isinstance(v, list):
        return list(v)  # rows appended to a list are never written into
    if isinstance(v, torch.Generator):
        return _Gen(v)
    return v


def _put_back(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _put_back(x) for k, x in v.items()}
    if isinstance(v, _Gen):
        v.gen.set_state(v.state)
        return v.gen
    return v
