"""Complex momentum, the two-player runner, the bilinear game's analysis, Lyapunov exponents
and Ridge Rider."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

import nestopt.optim.complex as cmod
from nestopt.games import linear, play
from nestopt.games.lyapunov import lyapunov_exponent, sign_changes
from nestopt.games.ridge_rider import SymmetricWells, distinct, random_restarts, ridge_rider
from nestopt.optim import ComplexAdam, ComplexMomentum
from nestopt.studies.games import LRS, MAGS, PHASES, measured_rate
from nestopt.tasks import BilinearGame, DiracGAN, MixtureGAN, mode_stats


def _pair(shapes=((30, 70), (5,)), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return [x.clone().requires_grad_() for x in w], [x.clone().requires_grad_() for x in w]


def _lockstep(a, b, oa, ob, steps, seed):
    """Step both optimizers on identical random gradients; True if the parameters stay bitwise equal."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g)
            x.grad, y.grad = grad.clone(), grad.clone()
        oa.step(), ob.step()
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            return False
    return True


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_momentum_phase_zero_is_heavy_ball_bitwise(foreach):
    a, b = _pair()
    oa = ComplexMomentum(a, lr=0.01, beta=0.9, phase=0.0, foreach=foreach)
    ob = torch.optim.SGD(b, lr=0.01, momentum=0.9, foreach=foreach)
    assert _lockstep(a, b, oa, ob, 25, seed=1)
    assert all(torch.equal(oa.state[x]["momentum_buffer"][0], ob.state[y]["momentum_buffer"]) for x, y in zip(a, b))


@pytest.mark.parametrize("path", ["blocked-fused", "blocked-plain", "foreach-fused", "foreach-plain"])
def test_complex_momentum_matches_complex_arithmetic(path, monkeypatch):
    """mu <- beta mu - g, theta += lr Re(mu), against complex128 arithmetic; blocks of 1000
    elements so a 2,500-element tensor crosses block boundaries."""
    monkeypatch.setattr(cmod, "_BLOCK", 1000)
    monkeypatch.setattr(cmod, "_USE_FUSED", path.endswith("-fused"))
    p0 = torch.randn(2500, dtype=torch.float64)
    p = p0.clone().requires_grad_()
    lr, mag, phase, wd = 0.05, 0.8, 1.0, 0.01
    opt = ComplexMomentum([p], lr=lr, beta=mag, phase=phase, weight_decay=wd, foreach=path.startswith("foreach"))
    beta = cmath.rect(mag, phase)
    mu = torch.zeros(2500, dtype=torch.complex128)
    theta = p0.clone()
    for _ in range(12):
        g = torch.randn(2500, dtype=torch.float64)
        p.grad = g
        opt.step()
        mu = beta * mu - (g + wd * theta)
        theta = theta + lr * mu.real
    torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.complex_buffer(p), mu, rtol=0, atol=1e-12)
    st = opt.state[p]["momentum_buffer"]
    assert st.dtype == torch.float64 and st.shape == (2, 2500)


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_momentum_mixed_dtypes_and_strided_params(foreach):
    """A float32 and a float64 tensor in one group, and a transposed (non-contiguous) parameter,
    step like each alone."""
    base = [torch.randn(4, 6), torch.randn(5, dtype=torch.float64), torch.randn(6, 4)]

    def params():
        return [base[0].clone().requires_grad_(), base[1].clone().requires_grad_(),
                base[2].clone().t().requires_grad_()]  # t() of a leaf copy: a non-contiguous leaf

    together = params()
    assert not together[2].is_contiguous()
    opt = ComplexMomentum(together, lr=0.1, beta=0.8, phase=1.0, foreach=foreach)
    alone = [p.detach().contiguous().requires_grad_() for p in params()]  # contiguous copies, one group each
    opts = [ComplexMomentum([p], lr=0.1, beta=0.8, phase=1.0, foreach=False) for p in alone]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in together]
        for p, q, gr in zip(together, alone, grads):
            p.grad, q.grad = gr.clone(), gr.clone().contiguous()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_complex_momentum_rejects_bad_arguments():
    w = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="beta=1.0"):
        ComplexMomentum(w, beta=1.0)
    with pytest.raises(ValueError, match="phase=4.0"):
        ComplexMomentum(w, phase=4.0)
    with pytest.raises(ValueError, match="lr=-1"):
        ComplexMomentum(w, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        ComplexAdam(w, betas=(0.9,))


def test_complex_adam_phase_zero_is_adam_bitwise():
    a, b = _pair()
    oa = ComplexAdam(a, lr=1e-2, betas=(0.9, 0.99), phase=0.0, weight_decay=0.1)
    ob = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    assert _lockstep(a, b, oa, ob, 20, seed=2)


def test_complex_adam_matches_complex_arithmetic_and_passes_a_constant_gradient(monkeypatch):
    monkeypatch.setattr(cmod, "_BLOCK", 16)  # 50 elements: four blocks, the last partial
    p0 = torch.randn(50, dtype=torch.float64)
    p = p0.clone().requires_grad_()
    opt = ComplexAdam([p], lr=0.01, betas=(0.9, 0.999), phase=0.7)
    b1 = cmath.rect(0.9, 0.7)
    m = torch.zeros(50, dtype=torch.complex128)
    v = torch.zeros(50, dtype=torch.float64)
    theta = p0.clone()
    for t in range(1, 16):
        g = torch.randn(50, dtype=torch.float64)
        p.grad = g
        opt.step()
        m, v = b1 * m + (1 - b1) * g, 0.999 * v + 0.001 * g * g
        theta = theta - 0.01 * (m / (1 - b1 ** t)).real / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-12)
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = ComplexAdam([q], lr=0.1, phase=2.0)
    for k in range(1, 6):  # unit DC gain and complex bias correction: a constant gradient moves lr per step
        q.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(q.detach(), torch.full((3,), -0.1 * k, dtype=torch.float64), rtol=0, atol=1e-6)


