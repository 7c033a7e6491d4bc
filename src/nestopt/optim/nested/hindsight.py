"""The hindsight signal: every ``period`` steps, the last ``window`` steps are replayed from a
snapshot with each multiplier of ``grid`` on top of the multipliers used, each replay scored by
the closure's loss on the current batch, and the controller trained toward the best one.

Replays re-apply the window's cached gradients through the base optimizer's update itself: no
extra forward or backward pass for the replayed steps, and no step hook fires for them (a replay
is not a step of the user's; :func:`~.wrapper.call_step_unhooked`). See the
:class:`~nestopt.optim.NestedOptimizer` docstring for labels, ``label_shift`` and ``follow``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from .signals import Signal, train_controller
from ..distributed import mean_values
from ..transaction import enter
from .wrapper import call_step_unhooked

if TYPE_CHECKING:
    from .optimizer import NestedOptimizer


def hindsight_label(scores: dict[float, float], shift: float = 1.0) -> float:
    """The grid multiplier a hindsight replay labels: the one whose replay ended lowest (ties go to
    the one nearest 1), or, with ``shift != 1``, the grid point nearest ``shift`` times it on a log
    scale (ties to the smaller). ``shift > 1`` leans against the short-horizon bias of a greedy
    label; a replay that ended non-finite never wins."""
    grid = list(scores)
    best = min(grid, key=lambda m: (scores[m], abs(math.log(m))))
    if shift != 1.0 and math.isfinite(scores[best]):
        best = min(grid, key=lambda m: (abs(math.log(m) - math.log(shift * best)), m))
    return best


def snapshot(base: Optimizer, params: list[torch.Tensor], keep: str = "nested_counters") -> dict[str, Any]:
    """Copies of the parameters, the base optimizer's per-parameter state and its group fields
    (all but ``keep``, which a restore leaves as it is: the replays' own counts)."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in base.state[p].items()}
                  if p in base.state else None for p in params],
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", keep)} for g in base.param_groups],
    }


