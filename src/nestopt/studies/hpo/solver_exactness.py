"""Section 1: CG and Neumann hypergradients against the dense solve on logistic regression."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from ...hyper import implicit_hypergradient


ITERS = (1, 2, 5, 10, 20, 50, 100)


def logistic_problem(cond: float, decay: float = 1e-3, seed: int = 0, n: int = 500, d: int = 50) -> dict[str, Any]:
    """Features whose matrix has condition number ``cond`` (geometric spectrum, random rotation), one L2
    decay per feature, all ``decay``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    scales = torch.logspace(0, -math.log10(cond), d, dtype=dt)  # singular values of X: cond(X) = cond
    z = torch.randn(n, d, generator=g, dtype=dt)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T  # whiten exactly
    x = z @ torch.diag(scales) @ q.T
    truth = torch.randn(d, generator=g, dtype=dt)
    y = (torch.rand(n, generator=g, dtype=dt) < torch.sigmoid(x @ truth * 2)).to(dt)
    xv = torch.randn(n, d, generator=g, dtype=dt) @ torch.diag(scales) @ q.T
    yv = (torch.rand(n, generator=g, dtype=dt) < torch.sigmoid(xv @ truth * 2)).to(dt)
    loglam = torch.full((d,), math.log(decay), dtype=dt)

    def inner(w, lam):
        return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return F.binary_cross_entropy_with_logits(xv @ w, yv)

    w = torch.zeros(d, dtype=dt)
    for _ in range(100):  # Newton to machine precision
        gr = torch.func.grad(inner)(w, loglam)
        if float(gr.norm()) < 1e-13:
            break
        h = torch.func.hessian(inner)(w, loglam)
        w = w - torch.linalg.solve(h, gr)
    h = torch.func.hessian(inner)(w, loglam)
    ev = torch.linalg.eigvalsh(h)
    return {"inner": inner, "outer": outer, "w": w, "lam": loglam, "feature_cond": cond, "decay": decay,
            "hessian_cond": float(ev[-1] / ev[0]), "grad_norm": float(torch.func.grad(inner)(w, loglam).norm())}


def exactness(iters: tuple[int, ...] = ITERS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cond, decay in ((25.0, 1e-3), (250.0, 1e-3), (25.0, 1e-4), (250.0, 1e-4)):
        p = logistic_problem(cond, decay)
        dense = implicit_hypergradient(p["inner"], p["outer"], p["w"], p["lam"], solver="dense")
        rows = []
        for solver in ("cg", "neumann"):
            for k in iters:
                hg, info = implicit_hypergradient(p["inner"], p["outer"], p["w"], p["lam"], solver=solver, iters=k,
                                                  check=False, return_info=True)
                cos = float(torch.dot(hg, dense) / (hg.norm() * dense.norm()))
                rows.append({"solver": solver, "iters": k, "cosine": cos,
                             "rel_error": float((hg - dense).norm() / dense.norm())})
        out[f"cond{int(cond)}_decay{decay:g}"] = {"feature_cond": cond, "decay": decay, "hessian_cond": p["hessian_cond"],
                                   "inner_grad_norm": p["grad_norm"], "rows": rows}
    return out
