r"""Spectral radii of each method's linearised update on the bilinear game ``min_x max_y x^T A y``.

With ``A = U diag(sigma) V^T`` the dynamics of every method here split into independent blocks,
one per singular value: in the coordinates ``x_k = u_k^T x``, ``y_k = v_k^T y`` the gradients are
``(sigma y_k, -sigma x_k)``. Each method is linear, so its update on one block is a small matrix
``M(sigma)`` over the block's state (the two coordinates plus the method's buffers), and the
distance to the equilibrium shrinks (or grows) like ``rho^t`` with
``rho = max_k spectral_radius(M(sigma_k))``.

``block_matrix`` builds ``M`` by applying a scalar re-implementation of the method's update to the
unit vectors (exact, since the update is linear), independent of the optimizer classes that the
study runs, so measured rates check both. Closed forms, for ``a = lr sigma``: simultaneous
gradient descent-ascent ``|1 + i a| = sqrt(1 + a^2) > 1`` (it spirals out at every step size);
alternating GDA ``1`` for ``a < 2`` (it cycles); extragradient ``sqrt(1 - a^2 + a^4)``.

Methods (``METHODS``) and their hyperparameters:

- ``"gda"`` / ``"gda-alt"``: ``lr``;
- ``"extragradient"``, ``"optimistic"``: ``lr`` (optimistic: ``theta -= 2 lr g_t - lr g_{t-1}``);
- ``"momentum"`` / ``"momentum-alt"``: ``lr``, ``beta`` (``|beta|``), ``phase`` (``arg beta``;
  0 is heavy ball, ``pi`` negative momentum), the update of :class:`~nestopt.optim.ComplexMomentum`.
"""

from __future__ import annotations

import cmath
from collections.abc import Iterable

import numpy as np

from .._checks import check_number

METHODS = ("gda", "gda-alt", "extragradient", "optimistic", "momentum", "momentum-alt")


def _state_size(method: str) -> int:
    return {"gda": 2, "gda-alt": 2, "extragradient": 2, "optimistic": 4, "momentum": 6, "momentum-alt": 6}[method]


def _step(method: str, s: np.ndarray, sigma: float, lr: float, beta: complex) -> np.ndarray:
    """One update of the block state ``s`` (a scalar re-implementation of each method)."""
    x, y = s[0], s[1]
    if method == "gda":
        return np.array([x - lr * sigma * y, y + lr * sigma * x])
    if method == "gda-alt":
        x1 = x - lr * sigma * y
        return np.array([x1, y + lr * sigma * x1])
    if method == "extragradient":
        xh, yh = x - lr * sigma * y, y + lr * sigma * x
        return np.array([x - lr * sigma * yh, y + lr * sigma * xh])
    if method == "optimistic":  # state: x, y and the previous updates dx, dy
        dx, dy = -lr * sigma * y, lr * sigma * x
        return np.array([x + 2 * dx - s[2], y + 2 * dy - s[3], dx, dy])
    # momentum (torch's sign): m <- beta m + g; theta <- theta - lr Re(m)
    mx, my = complex(s[2], s[3]), complex(s[4], s[5])
    mx = beta * mx + sigma * y
    x1 = x - lr * mx.real
    my = beta * my - sigma * (x1 if method == "momentum-alt" else x)
    y1 = y - lr * my.real
    return np.array([x1, y1, mx.real, mx.imag, my.real, my.imag])


def block_matrix(method: str, sigma: float, lr: float, beta: float = 0.0, phase: float = 0.0) -> np.ndarray:
    """The update matrix of ``method`` on the block of singular value ``sigma``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    sigma = check_number("sigma", sigma, lo=0.0)
    lr = check_number("lr", lr)
    beta = check_number("beta", beta)  # negative: negative momentum (the same as phase pi)
    phase = check_number("phase", phase)
    b = cmath.rect(beta, phase)
    n = _state_size(method)
    return np.stack([_step(method, e, sigma, lr, b) for e in np.eye(n)], axis=1)


def spectral_radius(method: str, singular_values: Iterable[float], lr: float, beta: float = 0.0,
                    phase: float = 0.0) -> float:
    """``max_k rho(M(sigma_k))``: the asymptotic per-step factor of the distance to equilibrium."""
    singular_values = _grid("singular_values", singular_values)
    return max(float(np.abs(np.linalg.eigvals(block_matrix(method, float(s), lr, beta, phase))).max())
               for s in singular_values)


def best(method: str, singular_values: Iterable[float], lrs: Iterable[float], betas: Iterable[float] = (0.0,),
         phases: Iterable[float] = (0.0,)) -> dict[str, float]:
    """The grid point with the smallest spectral radius: ``{"lr", "beta", "phase", "rho"}``."""
    sv = _grid("singular_values", singular_values)
    lrs, betas, phases = _grid("lrs", lrs), _grid("betas", betas), _grid("phases", phases)
    top: dict[str, float] = {"rho": float("inf")}
    for lr in lrs:
        for b in betas:
            for ph in phases:
                r = spectral_radius(method, sv, lr, b, ph)
                if r < top["rho"]:
                    top = {"lr": float(lr), "beta": float(b), "phase": float(ph), "rho": r}
    if "lr" not in top:
        raise ValueError(f"no grid point has a finite spectral radius for method={method!r} (lrs={lrs!r}, "
                         f"betas={betas!r}, phases={phases!r}): every point overflowed")
    return top


def _grid(name: str, values: Iterable[float]) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValueError(f"{name}={values!r} is invalid: expected a non-empty sequence of numbers")
    out = list(values)
    if not out:
        raise ValueError(f"{name}=[] is invalid: expected a non-empty sequence of numbers")
    return out
