"""Meta-training on the past days' refits, and its cache.

- The learned optimizer: :func:`nestopt.meta.meta_train` on ``FAMILY@LO:HI`` (what
  ``nestopt meta-train --family FAMILY --days LO:HI --steps N --horizon H`` runs), the hybrid
  network, truncated backpropagation.
- The nested controllers: the same meta-trainer with ES, on :class:`RefitControllerInner` runs: a
  past day's refit by ``NestedOptimizer`` (AdamW at the tuned-once rate, one group per module,
  the heads marked) with the trading features it is made for, fed ``monitor_stats`` every
  ``STATS_EVERY`` steps. One controller per feature set (all, and each one left out).

A cache folder keeps each network under a name that hashes its settings (and the study's code
does not enter it: delete the folder after changing the code); a run that finds the file loads
it and says so, and its meta-training time is the one stored with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ... import tasks as task_registry
from ..._io import atomic_path
from ...meta import ES, MetaConfig, meta_train
from ...meta.inner import CONTROLLER_LRS, _ControllerInner
from .strategies import BASE_FEATURES, STATS_EVERY, _groups
from .features import trading_features


class RefitControllerInner(_ControllerInner):
    """A past day's refit by ``NestedOptimizer`` with the trading features, for ES."""

    def __init__(self, net: Any, family: str, seed: int, lr: float, trading: tuple[str, ...]) -> None:
        from ...optim.nested import NestedOptimizer

        self.family, self.seed, self.lr = family, seed, lr
        self.task = task_registry.family(family).sample(seed)
        self.model = self.task.init(seed)
        self.trading = trading
        feats = [*BASE_FEATURES, *trading_features(trading)]
        self.opt = NestedOptimizer(_groups(self.model), torch.optim.AdamW, controller=net, signal="frozen",
                                   features=feats, lr=lr, weight_decay=0.01, fused=True)
        self.next_batch = self.task.sampler(seed)
        self.t = 0
        self.loss0: float | None = None
        self.name = getattr(self.task, "name", family)
        self._stats = trading and hasattr(self.task, "monitor_stats")

    def step_inputs(self) -> dict[str, Any]:
        if not self._stats:
            return {}
        return {"trading": self.task.monitor_stats(self.model) if self.t % STATS_EVERY == 0 else None}


class RefitES(ES):
    """ES whose inner runs are :class:`RefitControllerInner` refits."""

    def __init__(self, lr: float, trading: tuple[str, ...], sigma: float, pairs: int) -> None:
        super().__init__(sigma=sigma, pairs=pairs)
        self.lr, self.trading = lr, trading
        self.name = "es"

    def new_task(self, net: torch.nn.Module, family: str, seed: int) -> RefitControllerInner:
        return RefitControllerInner(net, family, seed, self.lr, self.trading)


def _key(kind: str, settings: dict[str, Any]) -> str:
    return f"{kind}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"


def _cached(cache: Path | None, name: str) -> Path | None:
    if cache is None:
        return None
    path = cache / f"{name}.safetensors"
    return path if path.is_file() else None


def _store(net: torch.nn.Module, path: Path, meta: dict[str, Any]) -> None:
    from ...nets import save_net

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_net(net, tmp, meta=meta)


def learned(out: Path, cache: Path | None, family: str, days: tuple[int, int], steps: int, horizon: int,
            unroll: int = 20, seed: int = 0) -> dict[str, Any]:
    """Meta-train (or load) the hybrid network on the past days; its file path, seconds and history."""
    from ...meta import HybridAdamNet
    from ...nets import net_metadata

    spec = f"{family}@{days[0]}:{days[1]}"
    settings = {"family": spec, "steps": steps, "horizon": horizon, "unroll": unroll, "seed": seed, "net": "hybrid"}
    name = _key("learned", settings)
    hit = _cached(cache, name)
    command = (f"nestopt meta-train --family {family} --days {days[0]}:{days[1]} --steps {steps} "
               f"--horizon {horizon} --unroll {unroll} --out DIR")
    if hit is not None:
        meta = net_metadata(hit)
        return {"path": str(hit), "seconds": meta["seconds"], "history": meta["history"], "cached": True,
                "command": command}
    net = HybridAdamNet()
    t0 = time.perf_counter()
    history = meta_train(net, MetaConfig(families=(spec,), unroll=unroll, horizon=horizon, outer_steps=steps,
                                         seed=seed, checkpoint_every=10**9))
    seconds = time.perf_counter() - t0
    meta = {"command": command, "config": settings, "seconds": round(seconds, 1),
            "history": [[h["step"], round(h["meta_loss"], 5)] for h in history]}
    path = (cache or out) / f"{name}.safetensors"
    _store(net, path, meta)
    return {"path": str(path), "seconds": seconds, "history": meta["history"], "cached": False, "command": command}


def controller(out: Path, cache: Path | None, family: str, days: tuple[int, int], trading: tuple[str, ...],
               lr: float, steps: int, horizon: int, unroll: int = 20, pairs: int = 4, sigma: float = 0.05,
               hidden: int = 8, seed: int = 0) -> dict[str, Any]:
    """Meta-train (or load) one nested controller reading ``BASE_FEATURES`` and ``trading``."""
    from ...nets import Controller, net_metadata
    from ...optim.nested import FEATURES

    if not (CONTROLLER_LRS[0] <= lr <= CONTROLLER_LRS[1]) or not math.isfinite(lr):
        raise ValueError(f"lr={lr!r} is invalid: expected a rate from {CONTROLLER_LRS[0]:g} to {CONTROLLER_LRS[1]:g}")
    spec = f"{family}@{days[0]}:{days[1]}"
    settings = {"family": spec, "trading": list(trading), "lr": lr, "steps": steps, "horizon": horizon,
                "unroll": unroll, "pairs": pairs, "sigma": sigma, "hidden": hidden, "seed": seed}
    name = _key("controller", settings)
    hit = _cached(cache, name)
    if hit is not None:
        meta = net_metadata(hit)
        return {"path": str(hit), "seconds": meta["seconds"], "history": meta["history"], "cached": True}
    feats = trading_features(trading)
    names = (*BASE_FEATURES, *(f.name for f in feats))
    width = sum(FEATURES[f] for f in BASE_FEATURES) + sum(f.width for f in feats)
    net = Controller(width, hidden=hidden, features=names, seed=seed)
    t0 = time.perf_counter()
    history = meta_train(net, MetaConfig(families=(spec,), unroll=unroll, horizon=horizon, outer_steps=steps,
                                         seed=seed, checkpoint_every=10**9,
                                         method=RefitES(lr, trading, sigma=sigma, pairs=pairs)))
    seconds = time.perf_counter() - t0
    meta = {"config": settings, "seconds": round(seconds, 1),
            "history": [[h["step"], round(h["meta_loss"], 5)] for h in history]}
    path = (cache or out) / f"{name}.safetensors"
    _store(net, path, meta)
    return {"path": str(path), "seconds": seconds, "history": meta["history"], "cached": False}
