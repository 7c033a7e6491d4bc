"""Two-player differentiable games.

A :class:`Game` has players, each an ``nn.Module`` with its own parameters and its own loss.
``losses(players)`` returns one scalar per player; each player *minimises* its own loss, so a
min-max game ``min_x max_y f`` has losses ``(f, -f)``.

``bilinear``: ``min_x max_y x^T A y`` in ``dim`` dimensions with a fixed well-conditioned ``A``
(singular values in ``[1, 2]``); the unique equilibrium is ``x = y = 0``, and plain simultaneous
gradient descent-ascent spirals away from it.

``gaussian-mixture-gan``: a GAN on 8 Gaussians on a circle (:class:`MixtureGAN`), scored by
:func:`mode_stats` (modes covered, fraction of high-quality samples).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .._checks import check_int, check_number, check_seed, unknown_name
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
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype!r} is invalid: expected a floating-point torch.dtype (torch.float64, ...)")
        self.dtype = dtype
        g = generator(structure_seed, stream=6)
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        s = torch.linspace(1.0, 2.0, dim, dtype=torch.float64)
        self.A = ((u * s) @ v.T).to(dtype)
        self.singular_values = s
        self.description = f"min_x max_y x^T A y, dim {dim}, singular values in [1, 2]"

    def init(self, seed: int) -> list[nn.Module]:
        g = generator(check_seed("seed", seed, lo=None), stream=7)
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


class DiracGAN(Game):
    """Mescheder et al.'s (2018) Dirac GAN: real data is the point 0, the generator a point
    ``theta``, the discriminator ``D(x) = psi x``. The generator minimises
    ``L = f(psi theta)`` with ``f(t) = -softplus(-t)``; the discriminator minimises
    ``-L + (gamma / 2) psi^2`` (``gamma``: its gradient penalty). The equilibrium is ``(0, 0)``.

    Linearised there, simultaneous gradient descent with step ``lr`` has spectral radius
    ``sqrt(1 - lr gamma + lr^2 / 4)`` (:meth:`spectral_radius`), so it converges exactly when
    ``gamma > lr / 4``: a bifurcation the Lyapunov study locates from trajectories."""

    name = "dirac-gan"

    def __init__(self, gamma: float = 0.0, start: tuple[float, float] = (1.0, 1.0)) -> None:
        self.gamma = check_number("gamma", gamma)
        if (not isinstance(start, tuple | list) or len(start) != 2
                or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in start)):
            raise ValueError(f"start={start!r} is invalid: expected two finite numbers (theta, psi)")
        self.start = tuple(start)
        self.description = f"Dirac GAN, gradient penalty gamma={gamma}"

    def init(self, seed: int) -> list[nn.Module]:
        return [Vector(torch.tensor([self.start[0]], dtype=torch.float64)),
                Vector(torch.tensor([self.start[1]], dtype=torch.float64))]

    def losses(self, players: list[nn.Module]) -> list[torch.Tensor]:
        theta, psi = players[0].v[0], players[1].v[0]
        value = -nn.functional.softplus(-psi * theta)
        return [value, -value + 0.5 * self.gamma * psi ** 2]

    def distance(self, players: list[nn.Module]) -> float:
        return float(torch.cat([players[0].v.detach(), players[1].v.detach()]).norm())

    def spectral_radius(self, lr: float) -> float:
        """Of simultaneous gradient descent at step ``lr``, linearised at the equilibrium."""
        return math.sqrt(max(0.0, 1 - lr * self.gamma + lr * lr / 4))


def mixture_centers(modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """``modes`` points evenly spaced on a circle of ``radius`` (float32, shape ``(modes, 2)``)."""
    check_int("modes", modes, lo=1)
    check_number("radius", radius, lo=0.0, lo_open=True)
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


class MixtureGAN(Game):
    """A GAN on a 2-D mixture of Gaussians (8 modes on a circle of radius 2, std 0.02), the usual
    test of mode collapse. Player 0 is the generator (``z_dim`` Gaussian noise -> MLP -> 2-D),
    player 1 the discriminator (2-D -> MLP -> logit); the generator minimises the non-saturating
    loss ``-log D(G(z))``, the discriminator the cross-entropy of real against generated points.

    Data are generated, never downloaded: every call of :meth:`losses` draws a fresh batch of
    real points and noise from a generator seeded by :meth:`init`'s seed. Score samples with
    :func:`mode_stats`.
    """

    name = "gaussian-mixture-gan"

    def __init__(self, modes: int = 8, radius: float = 2.0, std: float = 0.02, z_dim: int = 16, hidden: int = 128,
                 batch: int = 256) -> None:
        self.modes = check_int("modes", modes, lo=1)
        self.radius = check_number("radius", radius, lo=0.0, lo_open=True)
        self.std = check_number("std", std, lo=0.0, lo_open=True)
        self.z_dim = check_int("z_dim", z_dim, lo=1)
        self.hidden = check_int("hidden", hidden, lo=1)
        self.batch = check_int("batch", batch, lo=1)
        self.centers = mixture_centers(modes, radius)
        self._rng = torch.Generator().manual_seed(0)
        self.description = f"GAN on {modes} Gaussians (radius {radius}, std {std}), MLPs of width {hidden}"

    def init(self, seed: int) -> list[nn.Module]:
        seed = check_seed("seed", seed, lo=None)
        self._rng = torch.Generator().manual_seed(int(seed) + 10_007)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            h = self.hidden
            gen = nn.Sequential(nn.Linear(self.z_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
            disc = nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        return [gen, disc]

    def real(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        rng = self._rng if rng is None else rng
        idx = torch.randint(self.modes, (n,), generator=rng)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=rng)

    def noise(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=self._rng if rng is None else rng)

    def losses(self, players: list[nn.Module]) -> list[torch.Tensor]:
        gen, disc = players
        fake = gen(self.noise(self.batch))
        real_logit, fake_logit = disc(self.real(self.batch)), disc(fake)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
        g_loss = bce(fake_logit, torch.ones_like(fake_logit))
        return [g_loss, d_loss]


def mode_stats(game: MixtureGAN, generator: nn.Module, n: int = 2500, seed: int = 0,
               min_count: int | None = None) -> dict[str, float]:
    """Score ``n`` samples: a sample is *high quality* within 3 standard deviations of its
    nearest mode; a mode is *covered* when at least ``min_count`` (default 1% of ``n``)
    high-quality samples fall on it. Returns ``{"modes": covered count, "high_quality": fraction}``."""
    if not isinstance(game, MixtureGAN):
        raise TypeError(f"game={game!r} is invalid: expected the MixtureGAN the generator was trained on")
    check_int("n", n, lo=1)
    check_seed("seed", seed, lo=None)
    if min_count is not None:
        check_int("min_count", min_count, lo=1)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = generator(game.noise(n, rng))
    d = torch.cdist(x.float(), game.centers)
    dist, nearest = d.min(dim=1)
    good = dist < 3 * game.std
    counts = torch.bincount(nearest[good], minlength=game.modes)
    need = max(1, n // 100) if min_count is None else min_count
    return {"modes": int((counts >= need).sum()), "high_quality": float(good.float().mean())}


_GAMES = {"bilinear": BilinearGame, "dirac-gan": DiracGAN, "gaussian-mixture-gan": MixtureGAN}


def game_names() -> list[str]:
    return sorted(_GAMES)


def get_game(name: str, **kwargs: object) -> Game:
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} is invalid: expected a game name, a string ({', '.join(sorted(_GAMES))})")
    if name not in _GAMES:
        raise unknown_name("game", name, _GAMES)
    return _GAMES[name](**kwargs)  # type: ignore[arg-type]
