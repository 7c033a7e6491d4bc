"""Hugging Face ``Trainer``: every nestopt optimizer, those that read the loss included.

    from nestopt.integrations.hf import NestoptTrainer
    from nestopt.optim import Polyak

    opt = Polyak(model.parameters())
    trainer = NestoptTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()                      # and trainer.train(resume_from_checkpoint=...)

``Trainer`` calls ``optimizer.step()`` with no arguments, once per ``gradient_accumulation_steps``
micro-batches. :class:`NestoptTrainer` hands the optimizer what it needs first:

- each micro-batch's training loss through ``observe_loss`` (the loss as the model computed it;
  where ``Trainer`` normalises by the whole batch's token count, times the number of micro-batches),
  so ``Polyak``, ``PolyakAdam`` and the nested optimizer's loss features read the batch's mean loss;
- for the nested optimizer's hindsight signal, a scorer on the last micro-batch (``score_with``),
  which its replays are scored with in place of a closure;
- its ``telemetry()`` in every log (``nestopt/eta``, ``nestopt/steps``, ...), so ``report_to``
  (TensorBoard, ...) and the other callbacks see it.

Checkpoints are ``Trainer``'s own: the optimizer's ``state_dict`` (tensors and plain values only, read
back with ``weights_only=True``), so a resumed run ends bitwise where an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


def _inner(opt: Any) -> Any:
    return getattr(opt, "optimizer", opt)  # (accelerate wraps the optimizer)


class NestoptTrainer(Trainer):
    """``transformers.Trainer`` that feeds a nestopt optimizer (see the module docstring)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        opt = _inner(self.optimizer) if self.optimizer is not None else None
        if model.training and torch.is_grad_enabled() and opt is not None:
            loss = out[0] if return_outputs else out
            if hasattr(opt, "observe_loss"):
                v = loss.detach()
                if num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func):
                    # normalised by the whole batch's items: the micro-batches' values add up to its
                    # mean loss, so k times each averages to it
                    v = v * self.args.gradient_accumulation_steps
                opt.observe_loss(v)
            if hasattr(opt, "score_with"):
                opt.score_with(lambda model=model, inputs=inputs: self._score(model, inputs))
        return out

    def _score(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return Trainer.compute_loss(self, model, inputs).detach()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        opt = _inner(self.optimizer) if self.optimizer is not None else None
        if opt is not None and hasattr(opt, "telemetry") and "loss" in logs:  # (training logs, not eval's)
            logs = {**logs, **{f"nestopt/{k}": v for k, v in opt.telemetry().items()}}
        super().log(logs, *args, **kwargs)
