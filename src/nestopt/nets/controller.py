"""The nested optimizer's controller network and its feature normaliser.

:class:`Controller` maps a ``(groups, n_features)`` feature matrix to one raw output per group;
:class:`~nestopt.optim.nested.NestedOptimizer` turns the output into a bounded learning-rate
multiplier. It has a torch forward (used to train it) and a NumPy forward with the same weights
(used every optimizer step, where eager torch spends tens of microseconds on each tiny op).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_int


class Controller(nn.Module):
    """Maps a ``(groups, n_features)`` feature matrix to one raw output per group (``z``; the
    optimizer turns it into a multiplier). Shared by all groups; optional per-group memory.

    The last layer is zero-initialised, so ``z = 0`` (multiplier 1) until it is trained.
    """

    kind = "nested-controller"

    def __init__(self, n_features: int, hidden: int = 32, scratchpad: int = 0, seed: int = 0,
                 features: tuple[str, ...] | list[str] | None = None) -> None:
        super().__init__()
        check_int("n_features", n_features, lo=1)
        check_int("hidden", hidden, lo=1)
        check_int("scratchpad", scratchpad, lo=0)
        check_int("seed", seed, lo=0)
        self.n_features, self.hidden, self.scratchpad = n_features, hidden, scratchpad
        # the feature names it reads, when it was made for a given set (a meta-trained controller)
        self.features = tuple(features) if features is not None else None
        with torch.random.fork_rng(devices=[]):  # the same weights for the same seed, whatever the global RNG
            torch.manual_seed(seed)
            self.memory = nn.Linear(n_features + scratchpad, scratchpad) if scratchpad else None
            self.net = nn.Sequential(nn.Linear(n_features + scratchpad, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def config(self) -> dict[str, object]:
        """What :func:`~nestopt.meta.nets.build` needs to rebuild it (saved next to the weights)."""
        return {"kind": self.kind, "n_features": self.n_features, "hidden": self.hidden,
                "scratchpad": self.scratchpad, "features": list(self.features) if self.features is not None else None}

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.memory is not None:
            assert memory is not None
            memory = torch.tanh(self.memory(torch.cat([x, memory], dim=1)))
            x = torch.cat([x, memory], dim=1)
        return self.net(x).squeeze(1), memory

    def forward_numpy(self, x: np.ndarray, memory: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The same map in NumPy (float64), for the optimizer's per-step use: a few microseconds
        where eager torch spends tens on each tiny op. The weights are cached and re-read whenever
        any of them changes (torch's in-place version counter, or new storage set through ``.data``)."""
        # The layers' parameter dicts are looked up once per set of modules (Module attribute
        # access costs microseconds each, which this per-step path pays for nothing).
        net, mem = self.net, self.memory
        key = (mem, *net._modules.values())
        cached = self.__dict__.get("_np_dicts")
        if cached is None or len(cached[0]) != len(key) or any(a is not b for a, b in zip(cached[0], key)):
            mods = ([mem] if mem is not None else []) + [net[0], net[2], net[4]]
            self._np_dicts = cached = (key, mods, [m._parameters for m in mods])
        mods = cached[1]
        tensors = [d[k] for d in cached[2] for k in ("weight", "bias")]
        version = [(id(t), t._version, t.data_ptr()) for t in tensors]
        if self.__dict__.get("_np_version") != version:
            self._np = [(m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy().copy())
                        for m in mods]
            self._np_version = version
        layers = list(self._np)
        if mem is not None:
            assert memory is not None
            w, b = layers.pop(0)
            memory = np.tanh(np.concatenate([x, memory], axis=1) @ w + b)
            x = np.concatenate([x, memory], axis=1)
        (w1, b1), (w2, b2), (w3, b3) = layers
        h = np.tanh(x @ w1 + b1)
        h = np.tanh(h @ w2 + b2)
        return (h @ w3 + b3)[:, 0], memory


_sum0 = np.add.reduce  # what ndarray.sum calls, without its Python-level wrapper


class RunningNorm:
    """Per-column running mean and variance (EMA, bias-corrected), shared across rows (NumPy)."""

    def __init__(self, n: int, beta: float = 0.99) -> None:
        self.beta = beta
        self.mean = np.zeros(n)
        self.sq = np.zeros(n)
        self.count = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # add.reduce / n is what ndarray.mean computes (dividing by one row is exact and skipped),
        # and minimum/maximum what clip does on finite input, without their Python-level wrappers:
        # this runs every optimizer step, where each NumPy call on a tiny array costs 1-3 us.
        self.count += 1
        b, n = self.beta, x.shape[0]
        s, q = _sum0(x, 0), _sum0(x * x, 0)
        if n != 1:
            s, q = s / n, q / n
        self.mean = b * self.mean + (1 - b) * s
        self.sq = b * self.sq + (1 - b) * q
        c = 1 - b**self.count
        mean = self.mean / c
        var = np.maximum(self.sq / c - mean * mean, 0.0)
        return np.minimum(np.maximum((x - mean) / np.sqrt(var + 1e-8), -5.0), 5.0)

    def state(self) -> dict[str, Any]:
        return {"mean": torch.from_numpy(self.mean.copy()), "sq": torch.from_numpy(self.sq.copy()), "count": self.count}

    def load(self, st: dict[str, Any]) -> None:
        self.mean = st["mean"].double().numpy().copy()
        self.sq = st["sq"].double().numpy().copy()
        self.count = int(st["count"])
