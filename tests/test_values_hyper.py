"""Implicit hypergradients against exact closed forms on ridge regression, solver by solver
(including what a truncated solve returns, not only its limit), and schedules' values by hand.

Ridge: ``L_T(w, lam) = 0.5 mean((X w - y)^2) + 0.5 sum(lam w^2)`` has Hessian
``A = X^T X / n + diag(lam)``, minimiser ``w* = A^-1 X^T y / n`` and mixed derivative
``d2 L_T / dw dlam = diag(w)``, so the implicit hypergradient of ``L_V`` with ``x`` the solve's
answer to ``A x = dL_V/dw`` is ``-(x * w*)`` (per weight; summed for a scalar ``lam``).
"""

from __future__ import annotations

import math

import pytest
import torch

from nestopt.hyper import implicit_hypergradient
from nestopt.schedule import constant, cosine, exponential, join, linear, step_decay, warmup_then

DT = torch.float64
N, D, M = 50, 6, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, D, dtype=DT)
    y = x @ torch.randn(D, generator=g, dtype=DT) + 0.3 * torch.randn(N, generator=g, dtype=DT)
    xv = torch.randn(M, D, generator=g, dtype=DT)
    yv = xv @ torch.randn(D, generator=g, dtype=DT)
    return x, y, xv, yv


X, Y, XV, YV = _data()


def inner(w, lam):
    return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam * w * w).sum()


def outer(w, lam):
    return 0.5 * ((XV @ w - YV) ** 2).mean()


def _hessian(lam):
    return X.T @ X / N + torch.diag(lam.expand(D))


def _w_star(lam):
    return torch.linalg.solve(_hessian(lam), X.T @ Y / N)


def _v(w):
    """dL_V/dw."""
    return XV.T @ (XV @ w - YV) / M


LAM = torch.linspace(0.05, 0.5, D, dtype=DT)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver, kw", [("dense", {}), ("cg", {"iters": 30}), ("neumann", {"iters": 600})])
def test_damped_solves_give_the_damped_closed_form(solver, kw):
    """damping d solves (A + d I) x = v: the answer is -((A + d I)^-1 v) * w*, not the undamped one."""
    w = _w_star(LAM)
    damping = 0.3
    a = _hessian(LAM) + damping * torch.eye(D, dtype=DT)
    want = -(torch.linalg.solve(a, _v(w)) * w)
    undamped = -(torch.linalg.solve(_hessian(LAM), _v(w)) * w)
    assert rel(want, undamped) > 0.1
    hg, info = implicit_hypergradient(inner, outer, w, LAM, solver=solver, damping=damping, return_info=True, **kw)
    assert rel(hg, want) < 1e-8
    if solver == "dense":  # the smallest eigenvalue of the damped Hessian
        assert info.min_curvature == pytest.approx(float(torch.linalg.eigvalsh(a)[0]), rel=1e-10)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_truncated_neumann_series_is_its_closed_form(iters):
    """K terms: x_K = alpha sum_{k<K} (I - alpha A)^k v, residual ||(I - alpha A)^K v|| / ||v||."""
    w = _w_star(LAM)
    a = _hessian(LAM)
    alpha = 0.4
    b = _v(w)
    step = torch.eye(D, dtype=DT) - alpha * a
    x, term = torch.zeros(D, dtype=DT), b.clone()
    for _ in range(iters):
        x = x + alpha * term
        term = step @ term
    hg, info = implicit_hypergradient(inner, outer, w, LAM, solver="neumann", iters=iters, alpha=alpha,
                                      return_info=True)
    torch.testing.assert_close(hg, -(x * w), rtol=1e-10, atol=1e-13)
    assert info.residual == pytest.approx(float(term.norm() / b.norm()), rel=1e-10)
    assert info.alpha == alpha and info.iterations == iters
    if iters == 1:  # one term: alpha v
        torch.testing.assert_close(hg, -(alpha * b * w), rtol=1e-12, atol=1e-15)


def test_neumann_estimates_alpha_as_one_over_the_top_eigenvalue():
    w = _w_star(LAM)
    top = float(torch.linalg.eigvalsh(_hessian(LAM))[-1])
    _, info = implicit_hypergradient(inner, outer, w, LAM, solver="neumann", iters=5, return_info=True,
                                     max_residual=10.0)
    # 20 power iterations: a Rayleigh quotient at or just below the top eigenvalue
    assert 1.0 / top <= info.alpha <= 1.02 / top


def test_one_cg_iteration_is_the_steepest_descent_step():
    """x_1 = (v.v / v.Av) v; residual ||v - x_1-step|| / ||v||; curvature v.Av / v.v."""
    w = _w_star(LAM)
    a = _hessian(LAM)
    b = _v(w)
    step = float(b @ b) / float(b @ a @ b)
    x1 = step * b
    hg, info = implicit_hypergradient(inner, outer, w, LAM, solver="cg", iters=1, max_residual=1.0, return_info=True)
    torch.testing.assert_close(hg, -(x1 * w), rtol=1e-12, atol=1e-15)
    assert info.residual == pytest.approx(float((b - a @ x1).norm() / b.norm()), rel=1e-10)
    assert info.min_curvature == pytest.approx(float(b @ a @ b) / float(b @ b), rel=1e-12)
    # D iterations: exact, up to rounding (CG on a D-dimensional SPD system)
    exact = -(torch.linalg.solve(a, b) * w)
    assert rel(implicit_hypergradient(inner, outer, w, LAM, solver="cg", iters=D), exact) < 1e-9


