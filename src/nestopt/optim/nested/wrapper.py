"""The nested optimizer's thin wrapper: step the base optimizer at ``lr * multiplier`` per group,
and the multiplier's bounded range.

``step_scaled(base, groups, mults)`` sets each group's ``lr`` to ``lr * m`` and its
``nested_mult`` to ``m``, steps the base, and restores ``lr`` even when the step raises, so a
torch ``LRScheduler`` keeps owning ``lr``.

Torch's step wrapper (a profiler range and the step hooks) costs about 60 us per call on a 2-core
machine: as much again as fused AdamW's own host work on a small model. :func:`call_step` skips it
while nothing is hooked into the base, and :func:`call_step_unhooked` always skips it, for the
hindsight replays, which are not steps a user's hook should see. Both read torch's private hook
registries and ``step.__wrapped__``; this is the only module that does, and on a torch without
them (checked once, at import) both fall back to the wrapped ``base.step()``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer
from torch.optim import Optimizer

# torch's registries of global optimizer step hooks (private, present since torch 2.0)
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
_HOOKS_KNOWN = isinstance(_GLOBAL_PRE_HOOKS, dict) and isinstance(_GLOBAL_POST_HOOKS, dict)


def raw_step(base: Optimizer) -> Any:
    """``type(base).step`` without torch's wrapper, or ``None`` where it cannot be had."""
    step_fn = type(base).step
    if not (_HOOKS_KNOWN and getattr(step_fn, "hooked", False)):
        return None
    return getattr(step_fn, "__wrapped__", None)


def call_step(base: Optimizer, raw: Any) -> None:
    """``base.step()``, without torch's step wrapper when nothing is hooked into it: no hook of
    the base's own, no global hook, and ``step`` not patched on the instance (as a scheduler
    attached to the base does)."""
    if (raw is None or "step" in base.__dict__ or base._optimizer_step_pre_hooks
            or base._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS):
        base.step()
    else:
        raw(base)


def call_step_unhooked(base: Optimizer, raw: Any) -> None:
    """The base's update itself, firing no step hook (a replay is not a step of the user's)."""
    if raw is None:
        base.step()
    else:
        raw(base)


def step_scaled(base: Optimizer, groups: list[dict[str, Any]], mults: list[float], raw: Any) -> None:
    """Step ``base`` with each group's ``lr`` times its multiplier; ``lr`` restored afterwards."""
    saved = []
    for g, m in zip(groups, mults):
        saved.append(g["lr"])
        g["lr"] = g["lr"] * m
        g["nested_mult"] = m
    try:
        call_step(base, raw)
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


class MultRange:
    """The multiplier's range ``[lo, hi]`` (``0 < lo < 1 < hi``) and the map from the controller's
    raw output ``z`` to a log multiplier: a shifted sigmoid, so that ``z = 0`` gives exactly
    ``log m = 0`` (``m = 1``)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.log_lo, self.log_hi = math.log(lo), math.log(hi)
        self.z0 = math.log(-self.log_lo / self.log_hi)  # logit of (0 - log lo) / (log hi - log lo)
        self.s0 = 1.0 / (1.0 + math.exp(-self.z0))

    def to_log_mult(self, z: torch.Tensor) -> torch.Tensor:
        """Raw controller output -> log multiplier in [log lo, log hi] (torch, differentiable)."""
        lo, hi = self.log_lo, self.log_hi
        # written as a difference so that z = 0 gives exactly 0 (a multiplier of exactly 1)
        return ((hi - lo) * (torch.sigmoid(z + self.z0) - self.s0)).clamp(lo, hi)

    def to_log_mult_numpy(self, z: np.ndarray) -> np.ndarray:
        """The same map in NumPy, for the per-step forward (np.clip without its wrapper's cost)."""
        return np.minimum(np.maximum((self.log_hi - self.log_lo) * (1.0 / (1.0 + np.exp(-(z + self.z0))) - self.s0),
                                     self.log_lo), self.log_hi)

    def clip(self, m: float) -> float:
        return min(max(m, self.lo), self.hi)
