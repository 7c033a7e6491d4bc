"""``TrainingGuard``: per-step protection for training at large learning rates.

Call it once per step, after ``backward`` and before ``optimizer.step``::

    guard = TrainingGuard(model, optimizer, scheduler)
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if guard.step(loss):          # False: skip this update (the guard has already acted)
            optimizer.step()
            scheduler.step()
    guard.on_eval(val_loss)           # after each evaluation (plateau detection)
    guard.on_diagnostics(sparsity=0.2, confidence=0.7)   # from nestopt.diagnostics
    guard.events                       # what it did: step, action, reason, values

What it does, each an event in ``guard.events`` (and ``guard.save_log(path)``):

- **clip**: global gradient norm above ``clip_norm`` is clipped to it (counted, and logged once
  every ``clip_log_every`` clips so the log stays small);
- **lr_halved**: the norm stays above ``halve_norm`` for ``sustained`` steps in a row;
- **rollback**: a non-finite loss, or a loss above ``spike_factor`` (2) times the *largest* of
  the last ``spike_window`` (20) good losses, restores the last good checkpoint of model,
  optimizer and scheduler (in memory, or on disk under ``checkpoint_dir``) and skips the update.
  A spike must also exceed ``spike_floor`` (0.1) times the first loss the guard saw. Both choices
  come from measurement: near zero training loss, minibatch losses of 5-15x the recent average
  (and 2-6x the recent maximum) are ordinary, and a purely relative rule rolled back 6 times in a
  clean 300-step digits-MLP run in our tests;
- **skip_nonfinite_grad**: a finite loss with a NaN or infinite gradient skips the update;
- **lr_lowered** (plateau): no validation improvement for ``plateau_patience`` evaluations;
- **weight_decay_raised**: activation sparsity below ``sparsity_floor``;
- **low_confidence**: mean confidence below ``confidence_floor`` (a warning: possible collapse).

Learning-rate changes go through ``scheduler.scale`` when the scheduler is a
:class:`~nestopt.schedule.LargeLRScheduler` (so the schedule keeps its shape), else they multiply
the groups' ``lr``. A checkpoint is taken every ``checkpoint_every`` good steps; at most ``keep``
are held, so memory stays bounded (``keep`` copies of model, optimizer and scheduler state).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import as_real, check_int, check_number
from .._io import atomic_path, is_plain, safe_load


@dataclass(frozen=True)
class GuardConfig:
    clip_norm: float | None = 1.0
    halve_norm: float = 10.0
    sustained: int = 5
    spike_factor: float = 2.0
    spike_window: int = 20
    spike_floor: float = 0.1
    checkpoint_every: int = 50
    keep: int = 2
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    sparsity_floor: float = 0.1
    weight_decay_factor: float = 1.5
    max_weight_decay: float = 1e-2
    confidence_floor: float = 0.5
    lr_factor_after_rollback: float = 1.0
    clip_log_every: int = 100

    def __post_init__(self) -> None:
        if self.clip_norm is not None:
            check_number("clip_norm", self.clip_norm, lo=0.0, lo_open=True)
        check_number("halve_norm", self.halve_norm, lo=0.0, lo_open=True)
        check_int("sustained", self.sustained, lo=1)
        check_number("spike_factor", self.spike_factor, lo=1.0, lo_open=True)
        check_int("spike_window", self.spike_window, lo=1)
        check_number("spike_floor", self.spike_floor, lo=0.0)
        check_int("checkpoint_every", self.checkpoint_every, lo=1)
        check_int("keep", self.keep, lo=1)
        check_int("plateau_patience", self.plateau_patience, lo=1)
        check_number("plateau_factor", self.plateau_factor, lo=0.0, lo_open=True, hi=1.0)
        check_number("sparsity_floor", self.sparsity_floor, lo=0.0, hi=1.0)
        check_number("weight_decay_factor", self.weight_decay_factor, lo=1.0)
        check_number("max_weight_decay", self.max_weight_decay, lo=0.0)
        check_number("confidence_floor", self.confidence_floor, lo=0.0, hi=1.0)
        check_number("lr_factor_after_rollback", self.lr_factor_after_rollback, lo=0.0, lo_open=True, hi=1.0)
        check_int("clip_log_every", self.clip_log_every, lo=1)


class TrainingGuard:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 config: GuardConfig | None = None, checkpoint_dir: str | Path | None = None, **overrides: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={model!r} is invalid: expected a torch.nn.Module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer={optimizer!r} is invalid: expected a torch.optim.Optimizer")
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config={config!r} is invalid: expected a GuardConfig (or pass its fields as keywords)")
        valid = [f.name for f in fields(GuardConfig)]
        unknown = [k for k in overrides if k not in valid]
        if unknown:
            raise TypeError(f"{', '.join(unknown)} {'is not a' if len(unknown) == 1 else 'are not'} TrainingGuard "
                            f"option{'s' if len(unknown) > 1 else ''}; valid: {', '.join(valid)}")
        if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
            raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is invalid: it is a file, not a folder")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = GuardConfig(**{**(asdict(config) if config else {}), **overrides})
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.events: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.n_steps = 0
        self._good: deque[float] = deque(maxlen=self.config.spike_window)
        self._over = 0
        self._since_ckpt = 0
        self._ckpts: deque[Any] = deque()
        self._warned_memory = False  # said once that checkpoints stay in memory (see _checkpoint)
        self._first_loss: float | None = None
        self._best_val = math.inf
        self._bad_evals = 0
        self._checkpoint()  # the start is the first good state

    # -- events ---------------------------------------------------------------------------------
    def _event(self, action: str, reason: str, **values: Any) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1
        self.events.append({"step": self.n_steps, "action": action, "reason": reason,
                            **{k: (float(v) if isinstance(v, int | float) else v) for k, v in values.items()}})

    def telemetry(self) -> dict[str, float]:
        """What a logger reads (the names :mod:`nestopt.integrations` writes): the steps seen and
        each action's count (``guard/rollback``, ``guard/clip``, ...)."""
        return {"guard/steps": float(self.n_steps), **{f"guard/{k}": float(v) for k, v in sorted(self.counts.items())}}

    def save_log(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"counts": self.counts, "events": self.events}, indent=1, default=str))

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        st = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            st["scheduler"] = self.scheduler.state_dict()
        return copy.deepcopy(st)

    def _checkpoint(self) -> None:
        state = self._state()
        if self.checkpoint_dir is not None and is_plain(state):
            # tensors and plain values only, read back with weights_only=True: a file swapped on a
            # shared disk cannot run code when the guard rolls back to it
            path = self.checkpoint_dir / f"guard-{self.n_steps:08d}.pt"
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            state = path
        elif self.checkpoint_dir is not None and not self._warned_memory:
            self._warned_memory = True
            warnings.warn("TrainingGuard keeps its checkpoints in memory, not in checkpoint_dir: the optimizer's or "
                          "scheduler's state holds objects other than tensors and plain values, which nestopt does "
                          "not write to a file it would later unpickle", stacklevel=3)
        self._ckpts.append((self.n_steps, state))
        while len(self._ckpts) > self.config.keep:
            _, old = self._ckpts.popleft()
            if isinstance(old, Path):
                old.unlink(missing_ok=True)
        self._since_ckpt = 0

    def _restore(self) -> int:
        step, state = self._ckpts[-1]
        if isinstance(state, Path):
            state = safe_load(state, what="guard checkpoint")  # runs no code from the file
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        self.optimizer.zero_grad(set_to_none=True)
        return step

    # -- learning-rate and weight-decay actions -------------------------------------------------
    def _scale_lr(self, factor: float) -> None:
        if self.scheduler is not None and hasattr(self.scheduler, "scale"):
            self.scheduler.scale *= factor
        for g in self.optimizer.param_groups:
            g["lr"] *= factor

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    # -- the per-step check ---------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float) -> bool:
        """Check this step's loss and gradients; act; return whether to apply the update."""
        cfg = self.config
        if loss is None or isinstance(loss, bool | str | bytes) or not (torch.is_tensor(loss) or
                                                                    isinstance(loss, int | float)):
            try:
                loss = float(loss)  # type: ignore[arg-type]  # a NumPy scalar
            except (TypeError, ValueError):
                raise TypeError(f"loss={loss!r} is invalid: expected this step's loss, a scalar Tensor or a number"
                                ) from None
        if torch.is_tensor(loss) and loss.numel() != 1:
            raise ValueError(f"loss=Tensor of shape {tuple(loss.shape)} ({loss.numel()} elements) is invalid: "
                             "expected this step's scalar loss")
        self.n_steps += 1
        lv = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if self._first_loss is None and math.isfinite(lv):
            self._first_loss = abs(lv)
        if not math.isfinite(lv) or (len(self._good) >= min(5, cfg.spike_window)
                                     and lv > cfg.spike_factor * max(self._good)
                                     and lv > cfg.spike_floor * (self._first_loss or 0.0)):
            recent = max(self._good) if self._good else float("nan")
            back_to = self._restore()
            if cfg.lr_factor_after_rollback < 1.0:
                self._scale_lr(cfg.lr_factor_after_rollback)
            self._event("rollback", "non-finite loss" if not math.isfinite(lv) else "loss spike",
                        loss=lv if math.isfinite(lv) else str(lv), recent_max=recent, restored_step=back_to)
            return False
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm is not None else math.inf)
            nv = float(norm)
            if not math.isfinite(nv):
                self.optimizer.zero_grad(set_to_none=True)
                self._event("skip_nonfinite_grad", "gradient norm is not finite", grad_norm=str(nv))
                return False
            if cfg.clip_norm is not None and nv > cfg.clip_norm:
                self.counts["clip"] = self.counts.get("clip", 0) + 1
                if self.counts["clip"] % cfg.clip_log_every == 1:
                    self.events.append({"step": self.n_steps, "action": "clip", "reason": "gradient norm above clip_norm",
                                        "grad_norm": nv, "clip_norm": cfg.clip_norm, "clips_so_far": self.counts["clip"]})
            self._over = self._over + 1 if nv > cfg.halve_norm else 0
            if self._over >= cfg.sustained:
                self._scale_lr(0.5)
                self._event("lr_halved", f"gradient norm above {cfg.halve_norm} for {cfg.sustained} steps",
                            grad_norm=nv, lr=self.lrs()[0])
                self._over = 0
        self._good.append(lv)
        self._since_ckpt += 1
        if self._since_ckpt >= cfg.checkpoint_every:
            self._checkpoint()
        return True

    # -- slower signals ---------------------------------------------------------------------------
    def on_eval(self, val_loss: float) -> None:
        """Plateau detection: lower the learning rate after ``plateau_patience`` evaluations
        without a relative improvement of 1e-4; a non-finite value is ignored."""
        val_loss = as_real("val_loss", val_loss, "a number (the validation loss)")
        if not math.isfinite(val_loss):
            return
        if val_loss < self._best_val * (1 - 1e-4):
            self._best_val, self._bad_evals = val_loss, 0
            return
        self._bad_evals += 1
        if self._bad_evals >= self.config.plateau_patience:
            self._scale_lr(self.config.plateau_factor)
            self._event("lr_lowered", f"no validation improvement in {self._bad_evals} evaluations",
                        val_loss=val_loss, best=self._best_val, lr=self.lrs()[0])
            self._bad_evals = 0

    def on_diagnostics(self, sparsity: float | None = None, confidence: float | None = None) -> None:
        """Raise weight decay on low activation sparsity; warn on low confidence (``None`` or NaN: no signal)."""
        if sparsity is not None:
            sparsity = as_real("sparsity", sparsity, "a fraction in [0, 1] (or None)")
        if confidence is not None:
            confidence = as_real("confidence", confidence, "a fraction in [0, 1] (or None)")
        cfg = self.config
        if sparsity is not None and sparsity < cfg.sparsity_floor:
            raised = False
            for g in self.optimizer.param_groups:
                if "weight_decay" in g:
                    new = min(max(g["weight_decay"], 1e-5) * cfg.weight_decay_factor, cfg.max_weight_decay)
                    raised |= new > g["weight_decay"]
                    g["weight_decay"] = new
            if raised:
                self._event("weight_decay_raised", f"activation sparsity below {cfg.sparsity_floor}",
                            sparsity=sparsity, weight_decay=self.optimizer.param_groups[0]["weight_decay"])
        if confidence is not None and confidence < cfg.confidence_floor:
            self._event("low_confidence", f"mean confidence below {cfg.confidence_floor}: possible collapse",
                        confidence=confidence)
            warnings.warn(f"TrainingGuard: mean confidence {confidence:.3f} < {cfg.confidence_floor} "
                          f"(step {self.n_steps}): possible collapse", RuntimeWarning, stacklevel=2)