def test_scalar_lam_sums_the_per_weight_hypergradient_and_matches_finite_differences():
    lam = torch.tensor(0.2, dtype=DT)
    w = _w_star(lam)
    exact = -float(torch.linalg.solve(_hessian(lam), _v(w)) @ w)

    def val(l):
        return float(outer(_w_star(torch.tensor(l, dtype=DT)), None))

    fd = (val(0.2 + 1e-6) - val(0.2 - 1e-6)) / 2e-6
    assert exact == pytest.approx(fd, rel=1e-6)
    for solver, kw in (("dense", {}), ("cg", {"iters": D}), ("neumann", {"iters": 800})):
        hg = implicit_hypergradient(inner, outer, w, lam, solver=solver, **kw)
        assert hg.shape == () and float(hg) == pytest.approx(exact, rel=1e-8), solver


def test_sample_weights_as_hyperparameters_match_their_closed_form():
    """A cross term that is not diagonal: lam_i weights example i's squared error (exp(lam_i)),
    plus a fixed ridge mu. Then dg/dlam_i = exp(lam_i) x_i (x_i . w - y_i) / n and the
    hypergradient is -exp(lam_i) (x_i . s)(x_i . w - y_i) / n with s = A^-1 v. Checked also
    against finite differences of the closed-form validation loss."""
    mu = 0.1
    lam0 = 0.3 * torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=DT)

    def inner_w(w, lam):
        return 0.5 * (lam.exp() * (X @ w - Y) ** 2).mean() + 0.5 * mu * (w * w).sum()

    def solve(lam):
        dmat = lam.exp()
        a = X.T @ (dmat[:, None] * X) / N + mu * torch.eye(D, dtype=DT)
        return torch.linalg.solve(a, X.T @ (dmat * Y) / N), a

    w, a = solve(lam0)
    s = torch.linalg.solve(a, _v(w))
    want = -lam0.exp() * (X @ s) * (X @ w - Y) / N
    for i in (0, 7):
        up, dn = lam0.clone(), lam0.clone()
        up[i] += 1e-6
        dn[i] -= 1e-6
        fd = (float(outer(solve(up)[0], None)) - float(outer(solve(dn)[0], None))) / 2e-6
        assert float(want[i]) == pytest.approx(fd, rel=1e-5, abs=1e-10)
    for solver, kw in (("dense", {}), ("cg", {"iters": 40})):
        hg = implicit_hypergradient(inner_w, outer, w, lam0, solver=solver, **kw)
        assert rel(hg, want) < 1e-8, solver


def test_weights_split_over_several_tensors_give_the_same_answer():
    """params as a dict of two tensors (the multi-tensor paths of the solvers) and hparams to match."""
    w = _w_star(LAM)
    exact = -(torch.linalg.solve(_hessian(LAM), _v(w)) * w)

    def cat(t):
        return torch.cat([t["a"], t["b"]])

    def inner_d(wd, ld):
        return inner(cat(wd), cat(ld))

    def outer_d(wd, ld):
        return outer(cat(wd), cat(ld))

    wd = {"a": w[:2].clone(), "b": w[2:].clone()}
    ld = {"a": LAM[:2].clone(), "b": LAM[2:].clone()}
    for solver, kw in (("dense", {}), ("cg", {"iters": 30}), ("neumann", {"iters": 600})):
        hg = implicit_hypergradient(inner_d, outer_d, wd, ld, solver=solver, **kw)
        assert rel(cat(hg), exact) < 1e-8, solver


# -- schedules ---------------------------------------------------------------------------------------

def test_linear_and_cosine_by_hand():
    up, down = linear(0.1, 0.5, 8), linear(1.0, 0.2, 4)
    assert [up(t) for t in (0, 2, 8, 20)] == pytest.approx([0.1, 0.2, 0.5, 0.5])
    assert [down(t) for t in (0, 1, 3.5, 4, 9)] == pytest.approx([1.0, 0.8, 0.3, 0.2, 0.2])
    c = cosine(1.0, 0.2, 8)
    quarter = 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2  # 0.8828...
    assert [c(t) for t in (0, 2, 4, 6, 8, 100)] == pytest.approx(
        [1.0, quarter, 0.6, 0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2, 0.2, 0.2])
    assert quarter == pytest.approx(0.88284271247, rel=1e-10)


def test_step_decay_and_exponential_by_hand():
    sd = step_decay(1.0, [2, 5], 0.5)
    assert [sd(t) for t in (0, 1.999, 2, 4.5, 5, 50)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    ex = exponential(2.0, 0.5, every=4, min_value=0.3)
    assert [ex(t) for t in (0, 2, 4, 6)] == pytest.approx([2.0, 2.0 * 0.5 ** 0.5, 1.0, 2.0 * 0.5 ** 1.5])
    assert ex(10) == pytest.approx(2.0 * 0.5 ** 2.5)  # 0.354: above the floor
    assert ex(11) == 0.3  # 2 * 0.5^2.75 = 0.297: floored
    assert ex(100) == 0.3


def test_join_restarts_each_piece_clock_at_its_boundary():
    s = join([constant(1.0), linear(0.0, 1.0, 10), constant(5.0)], [2, 12])
    assert [s(t) for t in (0, 1.999, 2, 7, 11.5, 12, 30)] == pytest.approx([1.0, 1.0, 0.0, 0.5, 0.95, 5.0, 5.0])
    w = warmup_then(cosine(1.0, 0.0, 10), 0.1, 1.0, 5)
    assert [w(t) for t in (0, 2.5, 5, 10, 15, 40)] == pytest.approx([0.1, 0.55, 1.0, 0.5, 0.0, 0.0], abs=1e-15)
    decay = cosine(1.0, 0.0, 10)
    assert warmup_then(decay, 0.1, 1.0, 0) is decay
