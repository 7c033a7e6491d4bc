"""The signals that train the nested optimizer's controller: one object per signal.

Each signal sees the step at fixed points (see :class:`Signal`) and keeps its own state
(``state_dict``/``load_state_dict``), which the optimizer saves inside its own ``state_dict``.
``"frozen"`` trains nothing; ``"proxy"`` and ``"validation"`` are REINFORCE on an explored
log-multiplier; ``"hindsight"`` (:mod:`.hindsight`) replays the last steps with other multipliers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..transaction import current, enter

if TYPE_CHECKING:
    from .optimizer import NestedOptimizer


def train_controller(opt: NestedOptimizer, loss_fn: Callable[[], torch.Tensor]) -> None:
    """One Adam step of the controller on ``loss_fn()``; a non-finite loss or gradient skips it
    (``counters["controller_skipped"]``)."""
    opt.keep_controller()  # a step that fails later puts the controller back
    txn = current(opt)
    before = None if txn is None else txn.phase
    enter(opt, f"the controller update ({opt.signal})")
    _train_once(opt, loss_fn)
    if txn is not None:
        txn.enter(before)


def _train_once(opt: NestedOptimizer, loss_fn: Callable[[], torch.Tensor]) -> None:
    with torch.enable_grad():
        opt.controller_opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not bool(torch.isfinite(loss)):
            opt.count("controller_skipped")
            return
        loss.backward()
    grads = [p.grad for p in opt.controller.parameters() if p.grad is not None]
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        opt.count("controller_skipped")
        return
    opt.controller_opt.step()
    opt.count("controller_updates")


class Signal:
    """The hooks a signal gets, in the order a step calls them."""

    name = ""
    needs_closure = False  # step() must be given the closure
    needs_loss = False  # step() must be given the loss (closure or loss=)
    trains = True  # False: the controller's inputs need not be kept as tensors
    scale = 1.0  # a factor shared by the groups on top of the controller's multipliers

    def before_features(self, opt: NestedOptimizer, loss_v: float | None) -> None:
        """After the non-finite check, before the features are read."""

    def replay(self, opt: NestedOptimizer, closure: Any, loss_v: float | None, params: list[torch.Tensor]) -> None:
        """After the features, before the controller's forward pass."""

    def noise(self, opt: NestedOptimizer, n: int, xt: torch.Tensor | None, mem_in: torch.Tensor) -> torch.Tensor | None:
        """Exploration noise on the log multipliers (``None``: none)."""
        return None

    def after_decision(self, opt: NestedOptimizer, loss_v: float | None, xt: torch.Tensor | None,
                       mem_in: torch.Tensor, own: list[float], mults: list[float], noise: torch.Tensor | None,
                       params: list[torch.Tensor]) -> None:
        """Before the base step, with the controller's multipliers ``own`` and the ones stepped with."""

    def on_validation(self, opt: NestedOptimizer, prev: float | None, v: float, scale: float) -> None:
        """From :meth:`NestedOptimizer.observe_validation`."""

    def cache_numel(self) -> int:
        return 0

    def reset(self) -> None:
        """The param groups changed: drop caches that hold one entry per parameter."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], params: list[torch.Tensor]) -> None:
        pass


class Frozen(Signal):
    """No training: the controller's weights stay as given."""

    name = "frozen"
    trains = False


