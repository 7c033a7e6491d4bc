"""Optimizers against numbers worked out by hand: Polyak and PolyakAdam, LearnedOptimizer with
networks whose output is set by hand, complex momentum and complex Adam over their first steps,
and the hypergradient optimizers' rate update. Everything in float64, so the tolerances are tight
and any wrong coefficient or sign shows."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from nestopt.meta import DirectUpdateMLP, HybridAdamNet, LinearUpdate
from nestopt.optim import (ComplexAdam, ComplexMomentum, HypergradientAdam, HypergradientSGD, LearnedOptimizer, Polyak,
                           PolyakAdam)

F64 = torch.float64


def _t(*xs):
    return torch.tensor(xs, dtype=F64)


def _param(*xs):
    return torch.nn.Parameter(_t(*xs))


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a.detach() if torch.is_tensor(a) else _t(a), b, rtol=tol, atol=tol)


# -- Polyak ------------------------------------------------------------------------------------------

def _asym(x):
    """0.5 (x0^2 + 100 x1^2) + 3: minimum 3 at the origin, curvatures 1 and 100."""
    return 0.5 * (x[0] ** 2 + 100.0 * x[1] ** 2) + 3.0


def _asym_grad(x):
    return torch.stack([x[0], 100.0 * x[1]])


@pytest.mark.parametrize("f_star", [3.0, 1.0])
def test_polyak_step_is_the_gap_over_the_squared_gradient_norm_with_f_star(f_star):
    """eta = (f - f*) / ||g||^2 with f* the minimum (3) or below it (1)."""
    x = _param(2.0, -0.5)
    opt = Polyak([x], f_star=f_star)
    ref = x.detach().clone()
    for _ in range(4):
        f, g = float(_asym(ref)), _asym_grad(ref)
        eta = (f - f_star) / float(g @ g)
        ref = ref - eta * g

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = _asym(x)
            loss.backward()
            return loss

        opt.step(closure)
        _close(x, ref)
        assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(eta, rel=1e-12)
    # first step by hand: f = 0.5 (4 + 25) + 3 = 17.5, g = (2, -50), ||g||^2 = 2504
    x = _param(2.0, -0.5)
    opt = Polyak([x], f_star=f_star, lr=0.5)
    x.grad = _t(2.0, -50.0)
    opt.step(loss=17.5)
    eta = (17.5 - f_star) / 2504.0
    assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(eta, rel=1e-14)
    _close(x, _t(2.0 - 0.5 * eta * 2.0, -0.5 + 0.5 * eta * 50.0))


def _two_groups(**kw):
    a, b = _param(1.0, 1.0), _param(-2.0)
    opt = Polyak([{"params": [a]}, {"params": [b]}], scope="group", **kw)
    a.grad, b.grad = _t(3.0, 4.0), _t(1.0)  # s = ||g||^2: 25 and 1
    opt.step(loss=2.0)
    return a, b, [g["polyak"]["eta"] for g in opt.param_groups]


@pytest.mark.parametrize("share, etas", [
    ("norm", (5 / 6 * 2 / 25, 1 / 6 * 2 / 1)),   # shares ||g_i|| / sum ||g_j||: 5/6 and 1/6
    ("equal", (0.5 * 2 / 25, 0.5 * 2 / 1)),
    ("whole", (2 / 25, 2 / 1)),
    ("global", (2 / 26, 2 / 26)),                # shares s_i / sum s_j: one step size for all
])
def test_polyak_shares_by_hand_with_a_multiplier(share, etas):
    a, b, got = _two_groups(share=share, lr=0.5)
    assert got == [pytest.approx(e, rel=1e-14) for e in etas]
    _close(a, _t(1.0 - 0.5 * etas[0] * 3.0, 1.0 - 0.5 * etas[0] * 4.0))
    _close(b, _t(-2.0 - 0.5 * etas[1] * 1.0))


def test_polyak_max_lr_caps_each_piece_on_its_own():
    # norm shares: eta = (1/15, 1/3); a cap of 0.2 binds on the second piece only
    a, b, got = _two_groups(share="norm", max_lr=0.2)
    assert got == [pytest.approx(1 / 15, rel=1e-14), 0.2]
    _close(a, _t(1.0 - 3.0 / 15, 1.0 - 4.0 / 15))
    _close(b, _t(-2.0 - 0.2))


def test_polyak_eps_enters_the_denominator():
    x = _param(0.0, 0.0)
    opt = Polyak([x], eps=5.0)
    x.grad = _t(3.0, 4.0)
    opt.step(loss=2.0)
    assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(2.0 / 30.0, rel=1e-14)
    _close(x, _t(-0.2, -4.0 / 15))


def test_polyak_rms_preconditioned_first_two_steps_by_hand():
    """D = sqrt(v_hat) + precond_eps with v the 0.999 average of g^2; u = g / D; eta = gap / g.u."""
    x = _param(1.0, -1.0, 2.0)
    opt = Polyak([x], precondition="rms", precond_eps=1e-3)
    g1, g2 = _t(0.5, -2.0, 4.0), _t(1.0, 1.0, -3.0)
    ref = x.detach().clone()
    v = torch.zeros(3, dtype=F64)
    for t, (g, loss) in enumerate(((g1, 3.0), (g2, 1.5)), 1):
        v = 0.999 * v + 0.001 * g * g
        u = g / ((v / (1 - 0.999 ** t)).sqrt() + 1e-3)
        ref = ref - (loss / float(g @ u)) * u
        x.grad = g.clone()
        opt.step(loss=loss)
        _close(x, ref)
    # step 1 in numbers: v_hat = g^2, so u = g / (|g| + 1e-3)
    u1 = g1 / (g1.abs() + 1e-3)
    assert float(g1 @ u1) == pytest.approx(0.5 ** 2 / 0.501 + 4 / 2.001 + 16 / 4.001, rel=1e-14)


def test_polyak_adam_first_two_steps_by_hand():
    """Adam's bias-corrected direction with the Polyak magnitude (default betas)."""
    x = _param(1.0, -1.0, 2.0)
    opt = PolyakAdam([x], f_star=0.5)
    g1, g2 = _t(0.5, -2.0, 4.0), _t(1.0, 1.0, -3.0)
    m = torch.zeros(3, dtype=F64)
    v = torch.zeros(3, dtype=F64)
    ref = x.detach().clone()
    for t, (g, loss) in enumerate(((g1, 3.0), (g2, 2.0)), 1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        u = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        eta = (loss - 0.5) / float(g @ u)
        ref = ref - eta * u
        x.grad = g.clone()
        opt.step(loss=loss)
        _close(x, ref)
        assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(eta, rel=1e-12)
    # step 2 in numbers: m_hat = (0.09 g1 + 0.1 g2) / 0.19
    assert float((m / 0.19)[0]) == pytest.approx((0.045 + 0.1) / 0.19, rel=1e-14)


def test_polyak_adam_skips_a_non_descending_piece_but_updates_its_moments():
    x = _param(1.0)
    opt = PolyakAdam([x])
    x.grad = _t(1.0)
    opt.step(loss=1.0)
    after1 = x.detach().clone()
    x.grad = _t(-0.05)  # m = 0.09 - 0.005 > 0 while g < 0: g . u < 0, no step
    opt.step(loss=1.0)
    _close(x, after1)
    assert float(opt.state[x]["exp_avg"]) == pytest.approx(0.085, rel=1e-14)
    group = opt.param_groups[0]
    counts = group["counters"] if "counters" in group else group["polyak"]  # the counters' new home, or the old
    assert counts["zero_grad"] == 1 and counts["steps"] == 1


# -- LearnedOptimizer ----------------------------------------------------------------------------------

W_LIN = (0.5, -0.3, 0.2, 0.1, 0.7, -0.4)
B_LIN = 0.05


def _linear_by_hand(p0, grads, lr, wd, c):
    """The documented LinearUpdate step: decay first, then delta = -c (w . x + b) with
    x = [g/r, m/r, m_slow/r, p/r_p, m_hat/v_hat, g/v_hat]."""
    p = p0.clone()
    m = torch.zeros_like(p)
    ms = torch.zeros_like(p)
    v = torch.zeros_like(p)
    vbar = 0.0
    for t, g in enumerate(grads, 1):
        a = lr * c
        p = p * (1 - a * wd)
        m = 0.9 * m + 0.1 * g
        ms = 0.99 * ms + 0.01 * g
        v = 0.999 * v + 0.001 * g * g
        vbar = 0.999 * vbar + 0.001 * float((g * g).mean())
        r = math.sqrt(vbar / (1 - 0.999 ** t) + 1e-30)
        rp = math.sqrt(float((p * p).mean()) + 1e-30) + 1e-3
        vh = (v / (1 - 0.999 ** t)).sqrt() + 1e-8
        feats = [g / r, m / r, ms / r, p / rp, (m / (1 - 0.9 ** t)) / vh, g / vh]
        p = p - a * (sum(w * f for w, f in zip(W_LIN, feats)) + B_LIN)
    return p


def test_learned_linear_network_steps_as_its_formula():
    net = LinearUpdate(step_mult=0.1).to(F64)
    with torch.no_grad():
        net.net.weight.copy_(_t(*W_LIN).reshape(1, 6))
        net.net.bias.fill_(B_LIN)
    p0 = _t(1.0, -2.0, 0.5, 3.0, -0.25)
    grads = [_t(0.2, -1.0, 0.4, 2.0, 0.1), _t(-0.3, 0.5, 0.5, 1.0, -0.2), _t(0.1, 0.1, -0.6, 0.3, 0.0)]
    q = torch.nn.Parameter(p0.clone())
    opt = LearnedOptimizer([q], net=net, lr=2.0, weight_decay=0.1, compile=False)
    for k, g in enumerate(grads, 1):
        q.grad = g.clone()
        opt.step()
        _close(q, _linear_by_hand(p0, grads[:k], 2.0, 0.1, 0.1), tol=1e-12)
    # step 1 in numbers for the Adam-ratio weight alone: m_hat / v_hat = g / (|g| + 1e-8) = sign(g)
    net1 = LinearUpdate(step_mult=0.1).to(F64)
    with torch.no_grad():
        net1.net.weight.copy_(_t(0, 0, 0, 0, 1.0, 0).reshape(1, 6))
        net1.net.bias.zero_()
    q = torch.nn.Parameter(p0.clone())
    opt = LearnedOptimizer([q], net=net1, lr=1.0, compile=False)
    q.grad = grads[0].clone()
    opt.step()
    _close(q, p0 - 0.1 * grads[0].sign(), tol=1e-8)


def test_learned_hybrid_network_is_adam_at_its_learned_rate():
    """Last layer zero but its bias b: s = 3 tanh(b / 3), so every step is AdamW at lr * base_lr * e^s."""
    net = HybridAdamNet(base_lr=1e-2).to(F64)
    with torch.no_grad():
        net.net[-1].bias.fill_(0.6)
    rate = 0.5 * 1e-2 * math.exp(3.0 * math.tanh(0.2))
    assert rate > 0.5 * 1e-2 * 1.7  # well away from the untrained rate
    q = torch.nn.Parameter(_t(1.0, -2.0, 0.5))
    opt = LearnedOptimizer([q], net=net, lr=0.5, weight_decay=0.2)
    ref = q.detach().clone()
    m = torch.zeros(3, dtype=F64)
    v = torch.zeros(3, dtype=F64)
    for t, g in enumerate((_t(0.3, -1.0, 2.0), _t(-0.1, 0.4, 1.0), _t(0.2, 0.2, -0.5)), 1):
        ref = ref * (1 - rate * 0.2)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - rate * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        q.grad = g.clone()
        opt.step()
        _close(q, ref, tol=1e-8)  # torch's AdamW kernel keeps its step count in float32


def test_learned_mlp_with_a_constant_output_steps_by_its_formula():
    """Last layer zero, bias (d, a): delta = -step_mult d exp(exp_mult a) for every element; weight
    decay scaled by lr and step_mult, before the step."""
    net = DirectUpdateMLP(step_mult=1e-2, exp_mult=0.5).to(F64)
    with torch.no_grad():
        net.net[-1].weight.zero_()
        net.net[-1].bias.copy_(_t(0.3, -0.4))
    delta = -1e-2 * 0.3 * math.exp(0.5 * -0.4)
    p0 = _t(1.0, -2.0, 0.5, 3.0)
    for chunk in (3, 1 << 15):  # chunked across the tensor, and whole
        q = torch.nn.Parameter(p0.clone())
        opt = LearnedOptimizer([q], net=net, lr=2.0, weight_decay=0.5, chunk=chunk)
        ref = p0.clone()
        for g in (_t(1.0, -1.0, 2.0, 0.5), _t(0.3, 0.3, -0.3, 0.0)):
            ref = ref * (1 - 2.0 * 1e-2 * 0.5) + 2.0 * delta
            q.grad = g.clone()
            opt.step()
            _close(q, ref)


# -- complex momentum ------------------------------------------------------------------------------------

G1, G2, G3 = _t(1.0, -2.0, 0.5), _t(0.5, 1.0, -1.0), _t(-0.25, 0.0, 2.0)
THETA0 = _t(0.1, 0.2, 0.3)


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_momentum_first_three_steps_by_hand(foreach):
    """beta = 0.5 i (phase pi/2), torch's sign m <- beta m + g, theta <- theta - lr Re m:
    m1 = g1; m2 = 0.5i g1 + g2 (Re: g2); m3 = -0.25 g1 + 0.5i g2 + g3 (Re: g3 - 0.25 g1)."""
    p = torch.nn.Parameter(THETA0.clone())
    opt = ComplexMomentum([p], lr=0.1, beta=0.5, phase=math.pi / 2, foreach=foreach)
    want = [THETA0 - 0.1 * G1]
    want.append(want[-1] - 0.1 * G2)
    want.append(want[-1] - 0.1 * (G3 - 0.25 * G1))
    for g, w in zip((G1, G2, G3), want):
        p.grad = g.clone()
        opt.step()
        _close(p, w, tol=1e-14)
    # the paper's mu = -m
    torch.testing.assert_close(opt.complex_buffer(p), torch.complex(-(G3 - 0.25 * G1), -0.5 * G2), rtol=0, atol=1e-14)


def test_complex_momentum_negative_phase_and_weight_decay_by_hand():
    """beta = -0.5 (phase pi) with weight decay 0.1 added to the gradient: m2 = -0.5 m1 + g2 + 0.1 theta1."""
    p = torch.nn.Parameter(THETA0.clone())
    opt = ComplexMomentum([p], lr=0.1, beta=0.5, phase=math.pi, weight_decay=0.1)
    m1 = G1 + 0.1 * THETA0
    th1 = THETA0 - 0.1 * m1
    m2 = -0.5 * m1 + G2 + 0.1 * th1
    th2 = th1 - 0.1 * m2
    for g, w in ((G1, th1), (G2, th2)):
        p.grad = g.clone()
        opt.step()
        _close(p, w, tol=1e-14)


def test_complex_adam_first_two_steps_by_hand():
    """beta1 = 0.5 i, beta2 = 0.5, decoupled decay 0.1. m1 = (1 - 0.5i) g1 with correction
    1 / (1 - 0.5i): Re = g1. m2 = (0.25 + 0.5i) g1 + (1 - 0.5i) g2 with correction 1 / 1.25:
    Re = 0.2 g1 + 0.8 g2. v_hat1 = g1^2, v_hat2 = (0.25 g1^2 + 0.5 g2^2) / 0.75."""
    p = torch.nn.Parameter(THETA0.clone())
    lr, wd, eps = 0.1, 0.1, 1e-8
    opt = ComplexAdam([p], lr=lr, betas=(0.5, 0.5), phase=math.pi / 2, eps=eps, weight_decay=wd)
    th1 = THETA0 * (1 - lr * wd) - lr * G1 / (G1.abs() + eps)
    v2 = (0.25 * G1 ** 2 + 0.5 * G2 ** 2) / 0.75
    th2 = th1 * (1 - lr * wd) - lr * (0.2 * G1 + 0.8 * G2) / (v2.sqrt() + eps)
    for g, w in ((G1, th1), (G2, th2)):
        p.grad = g.clone()
        opt.step()
        _close(p, w, tol=1e-13)
    # the complex numbers used above: (1 - beta1) m1 / (1 - beta1) = g1, and 1 / (1 - beta1^2) = 0.8
    b1 = cmath.rect(0.5, math.pi / 2)
    assert abs(1 / (1 - b1 ** 2) - 0.8) < 1e-15 and abs(b1 * (1 - b1) - (0.25 + 0.5j)) < 1e-15


# -- hypergradient optimizers ------------------------------------------------------------------------------

def test_hypergradient_sgd_scales_each_group_from_its_own_gradients():
    """Group a's gradients agree (cos 0.6: the rate grows), group b's reverse (cos -1: it shrinks)."""
    a, b = _param(0.0, 0.0), _param(0.0)
    opt = HypergradientSGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1, beta=0.5)
    a.grad, b.grad = _t(1.0, 0.0), _t(2.0)
    opt.step()
    assert [g["hd_scale"] for g in opt.param_groups] == [1.0, 1.0]  # nothing to compare yet
    _close(a, _t(-0.1, 0.0))
    _close(b, _t(-0.4))
    a.grad, b.grad = _t(3.0, 4.0), _t(-1.0)
    opt.step()
    sa, sb = (g["hd_scale"] for g in opt.param_groups)
    assert sa == pytest.approx(1 + 0.5 * 0.6, rel=1e-14)
    assert sb == pytest.approx(1 - 0.5, rel=1e-14)
    _close(a, _t(-0.1 - 0.1 * 1.3 * 3.0, -0.1 * 1.3 * 4.0))
    _close(b, _t(-0.4 + 0.2 * 0.5))


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
def test_hypergradient_adam_second_step_by_hand(rule):
    """u1 = m_hat1 / (sqrt(v_hat1) + eps) = g1 / (|g1| + eps); the scale after step 2 comes from
    g2 . u1, and step 2 is AdamW at lr * scale."""
    lr, beta, wd, eps = 0.01, 0.05, 0.1, 1e-8
    p0 = _t(1.0, -2.0, 0.5)
    g1, g2 = _t(0.5, -1.0, 2.0), _t(1.0, -0.5, 1.5)
    p = torch.nn.Parameter(p0.clone())
    opt = HypergradientAdam([p], lr=lr, beta=beta, weight_decay=wd, eps=eps, rule=rule)
    p.grad = g1.clone()
    opt.step()
    p1 = p0 * (1 - lr * wd) - lr * g1 / (g1.abs() + eps)
    _close(p, p1)
    assert opt.param_groups[0]["hd_scale"] == 1.0
    u1 = g1 / (g1.abs() + eps)
    dot = float(g2 @ u1)
    assert dot == pytest.approx(3.0, rel=1e-7)  # 0.5 + 0.5 + 1.5
    if rule == "multiplicative":
        s = 1 + beta * dot / (float(g2.norm()) * float(u1.norm()))
    else:
        s = 1 + beta / lr * dot
    p.grad = g2.clone()
    opt.step()
    assert opt.param_groups[0]["hd_scale"] == pytest.approx(s, rel=1e-12)
    m = 0.09 * g1 + 0.1 * g2
    v = 0.000999 * g1 ** 2 + 0.001 * g2 ** 2
    p2 = p1 * (1 - lr * s * wd) - lr * s * (m / 0.19) / ((v / (1 - 0.999 ** 2)).sqrt() + eps)
    _close(p, p2)
