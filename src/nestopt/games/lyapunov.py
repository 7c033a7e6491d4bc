r"""The largest Lyapunov exponent of a game's training dynamics.

Training is a map ``z_{t+1} = F(z_t)`` on the joint state ``z`` (every player's parameters and
every optimizer buffer). Its largest Lyapunov exponent

.. math::  \lambda = \lim_{T\to\infty} \frac{1}{T} \log \frac{\|\delta z_T\|}{\|\delta z_0\|}

is the average exponential rate at which nearby trajectories separate: negative where training
contracts to an equilibrium (for a linear update, exactly ``log`` of its spectral radius),
positive where it spirals away or is chaotic. Sweeping a game or optimizer parameter and finding
where ``lambda`` changes sign locates the bifurcations of the dynamics (Lorraine et al., "Lyapunov
exponents for diversity in differentiable games", 2022).

Estimate (Benettin's method): run two copies of the training system, the second displaced by
``delta * max(1, |z|)`` along a random unit direction (relative to the state's size, so a
growing state does not swallow the perturbation); after every update add ``log(d / d0)`` for
their separation ``d`` and pull the second copy back to ``d0`` along the new separation. Far
from an equilibrium a saturating game (a GAN's loss) cycles with an exponent near 0, so start
near the equilibrium to measure its local stability.
The games must be deterministic (both copies must see the same losses); use float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._checks import check_callable, check_int, check_number, check_seed
from ..tasks.games import Game
from .runner import GameStepper

MakeOptimizers = Callable[[Sequence[nn.Module]], Sequence[torch.optim.Optimizer]]


def lyapunov_exponent(game: Game, make_optimizers: MakeOptimizers, *, steps: int = 500, warmup: int = 100,
                      mode: str = "simultaneous", seed: int = 0, delta: float = 1e-7) -> float:
    """Average ``log`` separation growth per update over ``steps`` updates after ``warmup``.

    ``make_optimizers(players)`` builds one optimizer per player; it is called for both copies.
    """
    check_int("steps", steps, lo=1)
    check_int("warmup", warmup, lo=0)
    check_number("delta", delta, lo=0.0, lo_open=True)
    check_seed("seed", seed)
    check_callable("make_optimizers", make_optimizers, "a function players -> one optimizer per player")
    a_players, b_players = game.init(seed), game.init(seed)
    a = GameStepper(game, a_players, make_optimizers(a_players), mode)
    b = GameStepper(game, b_players, make_optimizers(b_players), mode)
    a.step(), b.step()  # optimizer buffers exist from here on
    gen = torch.Generator().manual_seed(seed + 1)
    def size(z: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float((x * x).sum()) for x in z))

    with torch.no_grad():
        za, zb = a.state_tensors(), b.state_tensors()
        dirs = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in za]
        d0 = delta * max(1.0, size(za))
        norm = size(dirs)
        for x, y, d in zip(za, zb, dirs):
            y.copy_(x + d * (d0 / norm))
    total = 0.0
    for t in range(warmup + steps):
        a.step(), b.step()
        with torch.no_grad():
            za, zb = a.state_tensors(), b.state_tensors()
            sep = math.sqrt(sum(float(((y - x) ** 2).sum()) for x, y in zip(za, zb)))
            if not math.isfinite(sep):
                return float("nan")  # the trajectory overflowed
            if sep == 0.0:
                return float("-inf")  # both copies reached the same point exactly
            if t >= warmup:
                total += math.log(sep / d0)
            d0 = delta * max(1.0, size(za))
            for x, y in zip(za, zb):
                y.copy_(x + (y - x) * (d0 / sep))
    return total / steps


def sign_changes(values: Sequence[float], exponents: Sequence[float]) -> list[float]:
    """Where the exponent crosses zero between sweep points (linear interpolation)."""
    values, exponents = list(values), list(exponents)
    if len(values) != len(exponents):
        raise ValueError(f"values has {len(values)} points and exponents {len(exponents)}: expected one exponent "
                         "per sweep value")
    out = []
    for (v0, e0), (v1, e1) in zip(zip(values, exponents), zip(values[1:], exponents[1:])):
        if math.isfinite(e0) and math.isfinite(e1) and (e0 < 0) != (e1 < 0):
            out.append(float(v0 + (v1 - v0) * (0 - e0) / (e1 - e0)))
    return out