class _Reinforce(Signal):
    """REINFORCE with a running baseline: push the mean log multiplier toward the explored one
    when the reward beat its running average."""

    def __init__(self, explore: float, seed: int) -> None:
        self.explore = explore
        self.gen = torch.Generator().manual_seed(seed)
        self.baseline = {"mean": 0.0, "sq": 1.0, "n": 0}

    def reinforce(self, opt: NestedOptimizer, reward: float, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                  noise: torch.Tensor | None) -> None:
        if noise is None or not math.isfinite(reward):
            return
        b = self.baseline
        b["n"] += 1
        adv = reward - b["mean"]
        std = math.sqrt(max(b["sq"] - b["mean"] ** 2, 1e-12)) if b["n"] > 1 else max(abs(reward), 1e-12)
        b["mean"] = 0.9 * b["mean"] + 0.1 * reward
        b["sq"] = 0.9 * b["sq"] + 0.1 * reward * reward
        adv = max(min(adv / std, 3.0), -3.0)
        coef = (adv * noise / max(self.explore, 1e-12)).detach()

        def loss_fn() -> torch.Tensor:
            total = torch.zeros(())
            for x, mem in inputs:
                z, _ = opt.controller(x, mem if opt.controller.scratchpad else None)
                total = total - (coef * opt.range.to_log_mult(z)).sum()
            return total / len(inputs)

        train_controller(opt, loss_fn)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "baseline": dict(self.baseline)}

    def load_state_dict(self, state: dict[str, Any], params: list[torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])
        self.baseline = dict(state["baseline"])


class Proxy(_Reinforce):
    """The multiplier is explored (log-normal noise) and reinforced when the training loss fell
    more than its running average over the next step."""

    name = "proxy"
    needs_loss = True

    def __init__(self, explore: float, seed: int) -> None:
        super().__init__(explore, seed)
        self.pending: dict[str, Any] | None = None  # the last action, rewarded next step

    def before_features(self, opt: NestedOptimizer, loss_v: float | None) -> None:
        if self.pending is not None and loss_v is not None:
            prev = self.pending
            reward = (prev["loss"] - loss_v) / max(abs(prev["loss"]), 1e-12)
            self.reinforce(opt, reward, [(prev["x"], prev["mem"])], prev["noise"])

    def noise(self, opt: NestedOptimizer, n: int, xt: torch.Tensor | None, mem_in: torch.Tensor) -> torch.Tensor | None:
        return torch.randn(n, generator=self.gen) if self.explore > 0 else None

    def after_decision(self, opt: NestedOptimizer, loss_v: float | None, xt: torch.Tensor | None,
                       mem_in: torch.Tensor, own: list[float], mults: list[float], noise: torch.Tensor | None,
                       params: list[torch.Tensor]) -> None:
        if loss_v is not None:
            self.pending = {"loss": loss_v, "x": xt, "mem": mem_in.clone(), "noise": noise}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending": copy.deepcopy(self.pending)}

    def load_state_dict(self, state: dict[str, Any], params: list[torch.Tensor]) -> None:
        super().load_state_dict(state, params)
        self.pending = copy.deepcopy(state["pending"])


class Validation(_Reinforce):
    """REINFORCE with the reward "did the validation loss improve", one exploration draw held over
    each interval between ``observe_validation`` calls."""

    name = "validation"

    def __init__(self, explore: float, seed: int) -> None:
        super().__init__(explore, seed)
        self.held: torch.Tensor | None = None
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def noise(self, opt: NestedOptimizer, n: int, xt: torch.Tensor | None, mem_in: torch.Tensor) -> torch.Tensor | None:
        if self.explore <= 0:
            return None
        if self.held is None:
            self.held = torch.randn(n, generator=self.gen)
        if len(self.inputs) < 64:
            self.inputs.append((xt, mem_in.clone()))  # type: ignore[arg-type]
        return self.held

    def on_validation(self, opt: NestedOptimizer, prev: float | None, v: float, scale: float) -> None:
        if prev is not None and self.held is not None and self.inputs:
            self.reinforce(opt, (prev - v) / scale, self.inputs, self.held)
        self.inputs = []
        self.held = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "held": None if self.held is None else self.held.clone(),
                "inputs": copy.deepcopy(self.inputs)}

    def load_state_dict(self, state: dict[str, Any], params: list[torch.Tensor]) -> None:
        super().load_state_dict(state, params)
        self.held = None if state["held"] is None else state["held"].clone()
        self.inputs = copy.deepcopy(state["inputs"])


def noisy(logm: np.ndarray, noise: torch.Tensor | None, explore: float, lo: float, hi: float) -> np.ndarray:
    """``logm`` plus the exploration noise, clipped to the range."""
    if noise is None:
        return logm
    return np.clip(logm + explore * noise.double().numpy(), lo, hi)
