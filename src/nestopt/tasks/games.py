"""Two-player differentiable games.

A :class:`Game` has players, each an ``nn.Module`` with its own parameters and its own loss.
``losses(players)`` returns one scalar per player; each player *minimises* its own loss, so a
min-max game ``min_x max_y f`` has losses ``(f, -f)``.

``bilinear``: ``min_x max_y x^T A y`` in ``dim`` dimensions with a fixed well-conditioned ``A``
(singular values in ``[1, 2]``); the unique equilibrium is ``x = y = 0``, and plain simultaneous
gradient descent-ascent spirals away from it.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from .._checks import check_int, unknown_name
from .base import generator


class Game(abc.ABC):
    name: str = "game"
    n_players: int = 2
    description: str = ""

    @abc.abstractmethod
    def init(self, seed: int) -> list[nn.Module]:
        """Freshly initialised players, identical for identical seeds."""

    @abc.abstractmethod
    def losses(self, players: list[nn.Module]) -> list[torch.Tensor]:
        """One scalar loss per player; player ``i`` minimises ``losses[i]``."""

    def distance(self, players: list[nn.Module]) -> float:
        """Euclidean distance of the joint parameters to the equilibrium (games that know one)."""
        raise ValueError(f"{type(self).__name__} has no known equilibrium to measure a distance to")


class Vector(nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(values.clone())


class BilinearGame(Game):
    name = "bilinear"

    def __init__(self, dim: int = 2, dtype: torch.dtype = torch.float64, structure_seed: int = 99) -> None:
        self.dim = check_int("dim", dim, lo=1)
        self.dtype = dtype
        g = generator(structure_seed, stream=6)
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        s = torch.linspace(1.0, 2.0, dim, dtype=torch.float64)
        self.A = ((u * s) @ v.T).to(dtype)
        self.singular_values = s
        self.description = f"min_x max_y x^T A y, dim {dim}, singular values in [1, 2]"

    def init(self, seed: int) -> list[nn.Module]:
        g = generator(seed, stream=7)
        return [Vector(torch.randn(self.dim, generator=g, dtype=torch.float64).to(self.dtype)),
                Vector(torch.randn(self.dim, generator=g, dtype=torch.float64).to(self.dtype))]

    def value(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ (self.A @ y)

    def losses(self, players: list[nn.Module]) -> list[torch.Tensor]:
        f = self.value(players[0].v, players[1].v)
        return [f, -f]

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form: each player's gradient of its own loss, ``(A y, -A^T x)``."""
        return self.A @ y, -(self.A.T @ x)

    def distance(self, players: list[nn.Module]) -> float:
        return float(torch.cat([players[0].v.detach(), players[1].v.detach()]).norm())


_GAMES = {"bilinear": BilinearGame}


def game_names() -> list[str]:
    return sorted(_GAMES)


def get_game(name: str, **kwargs: object) -> Game:
    if name not in _GAMES:
        raise unknown_name("game", name, _GAMES)
    return _GAMES[name](**kwargs)  # type: ignore[arg-type]