def _svd_coords(game, players):
    u, s, vh = torch.linalg.svd(game.A)
    return u.T @ players[0].v.detach(), vh @ players[1].v.detach(), s


@pytest.mark.parametrize("method,mode,hp", [
    ("gda", "simultaneous", {"lr": 0.3}), ("gda-alt", "alternating", {"lr": 0.3}),
    ("extragradient", "extragradient", {"lr": 0.3}), ("optimistic", "optimistic", {"lr": 0.3}),
    ("momentum", "simultaneous", {"lr": 0.3, "beta": 0.7, "phase": 1.2}),
    ("momentum-alt", "alternating", {"lr": 0.3, "beta": 0.7, "phase": 2.2})])
def test_runner_trajectory_equals_the_linear_model(method, mode, hp):
    """The optimizers run through play() and the scalar block matrices agree step for step
    (in each singular direction), so the analysis describes what the code does."""
    game = BilinearGame(dim=3)
    players = game.init(0)
    x, y, s = _svd_coords(game, players)
    if "beta" in hp:
        opts = [ComplexMomentum(p.parameters(), lr=hp["lr"], beta=hp["beta"], phase=hp["phase"]) for p in players]
    else:
        opts = [torch.optim.SGD(p.parameters(), lr=hp["lr"]) for p in players]
    play(game, players, opts, 20, mode=mode)
    x20, y20, _ = _svd_coords(game, players)
    for k in range(3):
        m = linear.block_matrix(method, float(s[k]), hp["lr"], hp.get("beta", 0.0), hp.get("phase", 0.0))
        z = np.zeros(m.shape[0])
        z[0], z[1] = float(x[k]), float(y[k])
        for _ in range(20):
            z = m @ z
        assert abs(z[0] - float(x20[k])) < 1e-10 and abs(z[1] - float(y20[k])) < 1e-10


def test_closed_form_spectral_radii():
    for a in (0.1, 0.5, 1.5):
        assert linear.spectral_radius("gda", [1.0], a) == pytest.approx(math.sqrt(1 + a * a), rel=1e-12)
        assert linear.spectral_radius("gda-alt", [1.0], a) == pytest.approx(1.0, rel=1e-9)
        assert linear.spectral_radius("extragradient", [1.0], a) == pytest.approx(math.sqrt(1 - a * a + a ** 4),
                                                                                 rel=1e-12)
    with pytest.raises(ValueError, match="method='nope'"):
        linear.block_matrix("nope", 1.0, 0.1)


