"""Transactional steps: a step that raises leaves the optimizer and the model as they were.

Every nestopt optimizer's ``step`` runs inside a :class:`Transaction` (the wrapper is applied by
:class:`~nestopt.optim.base.NestoptOptimizer` to each subclass's ``step``). A step works in two
phases:

1. **Reading** (the closure, the host sync, the checks, and for the nested optimizer its
   features, replay and controller update): nothing a user holds is changed for good. The
   gradients are kept by reference before the closure runs, and whatever the optimizer changes
   in this phase registers an undo (:meth:`Transaction.on_rollback`). An exception here, a
   ``KeyboardInterrupt`` included, puts every parameter, gradient, state tensor and counter back
   exactly (bitwise) as they were before the call.
2. **Committing** (:meth:`Transaction.commit`, right before the first in-place update): the
   update kernels themselves. These write into the parameters and buffers in place; undoing them
   would need a copy of every parameter and buffer at every step (twice the memory of Adam's
   state, and about as much time again as the update), so an error inside a kernel (out of
   memory, say) is not rolled back, and the error's note says so.

The error is re-raised as it was (its type unchanged, so ``except KeyboardInterrupt`` still
works) with a note (``err.__notes__``) naming the optimizer, the step and the phase that failed.

**Gradients a closure changed in place.** The gradients are restored by reference: a closure
that starts with ``zero_grad()`` (torch's default, ``set_to_none=True``) and then raises leaves
the old gradient tensors untouched, and they are put back. A closure that writes into the
existing ``.grad`` tensors (``zero_grad(set_to_none=False)``, or ``backward()`` accumulating into
them) before it raises has changed them in place; that cannot be undone without a copy, and the
note says how many were changed (their version counter moved).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.optim import Optimizer


class Transaction:
    """What one call of ``step`` must put back if it fails."""

    __slots__ = ("opt", "phase", "committed", "grads", "undo")

    def __init__(self, opt: Optimizer, closure: bool) -> None:
        self.opt = opt
        self.phase = "the closure" if closure else "the step's checks"
        self.committed = False
        # only a closure can replace or write into the gradients: without one there is nothing to keep
        self.grads = [(p, p.grad, None if p.grad is None else p.grad._version)
                      for g in opt.param_groups for p in g["params"]] if closure else None
        self.undo: list[Callable[[], None]] = []

    def enter(self, phase: str) -> None:
        """The step moves on to ``phase`` (named in the error's note if it fails there)."""
        self.phase = phase

    def commit(self, phase: str = "the update") -> None:
        """The in-place update starts: from here a failure is not rolled back."""
        self.phase = phase
        self.committed = True

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` if the step fails (undos run last-registered first)."""
        self.undo.append(fn)

    def rollback(self, err: BaseException) -> None:
        failed: list[str] = []
        for fn in reversed(self.undo):
            try:
                fn()
            except Exception as e:  # keep putting back the rest; say what could not be
                failed.append(f"{type(e).__name__}: {e}")
        changed = 0
        if self.grads is not None:
            for p, g, version in self.grads:
                if g is not None and p.grad is g and g._version != version:
                    changed += 1
                p.grad = g
        name = type(self.opt).__name__
        steps = self.opt.param_groups[0].get(getattr(self.opt, "counter_entry", "counters"), {}).get("steps", "?") \
            if self.opt.param_groups else "?"
        where = f"{name}.step failed in {self.phase} (at step {steps})"
        if self.committed:
            what = ("after the in-place update had begun: the parameters and state may be partly updated "
                    "(an error inside the update kernels is not rolled back; see nestopt.optim.transaction)")
        else:
            what = "the parameters, gradients and optimizer state are as they were before the call"
            if changed:
                what += (f", except the gradients of {changed} tensors, which the closure changed in place "
                         "before it raised (zero_grad(set_to_none=False) or backward into existing .grad)")
        if failed:
            what += f"; putting back some state failed: {'; '.join(failed)}"
        if hasattr(err, "add_note"):
            err.add_note(f"{where}; {what}")


def current(opt: Optimizer) -> Transaction | None:
    """The transaction of the step ``opt`` is running (``None`` outside ``step``)."""
    return opt.__dict__.get("_txn")


def transactional(step: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``step`` in a :class:`Transaction` (re-entrant calls join the running one)."""

    @functools.wraps(step)
    def run(self: Any, closure: Any = None, **kwargs: Any) -> Any:
        if self.__dict__.get("_txn") is not None:
            return step(self, closure, **kwargs)
        self._check_step_groups()
        txn = Transaction(self, closure is not None)
        self.__dict__["_txn"] = txn
        try:
            if "found_inf" in self.__dict__ and self._from_grad_scaler(closure):
                return None  # GradScaler found an inf or a NaN: the step is skipped (and counted)
            out = step(self, closure, **kwargs)
            # losses recorded for this step (observe_loss) and not read by its rule are forgotten
            # with it: an optimizer that never reads the loss must not keep them for ever
            self.__dict__.pop("_observed", None)
            return out
        except BaseException as err:
            txn.rollback(err)
            raise
        finally:
            self.__dict__["_txn"] = None

    run.transactional = True  # type: ignore[attr-defined]
    return run


def evaluate(opt: Optimizer, closure: Callable[[], Any]) -> Any:
    """Call the closure with gradients enabled, inside the step's transaction."""
    txn = current(opt)
    if txn is not None:
        txn.enter("the closure")
    with torch.enable_grad():
        loss = closure()
    if txn is not None:
        txn.enter("the step's checks")
    return loss


def commit(opt: Optimizer, phase: str = "the update") -> None:
    """Mark the start of the in-place update of ``opt``'s running step (no-op outside a step)."""
    txn = current(opt)
    if txn is not None:
        txn.commit(phase)


def enter(opt: Optimizer, phase: str) -> None:
    txn = current(opt)
    if txn is not None:
        txn.enter(phase)
