"""Lightning: the loss of a whole accumulated batch for the optimizers that read it, and their
telemetry in the trainer's loggers.

    import lightning as L
    from nestopt.integrations.lightning import NestoptCallback

    trainer = L.Trainer(accumulate_grad_batches=2, callbacks=[NestoptCallback()])

Under ``accumulate_grad_batches=k`` Lightning divides each micro-batch's loss by ``k`` before its
backward and calls ``optimizer.step(closure)`` once per ``k`` micro-batches, the closure running
the last of them: a loss-reading optimizer (``Polyak``, ``PolyakAdam``, ``NestedOptimizer``) would
read the last micro-batch's loss divided by ``k``. The callback records every micro-batch's loss
(times ``k``: the loss as the model computed it) with ``observe_loss`` just before its backward, so
the step reads their mean. It also logs each nestopt optimizer's ``telemetry()`` after every
optimizer step (``nestopt/eta``, ``nestopt/steps``, ...; ``nestopt/{i}/...`` for the ``i``-th of
several optimizers) through ``LightningModule.log_dict``, so TensorBoard, CSV or any other logger of
the trainer gets them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def _nestopt(opt: Any) -> Any:
    inner = getattr(opt, "optimizer", opt)  # (a LightningOptimizer wraps the user's)
    return inner if hasattr(inner, "observe_loss") or hasattr(inner, "telemetry") else None


class NestoptCallback(L.Callback):
    """See the module docstring. ``log_every_n_steps``: log the telemetry every this many
    optimizer steps (default: the trainer's ``log_every_n_steps``); ``0`` logs nothing."""

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "nestopt") -> None:
        super().__init__()
        if log_every_n_steps is not None and not (isinstance(log_every_n_steps, int) and log_every_n_steps >= 0):
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} is invalid: expected a non-negative int or None")
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self._logged_at = -1

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        k = trainer.accumulate_grad_batches
        for opt in trainer.optimizers:
            inner = _nestopt(opt)
            if inner is not None and hasattr(inner, "observe_loss"):
                inner.observe_loss(loss.detach() * k)  # Lightning divided it by k

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        step = trainer.global_step
        if not every or not trainer.loggers or step == self._logged_at or step % every:
            return
        self._logged_at = step
        opts = [o for o in (_nestopt(o) for o in trainer.optimizers) if o is not None and hasattr(o, "telemetry")]
        values: dict[str, float] = {}
        for i, opt in enumerate(opts):
            head = self.prefix if len(opts) == 1 else f"{self.prefix}/{i}"
            values.update({f"{head}/{k}": v for k, v in opt.telemetry().items()})
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True)
