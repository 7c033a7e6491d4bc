"""The trading study's per-head features for the nested optimizer's controller.

A multi-horizon model has one output head per horizon; a param group that carries
``group["head"] = k`` belongs to head ``k``. :class:`HeadFeatures` gives such a group head ``k``'s
loss relative to the mean head loss, its AUC - 0.5 and its gradient norm relative to the mean,
from the ``head_stats`` keyword of ``NestedOptimizer.step``::

    opt = NestedOptimizer(groups, features=(*DEFAULT_FEATURES, HeadFeatures()))
    opt.step(closure, head_stats={"loss": [...], "auc": [...]})   # or a function returning it

Any key may be left out; a missing ``grad_norm`` is the head group's own gradient RMS. Groups that
are not heads, and steps without ``head_stats``, keep the last values (zeros at first).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..optim.nested import Feature, StepView
from ..optim.nested.features import TINY as _TINY


class HeadFeatures(Feature):
    name = "heads"
    width = 3
    reads = "head_stats"

    def __init__(self) -> None:
        self.rows = torch.zeros(0, 3)

    def add_group(self) -> None:
        self.rows = torch.cat([self.rows, torch.zeros(1, 3)])

    def values(self, view: StepView) -> list[list[float]]:
        stats = view.inputs.get("head_stats")
        if stats is not None:
            out = torch.zeros(len(view.groups), 3)
            losses = list(stats.get("loss", ()))
            aucs = list(stats.get("auc", ()))
            gns = list(stats.get("grad_norm", ()))
            head_groups = [(i, g["head"]) for i, g in enumerate(view.groups) if "head" in g]
            if not gns:  # the head's own group's gradient RMS
                gns = [0.0] * (1 + max((h for _, h in head_groups), default=-1))
                for i, h in head_groups:
                    gns[h] = view.g_rms[i]
            mean_l = sum(losses) / len(losses) if losses else 1.0
            mean_g = sum(gns) / len(gns) if gns else 1.0
            for i, h in head_groups:
                if h < len(losses):
                    out[i, 0] = math.log(max(losses[h], _TINY) / max(mean_l, _TINY))
                if h < len(aucs):
                    out[i, 1] = aucs[h] - 0.5
                if h < len(gns):
                    out[i, 2] = math.log(max(gns[h], _TINY) / max(mean_g, _TINY))
            self.rows = out
        return self.rows.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.rows = state["rows"].clone()
