"""Section 2: time and peak extra memory of one hypergradient, as a multiple of one AdamW step, against
TorchOpt's ``custom_root`` solvers when TorchOpt is installed."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import functional as F

from ...hyper import implicit_hypergradient
from ...train import train_loop
from .data import digits_split, mlp, weights
from .measure import _time, peak_extra_mb


COST_ITERS = (5, 20, 50)
COST_DAMPING = 1e-2  # both libraries solve (H + 0.01 I) x = b, so CG never meets negative curvature


def _decay_problem(sizes: tuple[int, ...], n_train: int, seed: int = 0) -> dict[str, Any]:
    data = digits_split(seed)
    from sklearn.datasets import load_digits

    if n_train > 200:  # a larger problem: more training rows (repeat-free from the full set)
        x, y = load_digits(return_X_y=True)
        data["xt"] = torch.tensor(x[:n_train], dtype=torch.float32) / 16.0
        data["yt"] = torch.tensor(y[:n_train])
    net = mlp(sizes, seed)
    params = weights(net)
    lam = {k: torch.full_like(v, math.log(1e-3)) for k, v in params.items()}
    xt, yt, xv, yv = data["xt"], data["yt"], data["xv"], data["yv"]

    def inner(p, h):
        out = functional_call(net, p, (xt,))
        return F.cross_entropy(out, yt) + sum((h[k].exp() * p[k] ** 2).sum() for k in p)

    def outer(p, h):
        return F.cross_entropy(functional_call(net, p, (xv,)), yv)

    # train to near a minimum so the Hessian is (close to) positive definite
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(w.values(), lr=1e-2)
    train_loop(opt, 1000, lambda _: inner(w, lam), divergence=None, catch=())
    params = {k: v.detach() for k, v in w.items()}
    return {"net": net, "params": params, "lam": lam, "inner": inner, "outer": outer, "data": data}


def _torchopt_fn(p: dict[str, Any], solver: str, iters: int, alpha: float):
    try:
        import warnings

        import torchopt
        from torchopt.diff.implicit import custom_root
    except ImportError:
        return None
    keys = list(p["params"])
    inner, outer, params, lam = p["inner"], p["outer"], p["params"], p["lam"]

    def optimality(pt, lt):
        return torch.func.grad(lambda q: inner(dict(zip(keys, q)), dict(zip(keys, lt))))(pt)

    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=iters, rtol=0.0, ridge=COST_DAMPING)
    else:
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=iters, alpha=alpha, ridge=COST_DAMPING)

    @custom_root(optimality, argnums=1, solve=solve)
    def solution(pt, lt):
        return tuple(params[k] for k in keys)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lt = tuple(lam[k].detach().requires_grad_(True) for k in keys)
            sol = solution(tuple(params[k] for k in keys), lt)
            return torch.autograd.grad(outer(dict(zip(keys, sol)), dict(zip(keys, lt))), lt)

    return run


def cost(configs: tuple[tuple[str, tuple[int, ...], int], ...] | None = None, iters: tuple[int, ...] = COST_ITERS,
         repeats: int = 5) -> dict[str, Any]:
    configs = configs or (("hpo MLP 64-32-10, 200 rows", (64, 32, 10), 200),
                          ("MLP 64-256-256-10, 1,500 rows", (64, 256, 256, 10), 1500))
    out: dict[str, Any] = {"torchopt": None}
    try:
        import torchopt

        out["torchopt"] = torchopt.__version__
    except ImportError:
        pass
    for label, sizes, n in configs:
        p = _decay_problem(sizes, n)
        w = {k: v.clone().requires_grad_(True) for k, v in p["params"].items()}
        opt = torch.optim.AdamW(w.values(), lr=1e-3)

        def train_step():
            opt.zero_grad()
            p["inner"](w, p["lam"]).backward()
            opt.step()

        t_step = _time(train_step, repeats * 4)
        m_step = peak_extra_mb(train_step)
        _, info = implicit_hypergradient(p["inner"], p["outer"], p["params"], p["lam"], solver="neumann", iters=1,
                                         check=False, return_info=True)  # alpha=None: 1/lambda_max by power iteration
        alpha = 0.5 / (1.0 / info.alpha + COST_DAMPING)
        rows = []
        for solver in ("cg", "neumann"):
            for k in iters:
                def ours(solver=solver, k=k, info=False):
                    return implicit_hypergradient(p["inner"], p["outer"], p["params"], p["lam"], solver=solver,
                                                  iters=k, alpha=alpha, damping=COST_DAMPING, check=False,
                                                  return_info=info)
                row = {"solver": solver, "iters": k, "time_ms": 1e3 * _time(ours, repeats),
                       "extra_mb": peak_extra_mb(ours), "iterations_run": ours(info=True)[1].iterations}
                theirs = _torchopt_fn(p, solver, k, alpha)
                if theirs is not None:
                    row["torchopt_time_ms"] = 1e3 * _time(theirs, repeats)
                    row["torchopt_extra_mb"] = peak_extra_mb(theirs)
                    row["ratio"] = row["time_ms"] / row["torchopt_time_ms"]
                    a, b = ours(), theirs()
                    num = sum(float((a[key] - bb).norm() ** 2) for key, bb in zip(a, b)) ** 0.5
                    den = sum(float(a[key].norm() ** 2) for key in a) ** 0.5
                    row["rel_diff_vs_torchopt"] = num / max(den, 1e-30)
                row["x_step"] = row["time_ms"] / (1e3 * t_step)
                rows.append(row)
        n_params = sum(v.numel() for v in p["params"].values())
        out[label] = {"params": n_params, "hyperparameters": n_params, "train_step_ms": 1e3 * t_step,
                      "train_step_extra_mb": m_step, "alpha": alpha, "rows": rows}
    return out
