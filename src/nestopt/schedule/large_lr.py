"""The large-learning-rate recipe: its configuration and a torch ``LRScheduler`` for any schedule.

``LargeLRConfig`` holds the research note's defaults (base 0.3, linear warmup from 0.01 over 5
epochs, cosine decay to 1e-5 over 100 epochs, step and exponential decay as alternatives,
gradient clipping at 1.0, weight decay 5e-4, label smoothing 0.1, and the learning-rate grid).
They are the note's defaults, not measured optima. Read one from a dict or from environment
variables (``NESTOPT_LARGE_LR_BASE=0.5``; every field also by its own upper-case name)::

    >>> cfg = LargeLRConfig.from_dict({"base_lr": 0.5, "warmup_epochs": 2})
    >>> sched = LargeLRScheduler(opt, cfg.schedule(), steps_per_epoch=len(loader))   # doctest: +SKIP

``LargeLRScheduler(optimizer, schedule, steps_per_epoch=1)`` sets every group's learning rate to
``schedule(step / steps_per_epoch) * scale * ratio_g`` at each ``step()``, where ``ratio_g`` is
the group's initial learning rate over the first group's (so per-group ratios survive) and
``scale`` is a multiplier a guard may lower. Call ``step()`` once per optimizer step with
``steps_per_epoch`` set to the epoch length (a smooth per-step schedule in epoch units), or once
per epoch with ``steps_per_epoch=1``. The learning rate is a closed form of the step count, so a
resume from ``state_dict()`` gives exactly the rates of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from .._checks import _fmt, check_choice, check_int, check_number
from .functions import Schedule, constant, cosine, exponential, step_decay, warmup_then

DECAYS = ("cosine", "step", "exponential", "none")
ENV_PREFIX = "NESTOPT_LARGE_LR_"
ALIASES = {"BASE": "base_lr", "MIN": "min_lr", "WARMUP": "warmup_epochs", "WARMUP_START": "warmup_start_lr",
           "CLIP": "grad_clip", "EPOCHS": "total_epochs"}


@dataclass(frozen=True)
class LargeLRConfig:
    base_lr: float = 0.3
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_start_lr: float = 0.01
    decay: str = "cosine"
    total_epochs: int = 100
    decay_epochs: tuple[int, ...] = (30, 60, 90)
    decay_factor: float = 0.1
    weight_decay: float = 5e-4
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.1
    momentum: float = 0.9
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 0.5, 0.8, 1.0)

    def __post_init__(self) -> None:
        check_number("base_lr", self.base_lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("min_lr", self.min_lr, lo=0.0, hi=self.base_lr)
        check_int("warmup_epochs", self.warmup_epochs, lo=0, hi=10**6)
        check_number("warmup_start_lr", self.warmup_start_lr, lo=0.0, hi=self.base_lr)
        check_choice("decay", self.decay, DECAYS)
        check_int("total_epochs", self.total_epochs, lo=max(1, self.warmup_epochs + 1))
        if any(isinstance(e, bool) or not isinstance(e, int) or e <= 0 for e in self.decay_epochs) or list(self.decay_epochs) != sorted(self.decay_epochs):
            raise ValueError(f"decay_epochs={self.decay_epochs!r} is invalid: expected positive, increasing integers")
        check_number("decay_factor", self.decay_factor, lo=0.0, lo_open=True, hi=1.0)
        check_number("weight_decay", self.weight_decay, lo=0.0, hi=1.0, hi_open=True)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, lo=0.0, lo_open=True)
        check_number("label_smoothing", self.label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        if not self.lr_grid or any(isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x <= 10
                                   for x in self.lr_grid):
            raise ValueError(f"lr_grid={self.lr_grid!r} is invalid: expected a non-empty list of rates in (0, 10]")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LargeLRConfig:
        """From a mapping of field names (or the environment aliases) to values."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values={values!r} is invalid: expected a mapping of field names to values")
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ValueError(f"{key!r}={value!r} is invalid: a field name is a string; valid fields: "
                                 f"{', '.join(sorted(names))}")
            name = ALIASES.get(key.upper(), key.lower())
            if name not in names:
                raise ValueError(f"{key}={value!r} is invalid: unknown field; valid fields: {', '.join(sorted(names))}")
            kwargs[name] = _coerce(name, value)
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> LargeLRConfig:
        """From ``NESTOPT_LARGE_LR_*`` variables (``BASE``, ``MIN``, ``WARMUP``, ``WARMUP_START``,
        ``CLIP``, ``EPOCHS``, or any field's upper-case name); unset fields keep their defaults."""
        env = os.environ if environ is None else environ
        values = {k[len(prefix):]: v for k, v in env.items() if k.startswith(prefix)}
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None

    def schedule(self, base_lr: float | None = None, total: float | None = None) -> Schedule:
        """The recipe's schedule: warmup, then the chosen decay, in epochs. ``base_lr`` overrides
        the config's (for a grid); ``total`` stretches the whole recipe (warmup and decay
        milestones in proportion) to another length, e.g. a step budget."""
        base = self.base_lr if base_lr is None else check_number("base_lr", base_lr, lo=0.0, lo_open=True)
        k = 1.0 if total is None else check_number("total", total, lo=0.0, lo_open=True) / self.total_epochs
        warm = self.warmup_epochs * k
        rest = self.total_epochs * k - warm
        start = min(self.warmup_start_lr, base)
        low = min(self.min_lr, base)
        if self.decay == "cosine":
            decay: Schedule = cosine(base, low, rest)
        elif self.decay == "step":
            decay = step_decay(base, [e * k - warm for e in self.decay_epochs if e * k > warm], self.decay_factor)
        elif self.decay == "exponential":
            decay = exponential(base, self.decay_factor, every=max(rest / 3.0, 1e-9), min_value=low)
        else:
            decay = constant(base)
        return warmup_then(decay, start, base, warm)


