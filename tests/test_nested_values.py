"""NestedOptimizer's features against hand-computed numbers.

The model is an explicit separable quadratic in float64 with two param groups (one tensor in the
first, two in the second) and plain SGD as the base, so every gradient and every update is known
in closed form: ``g = C * (p - target)`` and ``p' = p - lr * m * g``. Every tensor has at most 1024
elements, so the strided sample behind ``param_norm`` and ``update_ratio`` is the whole tensor and
those features are exact.

When each value is computed (see ``NestedOptimizer.step``): the features of step ``t`` are read
before its base step. ``grad_norm`` and ``curvature`` describe step ``t``'s own gradient (and, for
the curvature, the move from step ``t - 1``); ``param_norm`` and ``update_ratio`` are measured
around a base step that refreshes them (every ``stats_every`` steps), so step ``t`` shows the ones
measured at the last refreshing step before it: ``param_norm`` is the RMS of the parameters
*before* that update, ``update_ratio`` its ``||delta p|| / ||p||``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nestopt.optim import NestedOptimizer

F64 = torch.float64
TINY_LOG = math.log(1e-30)  # what a feature reads before it has a value (log of the floor)
LRS = (0.1, 0.05)

# group 0: a (4,); group 1: B (2, 3) and c (3,)
INIT = [torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64),
        torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.7, -0.4]], dtype=F64),
        torch.tensor([2.0, -1.0, 0.25], dtype=F64)]
CURV = [torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64),
        torch.tensor([[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]], dtype=F64),
        torch.tensor([6.0, 0.2, 1.0], dtype=F64)]
TARGET = [torch.zeros(4, dtype=F64),
          torch.tensor([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]], dtype=F64),
          torch.tensor([1.0, 1.0, 1.0], dtype=F64)]
GROUP_OF = [0, 1, 1]


def _loss(ps):
    return sum(0.5 * (c * (p - t) ** 2).sum() for p, c, t in zip(ps, CURV, TARGET))


def _grads(ps):
    return [c * (p - t) for p, c, t in zip(ps, CURV, TARGET)]


def _rms(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts) / sum(t.numel() for t in ts))


def _norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def _by_group(ts, i):
    return [t for t, g in zip(ts, GROUP_OF) if g == i]


def _setup(features, z=None, **kw):
    params = [torch.nn.Parameter(t.clone()) for t in INIT]
    groups = [{"params": [params[0]], "lr": LRS[0]}, {"params": params[1:], "lr": LRS[1]}]
    opt = NestedOptimizer(groups, torch.optim.SGD, signal="frozen", features=list(features), stats_every=1,
                          lr=LRS[0], **kw)
    if z is not None:  # the controller outputs z everywhere: a constant multiplier != 1
        with torch.no_grad():
            opt.controller.net[-1].weight.zero_()
            opt.controller.net[-1].bias.fill_(z)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = _loss(params)
        loss.backward()
        return loss

    return opt, params, closure


def _trajectory(n, mult=1.0):
    """Parameters p_0..p_n and gradients g_0..g_{n-1} of SGD at lr * mult, in closed form."""
    ps = [[t.clone() for t in INIT]]
    gs = []
    for _ in range(n):
        g = _grads(ps[-1])
        gs.append(g)
        ps.append([p - LRS[GROUP_OF[j]] * mult * gj for j, (p, gj) in enumerate(zip(ps[-1], g))])
    return ps, gs


def test_grad_param_norm_and_update_ratio_by_hand():
    opt, params, closure = _setup(["grad_norm", "param_norm", "update_ratio"])
    ps, gs = _trajectory(4)
    for t in range(4):
        opt.step(closure)
        table = opt.feature_table()
        for i in range(2):
            # this step's own gradient: log RMS (not norm) of the group's gradient
            assert table["grad_norm"][i] == pytest.approx(math.log(_rms(_by_group(gs[t], i))), rel=1e-12, abs=1e-12)
            if t == 0:  # nothing measured yet
                assert table["param_norm"][i] == TINY_LOG
                assert table["update_ratio"][i] == TINY_LOG
                continue
            before, after = _by_group(ps[t - 1], i), _by_group(ps[t], i)
            # the previous update: the parameters' RMS before it, and ||delta p|| / ||p||
            assert table["param_norm"][i] == pytest.approx(math.log(_rms(before)), rel=1e-12, abs=1e-12)
            ratio = _norm([a - b for a, b in zip(after, before)]) / _norm(before)
            assert table["update_ratio"][i] == pytest.approx(math.log(ratio), rel=1e-12, abs=1e-12)
            # and the same in closed form for SGD: ||lr g|| / ||p||
            closed = LRS[i] * _norm(_by_group(gs[t - 1], i)) / _norm(before)
            assert math.log(closed) == pytest.approx(table["update_ratio"][i], rel=1e-12, abs=1e-12)
    # the numbers themselves, for the first group after step 1 (a0 = [1, -2, 0.5, 3], lr 0.1):
    # g0 = [1, -4, 1.5, 12]; ||g0|| = sqrt(163.25); ||a0|| = sqrt(14.25); RMS(a0) = sqrt(14.25 / 4)
    opt2, _, closure2 = _setup(["param_norm", "update_ratio"])
    opt2.step(closure2)
    opt2.step(closure2)
    table = opt2.feature_table()
    assert table["param_norm"][0] == pytest.approx(0.5 * math.log(14.25 / 4), rel=1e-12)
    assert table["update_ratio"][0] == pytest.approx(math.log(0.1 * math.sqrt(163.25) / math.sqrt(14.25)), rel=1e-12)


def test_param_norm_is_read_before_the_step_and_differs_from_after():
    """Guard on the test above: the parameters' RMS before and after the update differ by far more
    than the tolerance, so reading it after the step would be caught."""
    opt, _, closure = _setup(["param_norm"])
    ps, _ = _trajectory(2)
    opt.step(closure)
    opt.step(closure)
    got = opt.feature_table()["param_norm"]
    for i in range(2):
        before, after = math.log(_rms(_by_group(ps[0], i))), math.log(_rms(_by_group(ps[1], i)))
        assert abs(before - after) > 0.05
        assert got[i] == pytest.approx(before, rel=1e-12)


def test_update_ratio_includes_the_multiplier():
    opt, _, closure = _setup(["grad_norm", "update_ratio"], z=0.7)
    opt.step(closure)
    m = opt.multipliers()
    assert m[0] == m[1] and m[0] > 1.3  # a constant multiplier well away from 1
    opt.step(closure)
    ps, gs = _trajectory(1, mult=m[0])
    for i in range(2):
        want = LRS[i] * m[0] * _norm(_by_group(gs[0], i)) / _norm(_by_group(ps[0], i))
        assert opt.feature_table()["update_ratio"][i] == pytest.approx(math.log(want), rel=1e-12)


def test_stats_every_refreshes_only_at_its_steps():
    """stats_every=2: steps 0 and 2 measure; step 1 and step 2 show step 0's update, step 3 step 2's."""
    params = [torch.nn.Parameter(t.clone()) for t in INIT]
    groups = [{"params": [params[0]], "lr": LRS[0]}, {"params": params[1:], "lr": LRS[1]}]
    opt = NestedOptimizer(groups, torch.optim.SGD, signal="frozen", features=["param_norm", "update_ratio"],
                          stats_every=2, lr=LRS[0])

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = _loss(params)
        loss.backward()
        return loss

    ps, gs = _trajectory(4)

    def expected(k, i):  # measured around the base step of step k
        before = _by_group(ps[k], i)
        return (math.log(_rms(before)),
                math.log(_norm([a - b for a, b in zip(_by_group(ps[k + 1], i), before)]) / _norm(before)))

    seen = []
    for t in range(4):
        opt.step(closure)
        table = opt.feature_table()
        seen.append([(table["param_norm"][i], table["update_ratio"][i]) for i in range(2)])
    assert seen[0] == [(TINY_LOG, TINY_LOG)] * 2
    for t, k in ((1, 0), (2, 0), (3, 2)):
        for i in range(2):
            assert seen[t][i] == pytest.approx(expected(k, i), rel=1e-12), (t, i)


def test_curvature_is_gradient_change_over_parameter_change():
    opt, _, closure = _setup(["curvature"])
    ps, gs = _trajectory(3)
    opt.step(closure)
    assert opt.feature_table()["curvature"] == [TINY_LOG, TINY_LOG]  # one point: no secant yet
    for t in (1, 2):
        opt.step(closure)
        for i in range(2):
            dg = [a - b for a, b in zip(_by_group(gs[t], i), _by_group(gs[t - 1], i))]
            dp = [a - b for a, b in zip(_by_group(ps[t], i), _by_group(ps[t - 1], i))]
            want = _norm(dg) / _norm(dp)
            assert opt.feature_table()["curvature"][i] == pytest.approx(math.log(want), rel=1e-12)
    # by hand for group 0, step 1: dp = -0.1 g0, dg = C dp, so the secant is ||C g0|| / ||g0||
    g0 = torch.tensor([1.0, -4.0, 1.5, 12.0], dtype=F64)
    c = CURV[0]
    opt2, _, closure2 = _setup(["curvature"])
    opt2.step(closure2)
    opt2.step(closure2)
    want = float((c * g0).norm() / g0.norm())
    assert want > 3.0  # far from 1, so the inverse ratio would be far off
    assert opt2.feature_table()["curvature"][0] == pytest.approx(math.log(want), rel=1e-12)


def test_loss_features_by_hand():
    opt, params, closure = _setup(["loss"])
    ps, _ = _trajectory(4)
    losses = [float(_loss(p)) for p in ps[:4]]
    ema, dema = None, 0.0
    for t in range(4):
        opt.step(closure)
        dl = 0.0 if t == 0 else (losses[t] - losses[t - 1]) / abs(ema)
        dema = 0.9 * dema + 0.1 * dl
        ema = losses[t] if ema is None else 0.95 * ema + 0.05 * losses[t]
        assert opt.feature_table()["loss"] == [pytest.approx(dl, rel=1e-12, abs=1e-15)] * 2
    assert dl < -0.1  # the loss falls: a negative relative change
    # step 1 by hand: (L1 - L0) / L0 (the average is still L0)
    opt2, _, closure2 = _setup(["loss"])
    opt2.step(closure2)
    opt2.step(closure2)
    assert opt2.feature_table()["loss"][0] == pytest.approx((losses[1] - losses[0]) / losses[0], rel=1e-12)


class _Standardise:
    """The documented standardisation (per column, shared by the groups): a bias-corrected EMA
    (0.99) of the mean and of the mean square over the rows, ``(x - mean) / sqrt(var + 1e-8)``,
    clipped to [-5, 5]."""

    def __init__(self, n):
        self.mean, self.sq, self.count = np.zeros(n), np.zeros(n), 0

    def __call__(self, x):
        self.count += 1
        self.mean = 0.99 * self.mean + 0.01 * x.mean(0)
        self.sq = 0.99 * self.sq + 0.01 * (x * x).mean(0)
        c = 1 - 0.99 ** self.count
        mean = self.mean / c
        var = np.maximum(self.sq / c - mean * mean, 0.0)
        return np.clip((x - mean) / np.sqrt(var + 1e-8), -5.0, 5.0)


def test_validation_features_by_hand():
    """delta = (v - v_prev) / |v_prev|, gap = (v - train loss EMA) / |v|, dev = (v - v_ema) / |v_ema|.
    Only delta is in feature_table (the first column); gap and dev are checked through the
    standardised matrix against the same standardisation of the hand-computed columns."""
    opt, _, closure = _setup(["val"])
    ps, _ = _trajectory(5)
    losses = [float(_loss(p)) for p in ps[:5]]
    std = _Standardise(3)
    train_ema = None
    val_prev, val_ema = None, None
    vals = {1: 60.0, 2: 48.0, 3: 54.0}  # observed after steps 1, 2, 3 (above the training loss, ~38 to 6)
    raw = [0.0, 0.0, 0.0]
    for t in range(5):
        opt.step(closure)
        train_ema = losses[t] if train_ema is None else 0.95 * train_ema + 0.05 * losses[t]
        x = np.array([raw, raw])
        want = std(x)
        np.testing.assert_allclose(opt.last_features, want, rtol=1e-9, atol=1e-9)
        assert opt.feature_table()["val"] == [pytest.approx(raw[0], abs=1e-15)] * 2
        if t in vals:
            v = vals[t]
            opt.observe_validation(v)
            delta = 0.0 if val_prev is None else (v - val_prev) / abs(val_prev)
            gap = (v - train_ema) / abs(v)
            val_ema = v if val_ema is None else 0.8 * val_ema + 0.2 * v
            dev = (v - val_ema) / abs(val_ema)
            raw = [delta, gap, dev]
            val_prev = v
    # the last observation by hand: v = 54 after 48 (ema 0.8 * 60 + 0.2 * 48 = 57.6 before it)
    assert raw[0] == pytest.approx(6.0 / 48.0)
    assert raw[1] > 0.3  # validation above the training loss: a positive gap
    assert raw[2] == pytest.approx((54.0 - 56.88) / 56.88)


def test_gap_sign_shows_in_the_standardised_feature():
    """The first observation's gap enters a column that was 0 until then, so its standardised value
    has the gap's sign: positive when validation is above training, negative below."""
    for v, sign in ((100.0, 1.0), (1.0, -1.0)):  # the training loss is about 20 here
        opt, _, closure = _setup(["val"])
        for _ in range(3):
            opt.step(closure)
        opt.observe_validation(v)
        opt.step(closure)
        gap_col = opt.last_features[:, 1]
        assert np.all(np.sign(gap_col) == sign) and np.all(np.abs(gap_col) > 1.0), (v, gap_col)


