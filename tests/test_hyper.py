"""nestopt.hyper: implicit, unrolled and best-response hypergradients against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nestopt.hyper import (
    Bilevel,
    HypergradientError,
    SelfTuningMLP,
    STNTrainer,
    implicit_hypergradient,
    unrolled_hypergradient,
)

DT = torch.float64


def ridge_problem(seed: int = 0, n: int = 60, d: int = 7, m: int = 45):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, d, dtype=DT)
    y = x @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    xv = torch.randn(m, d, generator=g, dtype=DT)
    yv = xv @ torch.randn(d, generator=g, dtype=DT)

    def inner(w, lam):
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()

    def outer(w, lam):
        return 0.5 * ((xv @ w - yv) ** 2).mean()

    def best_response(lam):
        a = x.T @ x / n + torch.diag(lam.expand(d))
        return torch.linalg.solve(a, x.T @ y / n), a

    def analytic(lam):
        # d/dlam L_V(w*(lam)) = -(A^{-1} dL_V/dw) * w*   (summed over weights for a scalar lam)
        w, a = best_response(lam)
        s = torch.linalg.solve(a, xv.T @ (xv @ w - yv) / m)
        return -(s * w) if lam.dim() else -(s @ w)

    return inner, outer, best_response, analytic, d


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", ["scalar", "per_weight"])
@pytest.mark.parametrize("solver,iters,tol", [("dense", 1, 1e-6), ("cg", 30, 1e-6), ("neumann", 400, 1e-6)])
def test_implicit_matches_closed_form_ridge(shape, solver, iters, tol):
    inner, outer, best_response, analytic, d = ridge_problem()
    lam = torch.tensor(0.2, dtype=DT) if shape == "scalar" else torch.linspace(0.05, 0.6, d, dtype=DT)
    w, _ = best_response(lam)
    hg = implicit_hypergradient(inner, outer, w, lam, solver=solver, iters=iters)
    assert hg.shape == lam.shape  # a 0-dim hyperparameter stays 0-dim (TorchOpt issue #222)
    assert rel(hg, analytic(lam)) < tol


def test_direct_term_and_dict_hparams():
    inner, outer, best_response, analytic, d = ridge_problem(1)
    lam = torch.linspace(0.1, 0.5, d, dtype=DT)
    w, _ = best_response(lam)
    hp = {"lam": lam, "c": torch.tensor(0.7, dtype=DT)}

    def outer2(w, h):  # an outer loss that also depends on a hyperparameter directly
        return outer(w["w"], h["lam"]) + h["c"] ** 3 + (h["lam"] ** 2).sum()

    hg = implicit_hypergradient(lambda w, h: inner(w["w"], h["lam"]), outer2, {"w": w}, hp, solver="cg", iters=30)
    assert torch.allclose(hg["c"], torch.tensor(3 * 0.49, dtype=DT))
    assert rel(hg["lam"], analytic(lam) + 2 * lam) < 1e-8


def test_vmap_composes_without_checks_and_says_so_with_checks():
    inner, outer, best_response, analytic, d = ridge_problem(2)
    lams = torch.stack([torch.full((d,), 0.1, dtype=DT), torch.full((d,), 0.4, dtype=DT)])
    w, _ = best_response(lams[0])  # same weights for both: compare against the loop
    for solver in ("cg", "neumann", "dense"):
        def f(lam, solver=solver):
            return implicit_hypergradient(inner, outer, w, lam, solver=solver, iters=25, alpha=0.3, check=False)
        batched = torch.func.vmap(f)(lams)
        looped = torch.stack([f(lam) for lam in lams])
        assert torch.allclose(batched, looped, rtol=1e-10, atol=1e-12)
    with pytest.raises(HypergradientError, match="check=False"):
        torch.func.vmap(lambda lam: implicit_hypergradient(inner, outer, w, lam))(lams)


def nonconvex_problem():
    def inner(w, lam):  # saddle at w = 0 for lam < 1: curvature lam - 1 along w[0]
        return 0.5 * (lam - 1.0) * w[0] ** 2 + 0.5 * w[1] ** 2

    def outer(w, lam):
        return (w - 1.0).pow(2).sum()

    return inner, outer


@pytest.mark.parametrize("solver", ["cg", "dense", "neumann"])
def test_negative_curvature_is_reported_not_returned(solver):
    inner, outer = nonconvex_problem()
    w = torch.zeros(2, dtype=DT)
    with pytest.raises(HypergradientError, match="not positive definite|eigenvalue"):
        implicit_hypergradient(inner, outer, w, torch.tensor(0.5, dtype=DT), solver=solver, iters=10)
    # damping makes it solvable, and the answer is the damped one
    hg = implicit_hypergradient(inner, outer, w, torch.tensor(0.5, dtype=DT), solver=solver, iters=200,
                                damping=1.0, alpha=0.5)
    assert torch.isfinite(hg)


def test_nonconverging_solves_are_reported():
    inner, outer, best_response, _, d = ridge_problem(3)
    lam = torch.full((d,), 1e-3, dtype=DT)
    w, _ = best_response(lam)
    with pytest.raises(HypergradientError, match="did not converge"):
        implicit_hypergradient(inner, outer, w, lam, solver="cg", iters=1, max_residual=1e-3)
    with pytest.raises(HypergradientError, match="does not contract"):
        implicit_hypergradient(inner, outer, w, lam, solver="neumann", iters=30, alpha=10.0)
    hg, info = implicit_hypergradient(inner, outer, w, lam, solver="cg", iters=1, max_residual=1.0,
                                      return_info=True)
    assert info.iterations == 1 and 0 < info.residual < 1.0


def test_cg_warm_start_and_early_stop():
    inner, outer, best_response, analytic, d = ridge_problem(4)
    lam = torch.full((d,), 0.2, dtype=DT)
    w, _ = best_response(lam)
    _, info = implicit_hypergradient(inner, outer, w, lam, iters=30, return_info=True)
    hg, info2 = implicit_hypergradient(inner, outer, w, lam, iters=30, tol=1e-9, init=info.solution,
                                       return_info=True)
    assert info2.iterations < 3 and rel(hg, analytic(lam)) < 1e-8


def test_bad_arguments_name_themselves():
    inner, outer, best_response, _, d = ridge_problem()
    w = torch.zeros(d, dtype=DT)
    lam = torch.tensor(0.1, dtype=DT)
    for kwargs, name in [({"solver": "lu"}, "solver"), ({"iters": 0}, "iters"), ({"damping": -1.0}, "damping"),
                         ({"alpha": 0.0}, "alpha"), ({"tol": 1e-3, "check": False}, "tol")]:
        with pytest.raises(ValueError, match=name):
            implicit_hypergradient(inner, outer, w, lam, **kwargs)
    with pytest.raises(TypeError, match="hparams"):
        implicit_hypergradient(inner, outer, w, {"lam": 0.1})
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        implicit_hypergradient(inner, lambda w, lam: w, w, lam)


def test_unrolled_from_optimum_equals_neumann_and_truncation():
    # K steps of GD from w* (a fixed point) give exactly the K-term Neumann series with alpha = lr.
    inner, outer, best_response, _, d = ridge_problem(5)
    lam = torch.linspace(0.1, 0.5, d, dtype=DT)
    w, _ = best_response(lam)
    for k in (1, 7, 40):
        u = unrolled_hypergradient(inner, outer, w, lam, steps=k, lr=0.3)
        n = implicit_hypergradient(inner, outer, w, lam, solver="neumann", iters=k, alpha=0.3, check=False)
        assert rel(u, n) < 1e-10
    trunc = unrolled_hypergradient(inner, outer, w, lam, steps=40, lr=0.3, truncate=5)
    assert rel(trunc, implicit_hypergradient(inner, outer, w, lam, solver="neumann", iters=5, alpha=0.3,
                                             check=False)) < 1e-10


def test_unrolled_matches_finite_differences_with_momentum_and_learned_lr():
    inner, outer, _, _, d = ridge_problem(6)
    w0 = torch.zeros(d, dtype=DT)
    hp = {"lam": torch.full((d,), 0.2, dtype=DT), "loglr": torch.tensor(math.log(0.1), dtype=DT)}

    def run(h):
        def inner_h(w, h):
            return inner(w, h["lam"])
        _, info = unrolled_hypergradient(inner_h, lambda w, h: outer(w, h["lam"]), w0, h, steps=15,
                                         lr=lambda h: h["loglr"].exp(), momentum=0.5, return_info=True)
        return info.outer_loss

    hg = unrolled_hypergradient(lambda w, h: inner(w, h["lam"]), lambda w, h: outer(w, h["lam"]), w0, hp,
                                steps=15, lr=lambda h: h["loglr"].exp(), momentum=0.5)
    eps = 1e-6
    for i in range(2):
        up = {k: v.clone() for k, v in hp.items()}
        dn = {k: v.clone() for k, v in hp.items()}
        up["lam"][i] += eps
        dn["lam"][i] -= eps
        assert abs((run(up) - run(dn)) / (2 * eps) - float(hg["lam"][i])) < 1e-6
    up, dn = dict(hp), dict(hp)
    up["loglr"] = hp["loglr"] + eps
    dn["loglr"] = hp["loglr"] - eps
    assert abs((run(up) - run(dn)) / (2 * eps) - float(hg["loglr"])) < 1e-6


def test_bilevel_lowers_validation_loss_both_methods_and_horizons():
    inner, outer, _, _, d = ridge_problem(7)

    def inner_log(w, loglam):
        return inner(w, loglam.exp())

    for method, horizon in [("implicit", "continue"), ("implicit", "retrain"), ("unrolled", "retrain")]:
        b = Bilevel(inner_log, outer, torch.zeros(d, dtype=DT), torch.full((d,), 1.0, dtype=DT),
                    method=method, horizon=horizon, inner_steps=60,
                    hyper_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
                    inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                    unroll_kwargs={"lr": 0.1}, solver_kwargs={"iters": 20})
        hist = b.run(15)
        assert hist[-1]["outer_loss"] < 0.9 * hist[0]["outer_loss"], (method, horizon)
    with pytest.raises(ValueError, match="horizon"):
        Bilevel(inner_log, outer, torch.zeros(d), torch.zeros(d), horizon="forever")


def test_stn_learns_and_dropout_gets_a_gradient():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = SelfTuningMLP([10, 32, 2])
    trainer = STNTrainer(model, weight_decay=1e-3, dropout=0.3, train_steps=2)
    u0 = trainer.u.detach().clone()
    for _ in range(60):
        rec = trainer.step((x[:192], y[:192]), (x[192:], y[192:]))
    assert rec["val_loss"] < 0.45
    assert (trainer.u.detach() - u0).abs().min() > 0  # both hyperparameters moved, dropout included
    acc = (trainer.predict(x[192:]).argmax(1) == y[192:]).float().mean()
    assert acc > 0.8
    with pytest.raises(ValueError, match="dropout"):
        STNTrainer(model, dropout=0.95)


def test_hypergradient_on_a_network_valued_hyperparameter():
    # hyperparameters = the weights of a small augmentation network; compare CG with dense.
    torch.manual_seed(1)
    x, y = torch.randn(40, 3, dtype=DT), torch.randn(40, dtype=DT)
    xv, yv = torch.randn(30, 3, dtype=DT), torch.randn(30, dtype=DT)
    aug = {"a": 0.1 * torch.randn(3, 3, dtype=DT), "b": torch.zeros(3, dtype=DT)}

    def inner(w, h):
        xa = x + torch.tanh(x @ h["a"] + h["b"])
        return F.mse_loss(xa @ w, y) + 1e-2 * (w ** 2).sum()

    def outer(w, h):
        return F.mse_loss(xv @ w, yv)

    w = torch.zeros(3, dtype=DT)
    for _ in range(500):
        w = w - 0.2 * torch.func.grad(inner)(w, aug)
    dense = implicit_hypergradient(inner, outer, w, aug, solver="dense")
    cg = implicit_hypergradient(inner, outer, w, aug, solver="cg", iters=10)
    for k in aug:
        assert rel(cg[k], dense[k]) < 1e-6


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_leak_over_1000_hyperparameter_steps():
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    xv, yv = torch.randn(128, 32), torch.randint(0, 4, (128,))
    w0 = {"w": 0.1 * torch.randn(32, 4), "b": torch.zeros(4)}

    def inner(w, lam):
        return F.cross_entropy(x @ w["w"] + w["b"], y) + (lam.exp() * w["w"] ** 2).sum()

    def outer(w, lam):
        return F.cross_entropy(xv @ w["w"] + w["b"], yv)

    b = Bilevel(inner, outer, w0, torch.full((32, 4), -6.0), inner_steps=2,
                solver_kwargs={"iters": 5, "max_residual": 10.0})
    b.run(100)
    before = _rss_mb()
    b.run(1000)
    assert _rss_mb() - before < 10.0