def _coerce(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    text = value.strip()
    try:
        if name in ("warmup_epochs", "total_epochs"):
            return int(text)
        if name in ("decay_epochs",):
            return tuple(int(x) for x in text.split(",") if x.strip())
        if name == "lr_grid":
            return tuple(float(x) for x in text.split(",") if x.strip())
        if name == "decay":
            return text
        if name == "grad_clip" and text.lower() in ("none", "off", ""):
            return None
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is invalid: not a number") from None


class LargeLRScheduler(LRScheduler):
    """Drives any optimizer with a :class:`Schedule` (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule | LargeLRConfig,
                 steps_per_epoch: float = 1, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer={optimizer!r} is invalid: expected a torch.optim.Optimizer")
        if isinstance(schedule, LargeLRConfig):
            schedule = schedule.schedule()
        if not callable(schedule):
            raise ValueError(f"schedule={schedule!r} is invalid: expected a Schedule or a LargeLRConfig")
        self.schedule = schedule
        self.steps_per_epoch = check_number("steps_per_epoch", steps_per_epoch, lo=0.0, lo_open=True)
        self.scale = 1.0
        lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.ratios = [lr / lrs[0] if lrs[0] > 0 else 1.0 for lr in lrs]
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> list[float]:
        """Every group's rate at ``step``; a ``ValueError`` naming the step and the value when the
        schedule gives something that is not a finite rate >= 0 (nothing is set on the optimizer then)."""
        t = step / self.steps_per_epoch
        raw = self.schedule(t)
        if isinstance(raw, bool | str | bytes) or raw is None:
            raise ValueError(f"the schedule's rate at step {step} (t={t:g}) is {raw!r}: expected a learning rate, "
                             "a finite number >= 0; the optimizer's rates are left as they were")
        try:
            value = raw * self.scale
            v = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"the schedule's rate at step {step} (t={t:g}) is {_fmt(raw)}: expected a learning rate, "
                             "a finite number >= 0; the optimizer's rates are left as they were") from None
        if not (math.isfinite(v) and v >= 0):
            scaled = "" if self.scale == 1.0 else f" (times scale={self.scale!r}: {v!r})"
            raise ValueError(f"the schedule's rate at step {step} (t={t:g}) is {raw!r}{scaled}: a learning rate "
                             "must be a finite number >= 0; the optimizer's rates are left as they were")
        return [value * r for r in self.ratios]

    def step(self, epoch: int | None = None) -> None:
        """Advance one step and set the rates; a refused rate leaves the clock and every rate as they were."""
        last, count = self.last_epoch, getattr(self, "_step_count", 0)
        try:
            super().step(epoch)  # type: ignore[arg-type]
        except Exception:
            self.last_epoch, self._step_count = last, count
            raise

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        # The schedule is configuration: rebuild it and load the counters.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
