"""What the nested optimizer's controller reads: one feature vector per param group.

A :class:`Feature` has a ``name``, a ``width`` (columns per group) and ``values(view)``: one row of
``width`` floats per group. ``raw = True`` features are already on a fixed scale and skip the
running standardisation. A feature may keep state (``state_dict``/``load_state_dict``, saved in
the optimizer's ``state_dict``), and ``update(view, have)`` runs before ``values`` on every step
that reaches the controller. Built-in features are named by strings (:data:`FEATURES`); any other
is passed as an object, e.g. the trading study's per-head features
(:class:`nestopt.studies.head_features.HeadFeatures`), which read a keyword that the caller gives
``step`` (its ``reads``).
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import is_dtensor
from ..tensors import host_sq_norms

TINY = 1e-30


def _log(x: float) -> float:
    return math.log(max(x, TINY))


@dataclass
class StepView:
    """What a feature may read at one step."""

    groups: list[dict[str, Any]]
    g_rms: list[float]  # exact RMS of each group's gradient
    param_rms: list[float]  # from the strided sample, refreshed every ``stats_every`` steps
    update_ratio: list[float]  # ||delta p|| / ||p|| of the last sampled update
    loss: LossTracker
    val: dict[str, Any]
    mult_scale: float  # max(-log lo, log hi): the ``mult`` feature's unit
    inputs: dict[str, Any] = field(default_factory=dict)  # keywords given to ``step`` for features


class Feature(abc.ABC):
    name = ""
    width = 1
    raw = False  # True: seen as it is, not standardised
    reads: str | None = None  # a keyword of ``NestedOptimizer.step`` this feature takes

    def add_group(self) -> None:
        """A param group was added."""

    def update(self, view: StepView, have: list[list[torch.Tensor]]) -> None:
        """Runs before :meth:`values` on each step that reaches the controller. It may replace the
        tensors, arrays and lists it keeps (as attributes) but must not write into them in place:
        a step that fails after it ran puts the feature's attributes back as they were, keeping
        references rather than copies. Work that must write in place goes in :meth:`commit`."""

    def commit(self) -> None:
        """Runs when the step is sure to be taken, right before the base optimizer's update (the
        parameters and gradients are still the ones :meth:`update` saw)."""

    @abc.abstractmethod
    def values(self, view: StepView) -> list[list[float]]:
        """One row of ``width`` floats per group."""

    def cache_numel(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        pass


class GradNorm(Feature):
    """log RMS of the group's gradient (RMS, not norm: independent of group size)."""

    name = "grad_norm"

    def values(self, view: StepView) -> list[list[float]]:
        return [[_log(r)] for r in view.g_rms]


class ParamNorm(Feature):
    """log RMS of the group's parameters before the last sampled step."""

    name = "param_norm"

    def values(self, view: StepView) -> list[list[float]]:
        return [[_log(r)] for r in view.param_rms]


class Depth(Feature):
    """Relative depth: group index / (number of groups - 1), or ``group["depth"]``."""

    name = "depth"
    raw = True

    def values(self, view: StepView) -> list[list[float]]:
        G = len(view.groups)
        return [[float(g.get("depth", i / max(G - 1, 1)))] for i, g in enumerate(view.groups)]


class UpdateRatio(Feature):
    """log(||delta p|| / ||p||) of the last sampled update."""

    name = "update_ratio"

    def values(self, view: StepView) -> list[list[float]]:
        return [[_log(r)] for r in view.update_ratio]


class Loss(Feature):
    """Relative training-loss change and its moving average (shared by the groups)."""

    name = "loss"
    width = 2

    def values(self, view: StepView) -> list[list[float]]:
        return [[view.loss.dl, view.loss.dloss_ema]] * len(view.groups)


class Val(Feature):
    """Relative validation-loss change, train/validation gap, distance from the validation EMA."""

    name = "val"
    width = 3

    def values(self, view: StepView) -> list[list[float]]:
        v = view.val
        return [[v["delta"], v["gap"], v["dev"]]] * len(view.groups)


class Mult(Feature):
    """The group's current multiplier, ``log m / max(-log lo, log hi)`` (in [-1, 1])."""

    name = "mult"
    raw = True

    def values(self, view: StepView) -> list[list[float]]:
        return [[math.log(g["nested_mult"]) / view.mult_scale] for g in view.groups]