def test_gda_diverges_while_the_studys_complex_momentum_reaches_1e6():
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    best = linear.best("momentum", sv, LRS, MAGS, PHASES)  # the study's choice, same grid
    assert best["rho"] < 1
    players = game.init(0)
    start = game.distance(players)
    gda = play(game, players, [torch.optim.SGD(p.parameters(), lr=best["lr"]) for p in players], 300)
    assert gda[-1]["distance"] > 10 * start
    players = game.init(0)
    opts = [ComplexMomentum(p.parameters(), lr=best["lr"], beta=best["beta"], phase=best["phase"]) for p in players]
    steps = int(math.log(1e-6 / start) / math.log(best["rho"])) + 400
    hist = play(game, players, opts, steps, every=50)
    assert hist[-1]["distance"] < 1e-6


@pytest.mark.parametrize("method,mode", [("extragradient", "extragradient"), ("optimistic", "optimistic"),
                                         ("momentum-alt", "alternating")])
def test_measured_contraction_matches_spectral_radius(method, mode):
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    hp = {"lr": 0.3, "beta": 0.5 if "momentum" in method else 0.0, "phase": 2.0 if "momentum" in method else 0.0}
    rho = linear.spectral_radius(method, sv, hp["lr"], hp["beta"], hp["phase"])
    rate = measured_rate(game, hp, mode, steps=600)["rate"]
    assert abs(rate - rho) / rho < 0.01


def test_play_validates():
    game = BilinearGame(dim=2)
    players = game.init(0)
    opts = [torch.optim.SGD(p.parameters(), lr=0.1) for p in players]
    with pytest.raises(ValueError, match="mode='sideways'"):
        play(game, players, opts, 1, mode="sideways")
    with pytest.raises(ValueError, match="one per player"):
        play(game, players, opts[:1], 1)


def test_lyapunov_exponent_of_a_linear_update_is_log_spectral_radius():
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    for lr in (0.2, 0.4):
        e = lyapunov_exponent(game, lambda ps, lr=lr: [torch.optim.SGD(p.parameters(), lr=lr) for p in ps],
                              steps=300, warmup=100)
        assert e == pytest.approx(math.log(linear.spectral_radius("gda", sv, lr)), rel=0.02)


def test_lyapunov_sign_change_locates_the_dirac_gan_bifurcation():
    lr = 0.5
    gammas = [0.05, 0.1, 0.15, 0.2]
    ex = [lyapunov_exponent(DiracGAN(gamma=g, start=(1e-4, 1e-4)),
                            lambda ps: [torch.optim.SGD(p.parameters(), lr=lr) for p in ps], steps=200, warmup=20)
          for g in gammas]
    cross = sign_changes(gammas, ex)
    assert len(cross) == 1 and abs(cross[0] - lr / 4) < 0.01


def test_ridge_rider_reaches_distinct_minima():
    f = SymmetricWells(dim=3, coupling=0.0)
    out = ridge_rider(f, torch.zeros(3, dtype=torch.float64), budget=5_000)
    sols = distinct(out["solutions"])
    assert len(sols) == 8  # every sign pattern
    for x in sols:  # each is a minimum: zero gradient, positive-definite Hessian
        assert float(torch.func.grad(f)(x).norm()) < 1e-5
        assert float(torch.linalg.eigvalsh(torch.func.hessian(f)(x)).min()) > 0
    rs = random_restarts(f, 3, budget=2000, seed=0)
    assert rs["evals"] >= 2000 and rs["runs"] >= 1 and len(distinct(rs["solutions"])) >= 1


def test_mode_stats_scores_perfect_and_collapsed_generators():
    game = MixtureGAN()

    class Real(torch.nn.Module):
        def forward(self, z):
            return game.real(z.shape[0], torch.Generator().manual_seed(5))

    class Collapsed(torch.nn.Module):
        def forward(self, z):
            return game.centers[3].expand(z.shape[0], 2).clone()

    real = mode_stats(game, Real())
    assert real["modes"] == 8 and real["high_quality"] > 0.98
    assert mode_stats(game, Collapsed()) == {"modes": 1, "high_quality": 1.0}


def test_gan_game_trains_with_every_mode():
    game = MixtureGAN(hidden=16, batch=32)
    for mode in ("simultaneous", "alternating", "extragradient", "optimistic"):
        players = game.init(0)
        before = [p.detach().clone() for p in players[0].parameters()]
        hist = play(game, players, [ComplexAdam(p.parameters(), lr=1e-3) for p in players], 3, mode=mode)
        assert len(hist) == 4 and all(math.isfinite(v) for v in hist[-1]["losses"])
        assert any(not torch.equal(a, b) for a, b in zip(before, players[0].parameters()))
