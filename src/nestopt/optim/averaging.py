"""Weight averaging wrappers in the manner of ``torch.optim.swa_utils.AveragedModel``: BEMA and EMA.

Both hold a copy of the model (``.module``, what you evaluate) and are updated after each optimizer
step with ``avg.update_parameters(model)``; their state (the averages, the snapshot, the step
count) lives in buffers, so ``state_dict()`` / ``load_state_dict()`` carry all of it.

**EMA** (the comparison): ``ema_t = d * ema_{t-1} + (1 - d) * theta_t``, ``ema_0 = theta_0``, with a
constant ``decay`` ``d``.

**BEMA**, the bias-corrected EMA of Block et al. 2025 ("EMA without the lag"). With ``t`` the
updates since the snapshot ``theta_0`` (taken at the first update after ``update_after`` steps):

    beta_t  = (rho + gamma t) ** -kappa            # the EMA weight (``ema_power`` kappa)
    alpha_t = (rho + gamma t) ** -eta              # the bias correction (``bias_power`` eta)
    ema_t   = (1 - beta_t) ema_{t-1} + beta_t theta_t ,   ema_0 = theta_0
    bema_t  = alpha_t (theta_t - theta_0) + ema_t

``.module`` holds ``bema_t``. Defaults are the paper's (as its reference implementation, TRL's
``BEMACallback``, ships them): ``kappa = 0.5``, ``eta = 0.2``, ``rho = 10`` (``lag``),
``gamma = 1`` (``multiplier``), ``tau = 0`` (``update_after``). The callback updates every 400
steps to save time on large models; here ``update_every`` defaults to ``1``, and ``t`` counts the
updates since the snapshot (the callback counts global steps; the same when ``update_after = 0``).
``bias_power`` very large turns the correction off (``alpha_t -> 0``): plain EMA with the decaying
weight ``beta_t``. The correction removes the EMA's lag toward ``theta_0`` early in training; it
also keeps ``alpha_t (theta_t - theta_0)``, which fades only as ``t ** -eta`` (tested).

An update whose model holds a non-finite weight changes nothing and is counted in ``skipped``.
Buffers of the model (batch-norm statistics) are copied as they are.

    >>> import torch
    >>> from nestopt.optim import BEMA
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> bema = BEMA(model)
    >>> for _ in range(5):
    ...     opt.zero_grad(); model(torch.ones(1, 3)).sum().backward(); opt.step()
    ...     bema.update_parameters(model)
    >>> int(bema.n_updates), bema.module(torch.ones(1, 3)).shape
    (5, torch.Size([1, 1]))
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .._checks import check_int, check_number

__all__ = ["BEMA", "EMA"]


class _Averaged(nn.Module):
    def __init__(self, model: nn.Module, update_after: int, update_every: int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={model!r} is invalid: expected a torch.nn.Module")
        check_int("update_after", update_after, lo=0)
        check_int("update_every", update_every, lo=1)
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.update_after, self.update_every = update_after, update_every
        self.register_buffer("n_updates", torch.tensor(0, dtype=torch.long))  # calls to update_parameters
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # t: updates since the snapshot
        self.register_buffer("skipped", torch.tensor(0, dtype=torch.long))
        n = len(list(self.module.parameters()))
        self._slots = n
        for i, p in enumerate(self.module.parameters()):
            self.register_buffer(f"ema_{i}", p.detach().clone())
            self.register_buffer(f"theta0_{i}", p.detach().clone())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _ema(self, i: int) -> torch.Tensor:
        return getattr(self, f"ema_{i}")

    def _theta0(self, i: int) -> torch.Tensor:
        return getattr(self, f"theta0_{i}")

    def _weight(self, t: int) -> float:
        raise NotImplementedError

    def _combine(self, t: int, i: int, theta: torch.Tensor) -> torch.Tensor:
        return self._ema(i)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (call after each ``opt.step()``)."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != self._slots:
            raise ValueError(f"model has {len(params)} parameters, the averaged copy {self._slots}: pass the model "
                             "this average was built from")
        if not all(bool(torch.isfinite(p).all()) for p in params):
            self.skipped += 1
            return
        step = int(self.n_updates)
        self.n_updates += 1
        for b_avg, b in zip(self.module.buffers(), model.buffers()):
            b_avg.copy_(b)
        if step < self.update_after or (step - self.update_after) % self.update_every:
            return
        t = int(self.n_averaged)
        if t == 0:  # the snapshot theta_0: the average starts there
            for i, p in enumerate(params):
                self._theta0(i).copy_(p)
                self._ema(i).copy_(p)
        else:
            w = self._weight(t)
            for i, p in enumerate(params):
                self._ema(i).mul_(1.0 - w).add_(p.to(self._ema(i).dtype), alpha=w)
        for i, (p_avg, p) in enumerate(zip(self.module.parameters(), params)):
            p_avg.copy_(self._combine(t, i, p))
        self.n_averaged += 1


class EMA(_Averaged):
    """Plain exponential moving average, ``ema_t = decay * ema_{t-1} + (1 - decay) * theta_t``."""

    def __init__(self, model: nn.Module, decay: float = 0.99, *, update_after: int = 0, update_every: int = 1) -> None:
        check_number("decay", decay, lo=0.0, hi=1.0, hi_open=True)
        super().__init__(model, update_after, update_every)
        self.decay = float(decay)

    def _weight(self, t: int) -> float:
        return 1.0 - self.decay

    def extra_repr(self) -> str:
        return f"decay={self.decay:g}"


class BEMA(_Averaged):
    """Bias-corrected EMA (Block et al. 2025); the formula and defaults are in the module docstring."""

    def __init__(self, model: nn.Module, *, ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10.0,
                 multiplier: float = 1.0, update_after: int = 0, update_every: int = 1) -> None:
        check_number("ema_power", ema_power, lo=0.0)
        check_number("bias_power", bias_power, lo=0.0)
        check_number("lag", lag, lo=1.0)  # rho >= 1 keeps beta_t and alpha_t in (0, 1]
        check_number("multiplier", multiplier, lo=0.0, lo_open=True)
        super().__init__(model, update_after, update_every)
        self.ema_power, self.bias_power = float(ema_power), float(bias_power)
        self.lag, self.multiplier = float(lag), float(multiplier)

    def beta(self, t: int) -> float:
        """The EMA weight ``(rho + gamma t) ** -kappa`` at update ``t``."""
        return (self.lag + self.multiplier * t) ** -self.ema_power

    def alpha(self, t: int) -> float:
        """The bias correction ``(rho + gamma t) ** -eta`` at update ``t``."""
        return (self.lag + self.multiplier * t) ** -self.bias_power

    def _weight(self, t: int) -> float:
        return self.beta(t)

    def _combine(self, t: int, i: int, theta: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t)
        if a == 0.0 or not math.isfinite(a):
            return self._ema(i)
        return self._ema(i) + a * (theta.to(self._ema(i).dtype) - self._theta0(i))

    def extra_repr(self) -> str:
        return (f"ema_power={self.ema_power:g}, bias_power={self.bias_power:g}, lag={self.lag:g}, "
                f"multiplier={self.multiplier:g}")