def test_full_feature_matrix_matches_the_standardised_hand_values():
    """Every feature at once, every step, through the documented standardisation (depth and mult
    raw), with a constant multiplier != 1 and a validation loss observed after steps 1 and 2."""
    feats = ["grad_norm", "param_norm", "depth", "update_ratio", "loss", "val", "curvature", "mult"]
    opt, _, closure = _setup(feats, z=-0.4)
    opt.step(closure)
    m = opt.multipliers()[0]
    assert m < 0.8
    opt, _, closure = _setup(feats, z=-0.4)
    n = 5
    ps, gs = _trajectory(n, mult=m)
    losses = [float(_loss(p)) for p in ps[:n]]
    std = _Standardise(11)
    ema, dema, train_ema = None, 0.0, None
    val = [0.0, 0.0, 0.0]
    val_prev = val_ema = None
    for t in range(n):
        opt.step(closure)
        dl = 0.0 if t == 0 else (losses[t] - losses[t - 1]) / abs(ema)
        dema = 0.9 * dema + 0.1 * dl
        ema = losses[t] if ema is None else 0.95 * ema + 0.05 * losses[t]
        rows = []
        for i in range(2):
            gn = math.log(_rms(_by_group(gs[t], i)))
            if t == 0:
                pn = ur = cv = TINY_LOG
            else:
                before, after = _by_group(ps[t - 1], i), _by_group(ps[t], i)
                pn = math.log(_rms(before))
                ur = math.log(_norm([a - b for a, b in zip(after, before)]) / _norm(before))
                dg = [a - b for a, b in zip(_by_group(gs[t], i), _by_group(gs[t - 1], i))]
                cv = math.log(_norm(dg) / _norm([a - b for a, b in zip(after, before)]))
            mult = 0.0 if t == 0 else math.log(m) / math.log(10.0)  # the multiplier stepped with last
            rows.append([gn, pn, float(i), ur, dl, dema, *val, cv, mult])
        x = np.array(rows)
        want = std(x)
        want[:, 2], want[:, 10] = x[:, 2], x[:, 10]  # depth and mult are not standardised
        np.testing.assert_allclose(opt.last_features, want, rtol=1e-7, atol=1e-7, err_msg=f"step {t}")
        table = opt.feature_table()
        assert table["loss"][0] == pytest.approx(dl, abs=1e-15)
        assert table["mult"] == pytest.approx([mult, mult], abs=1e-12)
        if t in (1, 2):
            train_ema = ema
            v = 5.0 - t
            opt.observe_validation(v)
            delta = 0.0 if val_prev is None else (v - val_prev) / abs(val_prev)
            val_ema = v if val_ema is None else 0.8 * val_ema + 0.2 * v
            val = [delta, (v - train_ema) / abs(v), (v - val_ema) / abs(val_ema)]
            val_prev = v


def test_strided_sample_is_weighted_by_its_stride():
    """A 3000-element tensor is sampled every 2nd element and weighted by 2: exact for a constant
    tensor and gradient, so the RMS and the ratio come out as for the whole tensor."""
    w = torch.nn.Parameter(torch.full((3000,), 2.0, dtype=F64))
    opt = NestedOptimizer([w], torch.optim.SGD, signal="frozen", features=["param_norm", "update_ratio"],
                          stats_every=1, lr=0.1)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (w * w).sum()  # g = w: the update is 0.1 w, the ratio 0.1
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    table = opt.feature_table()
    assert table["param_norm"][0] == pytest.approx(math.log(2.0), rel=1e-12)
    assert table["update_ratio"][0] == pytest.approx(math.log(0.1), rel=1e-12)
