"""Two-player (n-player) training: every player minimises its own loss with its own optimizer.

``play(game, players, optimizers, steps, mode=...)`` runs the loop; ``mode`` is how the players'
updates interleave:

- ``"simultaneous"``: every gradient is taken at the same point, then every player steps
  (gradient descent-ascent when the optimizers are SGD);
- ``"alternating"``: player 0 steps, then player 1 takes its gradient at the new point, ...;
- ``"extragradient"``: a simultaneous look-ahead step, gradients at the look-ahead point, then
  the real step from the original point with those gradients (Korpelevich). Stateful optimizers
  update their state at both half-steps, as Extra-Adam does (Gidel et al. 2019);
- ``"optimistic"``: a simultaneous step with update ``d_t`` followed by ``d_t - d_{t-1}``, so the
  total is ``2 d_t - d_{t-1}`` (``d_{-1} = 0``): optimistic gradient descent (``theta -= 2 lr g_t - lr g_{t-1}``)
  for SGD, and the same optimism around any other optimizer's update.

Any ``torch.optim.Optimizer`` works per player. Gradients are computed with
``torch.autograd.grad`` of each player's loss with respect to its own parameters only.

Example::

    >>> import torch
    >>> from nestopt.tasks import BilinearGame
    >>> from nestopt.optim import ComplexMomentum
    >>> game = BilinearGame(dim=2)
    >>> players = game.init(seed=0)
    >>> opts = [ComplexMomentum(p.parameters(), lr=0.5, beta=0.8, phase=2.0) for p in players]
    >>> hist = play(game, players, opts, steps=200)
    >>> hist[-1]["distance"] < 1e-3
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..tasks.games import Game

MODES = ("simultaneous", "alternating", "extragradient", "optimistic")


def _params(players: Sequence[nn.Module]) -> list[list[torch.Tensor]]:
    return [[p for p in m.parameters() if p.requires_grad] for m in players]


def _set_grads(game: Game, players: Sequence[nn.Module], params: list[list[torch.Tensor]],
               which: Sequence[int]) -> None:
    """Each player in ``which`` gets ``.grad`` = the gradient of its own loss."""
    losses = game.losses(list(players))
    for i in which:
        grads = torch.autograd.grad(losses[i], params[i], retain_graph=i != which[-1], allow_unused=True)
        for p, g in zip(params[i], grads):
            p.grad = torch.zeros_like(p) if g is None else g


class GameStepper:
    """One update of every player at a time: what :func:`play` loops over and what the Lyapunov
    estimate runs twice side by side. ``prev`` holds the optimistic mode's last update."""

    def __init__(self, game: Game, players: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 mode: str = "simultaneous") -> None:
        check_choice("mode", mode, MODES)
        if not isinstance(game, Game):
            raise TypeError(f"game={game!r} is invalid: expected a nestopt.tasks.Game (BilinearGame, MixtureGAN, ...)")
        players, optimizers = list(players), list(optimizers)
        n = getattr(game, "n_players", len(players))
        if len(players) != n:
            raise ValueError(f"players={len(players)} modules is invalid: {type(game).__name__} has {n} players "
                             "(game.init(seed) builds them)")
        for i, m in enumerate(players):
            if not isinstance(m, nn.Module):
                raise TypeError(f"players[{i}]={m!r} is invalid: expected an nn.Module")
        if len(optimizers) != len(players):
            raise ValueError(f"optimizers has {len(optimizers)} entries, expected one per player ({len(players)})")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizers[{i}]={opt!r} is invalid: expected a torch.optim.Optimizer")
        self.game, self.players, self.optimizers, self.mode = game, list(players), list(optimizers), mode
        self.params = _params(players)
        self.prev: list[list[torch.Tensor]] | None = None

    def step(self) -> None:
        game, players, params, opts = self.game, self.players, self.params, self.optimizers
        everyone = list(range(len(players)))
        if self.mode == "alternating":
            for i in everyone:
                _set_grads(game, players, params, [i])
                opts[i].step()
        elif self.mode == "extragradient":
            saved = [[p.detach().clone() for p in ps] for ps in params]
            _set_grads(game, players, params, everyone)
            for opt in opts:
                opt.step()
            _set_grads(game, players, params, everyone)
            with torch.no_grad():
                for ps, ss in zip(params, saved):
                    for p, s in zip(ps, ss):
                        p.copy_(s)
            for opt in opts:
                opt.step()
        else:
            before = [[p.detach().clone() for p in ps] for ps in params] if self.mode == "optimistic" else None
            _set_grads(game, players, params, everyone)
            for opt in opts:
                opt.step()
            if before is not None:
                with torch.no_grad():
                    delta = [[p.detach() - b for p, b in zip(ps, bs)] for ps, bs in zip(params, before)]
                    for ps, ds, qs in zip(params, delta, self.prev or delta):  # theta += d_t - d_{t-1}
                        for p, d, q in zip(ps, ds, qs):
                            p.add_(d) if self.prev is None else p.add_(d).sub_(q)  # d_{-1} = 0
                self.prev = delta

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything the next update depends on: parameters, the optimizers' floating-point
        state tensors, and the optimistic mode's last update."""
        out = [p for ps in self.params for p in ps]
        for opt in self.optimizers:
            for st in opt.state.values():
                out += [v for k, v in sorted(st.items()) if torch.is_tensor(v) and v.is_floating_point()
                        and k != "step"]
        if self.prev is not None:
            out += [d for ds in self.prev for d in ds]
        return out


def play(game: Game, players: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], steps: int, *,
         mode: str = "simultaneous", every: int = 1,
         callback: Callable[[int, Sequence[nn.Module]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run ``steps`` updates. Before update ``k`` for every ``k`` divisible by ``every``, and
    after the last, record ``{"step": updates so far, "losses", "distance" (games with a known
    equilibrium), **callback(step, players)}``.

    Raises ``ValueError`` for a bad ``mode``, ``steps`` or ``every``, or when the number of
    optimizers differs from the number of players."""
    check_int("steps", steps, lo=0)
    check_int("every", every, lo=1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is invalid: expected a function (step, players) -> dict")
    stepper = GameStepper(game, players, optimizers, mode)
    history: list[dict[str, Any]] = []

    def record(step: int) -> None:
        with torch.no_grad():
            losses = [float(v) for v in game.losses(list(players))]
        row: dict[str, Any] = {"step": step, "losses": losses}
        try:
            row["distance"] = game.distance(list(players))
        except ValueError:
            pass
        if callback is not None:
            extra = callback(step, players)
            if not isinstance(extra, Mapping):
                raise TypeError(f"callback(step, players) returned {type(extra).__name__}: expected a dict of values "
                                "to add to the record")
            row.update(extra)
        history.append(row)

    for step in range(steps):
        if step % every == 0:
            record(step)
        stepper.step()
    record(steps)
    return history
