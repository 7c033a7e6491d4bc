"""The research note's trading signals as nested-optimizer features, one idea each, so each can be
switched off (and is ablated by ``nestopt study refit``).

Each reads the ``trading`` keyword of ``NestedOptimizer.step``: the dict of
:meth:`nestopt.tasks.DailyTradingTask.monitor_stats` (or a function returning it, or ``None`` on
steps that do not refresh it: the feature keeps its last values, zeros at first). A param group
with ``group["head"] = k`` belongs to horizon head ``k``; per-head features give other groups 0.

============  ======================================================================================
``head_loss``  head ``k``'s loss relative to the mean head loss (log ratio)
``head_auc``   head ``k``'s AUC - 0.5
``head_grad``  head ``k``'s gradient RMS relative to the mean over heads (log ratio; needs no stats)
``alignment``  the correlation of head ``k``'s prediction with its label ("oracle alignment");
               non-head groups get the mean over heads
``regime``     the market-regime estimate from recent returns (2 columns, every group)
``pnl``        the simulated PnL of the heads' position rule on recent data (every group)
============  ======================================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...optim.nested import Feature, StepView
from ...optim.nested.features import TINY


class _Trading(Feature):
    reads = "trading"

    def __init__(self) -> None:
        self.rows = torch.zeros(0, self.width)

    def add_group(self) -> None:
        self.rows = torch.cat([self.rows, torch.zeros(1, self.width)])

    def values(self, view: StepView) -> list[list[float]]:
        stats = view.inputs.get("trading")
        if stats is not None or self.always:
            self.rows = torch.tensor(self.compute(view, stats or {}), dtype=torch.float32).reshape(len(view.groups),
                                                                                                   self.width)
        return self.rows.tolist()

    always = False  # computed every step (from the view), not only when stats come

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.rows = state["rows"].clone()


def _per_head(view: StepView, values: list[float], other: float = 0.0) -> list[list[float]]:
    return [[values[g["head"]] if "head" in g and g["head"] < len(values) else other] for g in view.groups]


def _log_rel(values: list[float]) -> list[float]:
    mean = sum(values) / len(values) if values else 1.0
    return [math.log(max(v, TINY) / max(mean, TINY)) for v in values]


class HeadLoss(_Trading):
    name = "head_loss"

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        return _per_head(view, _log_rel(list(stats.get("loss", ()))))


class HeadAUC(_Trading):
    name = "head_auc"

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        return _per_head(view, [a - 0.5 for a in stats.get("auc", ())])


class HeadGrad(_Trading):
    name = "head_grad"
    always = True

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        heads = [(i, g["head"]) for i, g in enumerate(view.groups) if "head" in g]
        values = [0.0] * (1 + max((h for _, h in heads), default=-1))
        for i, h in heads:
            values[h] = view.g_rms[i]
        return _per_head(view, _log_rel(values))


class Alignment(_Trading):
    name = "alignment"

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        values = list(stats.get("alignment", ()))
        return _per_head(view, values, sum(values) / len(values) if values else 0.0)


class Regime(_Trading):
    name = "regime"
    width = 2

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        r = list(stats.get("regime", (0.0, 0.0)))[:2]
        return [r for _ in view.groups]


class PnL(_Trading):
    name = "pnl"

    def compute(self, view: StepView, stats: dict[str, Any]) -> list[list[float]]:
        return [[float(stats.get("pnl", (0.0,))[0])] for _ in view.groups]


TRADING_FEATURES: dict[str, type[_Trading]] = {c.name: c for c in (HeadLoss, HeadAUC, HeadGrad, Alignment, Regime, PnL)}


def trading_features(names: tuple[str, ...]) -> list[Feature]:
    """Fresh feature objects for ``names`` (each a key of :data:`TRADING_FEATURES`)."""
    unknown = [n for n in names if n not in TRADING_FEATURES]
    if unknown:
        raise ValueError(f"features={unknown!r} are invalid: expected names from {', '.join(TRADING_FEATURES)}")
    return [TRADING_FEATURES[n]() for n in names]
