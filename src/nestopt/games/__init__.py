"""Games: two-player training, the linear analysis of the bilinear game, a Gaussian-mixture GAN,
Lyapunov exponents of training dynamics, and Ridge Rider.

- :func:`play` runs any optimizer per player, simultaneous, alternating, extragradient or
  optimistic (:mod:`nestopt.games.runner`);
- :mod:`nestopt.games.linear`: each method's update matrix on the bilinear game and its spectral
  radius (the analytic convergence rate);
- :class:`~nestopt.tasks.BilinearGame` and :class:`~nestopt.tasks.MixtureGAN` are the games
  (in :mod:`nestopt.tasks`, with the other tasks); :func:`mode_stats` scores a GAN's samples;
- :func:`lyapunov_exponent` estimates the largest Lyapunov exponent of a game's training
  dynamics; :func:`ridge_rider` follows Hessian eigenvectors from a saddle to diverse solutions.
"""

from . import linear
from .runner import MODES, play

__all__ = ["MODES", "linear", "play"]
