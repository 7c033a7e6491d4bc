"""The digits split and the small MLPs the hypergradient study trains."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with ``seed`` for the block (modules' initialisers, dropout and
    ``torch.randn`` without a generator draw from it), and as it was before afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def digits_split(seed: int = 0) -> dict[str, torch.Tensor]:
    """200 train / 400 validation / the remaining 1,197 test digits (a fixed shuffle per seed)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y)[perm]
    return {"xt": x[:200], "yt": y[:200], "xv": x[200:600], "yv": y[200:600], "xs": x[600:], "ys": y[600:]}


def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``net``'s parameters by name (an initialisation to restart from)."""
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def mlp(sizes: tuple[int, ...], seed: int) -> torch.nn.Sequential:
    """A tanh MLP of these layer sizes, initialised from ``seed``."""
    layers: list[torch.nn.Module] = []
    with seeded(seed):
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i + 2 < len(sizes):
                layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)