def restore(base: Optimizer, params: list[torch.Tensor], snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for p, q in zip(params, snap["params"]):
            p.copy_(q)
    for p, st in zip(params, snap["state"]):
        if st is None:
            base.state.pop(p, None)
            continue
        cur = base.state[p]
        for k in list(cur):
            if k not in st:
                del cur[k]
        for k, v in st.items():
            if torch.is_tensor(v) and torch.is_tensor(cur.get(k)) and cur[k].shape == v.shape:
                cur[k].copy_(v)
            else:
                cur[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    for g, fields in zip(base.param_groups, snap["groups"]):
        g.update(copy.deepcopy(fields))


def _empty() -> dict[str, Any]:
    return {"snap": None, "grads": [], "lrs": [], "inputs": []}


class Hindsight(Signal):
    name = "hindsight"
    needs_closure = True

    def __init__(self, window: int, period: int, grid: Sequence[float], label_shift: float, follow: float,
                 lo: float, hi: float) -> None:
        self.window, self.period, self.grid = window, period, tuple(grid)
        self.label_shift, self.follow = float(label_shift), float(follow)
        self.lo, self.hi = lo, hi
        self.scale = 1.0  # the share of the labels followed directly (``follow``)
        self.last: dict[str, Any] | None = None  # the last replay's scores and label
        self.w = _empty()

    def reset(self) -> None:
        self.w = _empty()

    def cache_numel(self) -> int:
        w = self.w
        n = sum(g.numel() for row in w["grads"] for g in row if g is not None)
        if w["snap"] is not None:
            n += sum(t.numel() for t in w["snap"]["params"])
            n += sum(v.numel() for st in w["snap"]["state"] if st for v in st.values()
                     if torch.is_tensor(v) and v.numel() > 1)
        return n

    def after_decision(self, opt: NestedOptimizer, loss_v: float | None, xt: torch.Tensor | None,
                       mem_in: torch.Tensor, own: list[float], mults: list[float], noise: torch.Tensor | None,
                       params: list[torch.Tensor]) -> None:
        """Before the base step of step ``t``: open a window or add this step to it. ``own``: the
        controller's multipliers; ``mults``: the ones stepped with (``own`` times the scale)."""
        pos = opt.steps % self.period
        w = self.w
        if pos == self.period - self.window:
            w.update(snap=snapshot(opt.base, params), grads=[], lrs=[], inputs=[])
        if w["snap"] is None:
            return
        w["grads"].append([None if p.grad is None else p.grad.detach().clone() for p in params])
        w["lrs"].append([g["lr"] * m for g, m in zip(opt.param_groups, mults)])
        w["inputs"].append((xt, mem_in.clone(), torch.tensor(own).log()))

    def replay(self, opt: NestedOptimizer, closure: Any, loss_v: float | None, params: list[torch.Tensor]) -> None:
        w = self.w
        if w["snap"] is None or len(w["grads"]) < self.window:
            return
        base = opt.base
        real_grads = [p.grad for p in params]
        now = snapshot(base, params)
        try:
            scores = self._score(opt, closure, loss_v, params)
        finally:  # also when a replay or its closure raises: the step then fails with nothing moved
            restore(base, params, now)
            for p, g in zip(params, real_grads):
                p.grad = g
        opt.count("replays")
        best = hindsight_label(scores, self.label_shift)
        self.last = {"scores": scores, "best": best}
        inputs = w["inputs"]
        w.update(snap=None, grads=[], lrs=[], inputs=[])
        if not math.isfinite(scores[best]):
            return
        if self.follow > 0:  # the scale takes label ** follow; the controller learns the rest
            self.scale = min(max(self.scale * best ** self.follow, self.lo), self.hi)
            if self.follow == 1.0:
                return
        self._train(opt, inputs, best)

    def _score(self, opt: NestedOptimizer, closure: Any, loss_v: float | None,
               params: list[torch.Tensor]) -> dict[float, float]:
        """Each grid multiplier's replay of the window, scored by the closure (parameters, state and
        gradients are left moved: the caller restores them)."""
        w, base, groups = self.w, opt.base, opt.param_groups
        scores: dict[float, float] = {}
        raw: dict[float, float] = {}
        if loss_v is None:  # scored by a scorer: the current parameters too, on its batch
            with torch.enable_grad():
                raw[1.0] = float(closure().detach())
        for m in self.grid:
            if m == 1.0:
                continue
            restore(base, params, w["snap"])
            for grads, lrs in zip(w["grads"], w["lrs"]):
                for p, g in zip(params, grads):
                    p.grad = g
                saved = [g["lr"] for g in groups]
                for g, lr in zip(groups, lrs):
                    g["lr"] = lr * m
                call_step_unhooked(base, opt._raw_base_step)
                for g, lr in zip(groups, saved):
                    g["lr"] = lr
                opt.count("replay_steps")
            for p in params:
                p.grad = None
            enter(opt, f"the hindsight replay's closure (multiplier {m})")
            with torch.enable_grad():
                raw[m] = float(closure().detach())
            opt.count("replay_closures")
        # each rank scored its own batch: the ranks' mean decides (one collective per replay)
        means = dict(zip(raw, mean_values(opt, list(raw.values()))))
        for m in self.grid:
            val = loss_v if m == 1.0 and loss_v is not None else means[m]
            scores[m] = val if math.isfinite(val) else math.inf
        return scores

    def _train(self, opt: NestedOptimizer, inputs: list[Any], best: float) -> None:
        """Cross-entropy toward the label's grid point, relative to the multipliers used."""
        log_grid = (1.0 - self.follow) * torch.tensor([math.log(m) for m in self.grid])
        label = self.grid.index(best)
        tau = 0.5
        rng = opt.range

        def loss_fn() -> torch.Tensor:
            total = torch.zeros(())
            for x, mem, logm_used in inputs:
                z, _ = opt.controller(x, mem if opt.controller.scratchpad else None)
                mu = rng.to_log_mult(z)  # (G,)
                centres = (logm_used[:, None] + log_grid[None, :]).clamp(rng.log_lo, rng.log_hi)
                logits = -((mu[:, None] - centres) ** 2) / (2 * tau * tau)
                total = total + nn.functional.cross_entropy(logits, torch.full((len(mu),), label))
            return total / len(inputs)

        for _ in range(4):
            train_controller(opt, loss_fn)

    def state_dict(self) -> dict[str, Any]:
        w = self.w
        return {
            "scale": self.scale,
            "window": {
                "snap": None if w["snap"] is None else {
                    "params": [t.clone() for t in w["snap"]["params"]],
                    "state": copy.deepcopy(w["snap"]["state"]),
                    "groups": copy.deepcopy(w["snap"]["groups"])},
                "grads": [[None if g is None else g.clone() for g in row] for row in w["grads"]],
                "lrs": copy.deepcopy(w["lrs"]),
                "inputs": copy.deepcopy(w["inputs"]),
            },
        }

    def load_state_dict(self, state: dict[str, Any], params: list[torch.Tensor]) -> None:
        self.scale = float(state.get("scale", 1.0))  # absent from state saved before ``follow`` existed
        w = state["window"]
        snap = None
        if w["snap"] is not None:
            snap = {"params": [t.to(p.device).clone() for t, p in zip(w["snap"]["params"], params)],
                    "state": [None if st is None else {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v)
                                                        for k, v in copy.deepcopy(st).items()}
                              for st, p in zip(w["snap"]["state"], params)],
                    "groups": copy.deepcopy(w["snap"]["groups"])}
        self.w = {"snap": snap,
                  "grads": [[None if g is None else g.to(p.device).clone() for g, p in zip(row, params)]
                            for row in w["grads"]],
                  "lrs": copy.deepcopy(w["lrs"]), "inputs": copy.deepcopy(w["inputs"])}