class Curvature(Feature):
    """log of the secant curvature ||g_t - g_{t-1}|| / ||p_t - p_{t-1}|| (keeps the previous
    gradient and parameters: 2 floats per parameter)."""

    name = "curvature"

    def __init__(self) -> None:
        self.curv: list[float] = []
        self.prev_grad: list[torch.Tensor] = []
        self.prev_param: list[torch.Tensor] = []
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # this step's, for commit

    def add_group(self) -> None:
        self.curv.append(0.0)
        self.prev_grad, self.prev_param = [], []

    def update(self, view: StepView, have: list[list[torch.Tensor]]) -> None:
        ps = [p for grp in have for p in grp]
        if any(is_dtensor(p) for p in ps):
            raise NotImplementedError("NestedOptimizer's 'curvature' feature does not support FSDP2 (DTensor) "
                                      "parameters; see the README's 'Scaling out' table: use DDP for it")
        gs = [p.grad for p in ps]
        if self.prev_grad and len(self.prev_grad) == len(ps):
            dg = torch._foreach_sub(gs, self.prev_grad)
            dp = torch._foreach_sub(ps, self.prev_param)
            n, off = len(ps), 0
            host, _ = host_sq_norms([*dg, *dp])
            for i, grp in enumerate(have):
                k = len(grp)
                a, b = sum(host[off:off + k]), sum(host[n + off:n + off + k])
                self.curv[i] = math.sqrt(a / b) if b > 0 else self.curv[i]
                off += k
        self.pending = (gs, ps)  # kept at commit, when the step is sure to be taken

    def commit(self) -> None:
        if self.pending is None:
            return
        gs, ps = self.pending
        self.pending = None
        if self.prev_grad and len(self.prev_grad) == len(gs):
            torch._foreach_copy_(self.prev_grad, gs)  # into the buffers kept: no new memory
            torch._foreach_copy_(self.prev_param, ps)
        else:
            self.prev_grad = [g.detach().clone() for g in gs]
            self.prev_param = [p.detach().clone() for p in ps]

    def values(self, view: StepView) -> list[list[float]]:
        return [[_log(c)] for c in self.curv]

    def cache_numel(self) -> int:
        return sum(t.numel() for t in (*self.prev_grad, *self.prev_param))

    def state_dict(self) -> dict[str, Any]:
        return {"curv": list(self.curv), "prev_grad": [t.clone() for t in self.prev_grad],
                "prev_param": [t.clone() for t in self.prev_param]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.pending = None
        self.curv = list(state["curv"])
        self.prev_grad = [t.to(device).clone() for t in state["prev_grad"]]
        self.prev_param = [t.to(device).clone() for t in state["prev_param"]]


BUILTIN: dict[str, type[Feature]] = {c.name: c for c in (GradNorm, ParamNorm, Depth, UpdateRatio, Loss, Val,
                                                         Curvature, Mult)}
FEATURES: dict[str, int] = {k: c.width for k, c in BUILTIN.items()}  # built-in name -> columns
DEFAULT_FEATURES = ("grad_norm", "param_norm", "depth", "update_ratio", "loss", "val")


class LossTracker:
    """The training loss's relative change ``dl``, its EMA and the loss's own EMA (the ``loss``
    feature and the validation gap read them)."""

    def __init__(self) -> None:
        self.prev: float | None = None
        self.ema: float | None = None
        self.dloss_ema = 0.0
        self.dl = 0.0

    def observe(self, loss_v: float | None) -> None:
        if loss_v is None:
            self.dl = 0.0
            return
        self.dl = 0.0 if self.prev is None else (loss_v - self.prev) / max(abs(self.ema or loss_v), 1e-12)
        self.dloss_ema = 0.9 * self.dloss_ema + 0.1 * self.dl
        self.prev = loss_v
        self.ema = loss_v if self.ema is None else 0.95 * self.ema + 0.05 * loss_v

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev, "ema": self.ema, "dloss_ema": self.dloss_ema}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.prev, self.ema, self.dloss_ema = st["prev"], st["ema"], st["dloss_ema"]


def make_features(features: Sequence[str | Feature]) -> list[Feature]:
    """Feature objects for names from :data:`FEATURES` or :class:`Feature` instances; a
    ``ValueError`` names an unknown name (with the valid ones) or a name given twice."""
    if isinstance(features, str | Feature) or not isinstance(features, Sequence | tuple | list):
        raise ValueError(f"features={features!r} is invalid: expected a list of feature names "
                         f"({', '.join(BUILTIN)}) or nestopt.optim.nested.Feature objects")
    out: list[Feature] = []
    for f in features:
        if isinstance(f, Feature):
            out.append(copy.deepcopy(f))  # its own copy: a feature's state belongs to one optimizer
        elif isinstance(f, str) and f in BUILTIN:
            out.append(BUILTIN[f]())
        else:
            raise ValueError(f"features={f!r} is invalid: expected one of {', '.join(BUILTIN)}, or a "
                             "nestopt.optim.nested.Feature")
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"features={names!r} is invalid: a name appears twice")
    return out
