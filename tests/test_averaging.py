"""BEMA and EMA: the formulas step by step, the lag BEMA removes, state_dict, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from nestopt.optim import BEMA, EMA


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _set(model, value):
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(value(k, p.shape))


def _theta(t):  # an asymmetric path of weights: a drift, a curve, a sign change
    return lambda k, shape: torch.full(shape, 0.3 * t - 0.02 * t * t + (k + 1) * (-1) ** t * 0.1, dtype=torch.float32)


def test_bema_follows_its_formula_step_by_step():
    model = _model()
    kappa, eta, rho, gamma = 0.5, 0.2, 10.0, 1.0
    bema = BEMA(model)
    theta0 = ema = None
    for t in range(12):
        _set(model, _theta(t))
        bema.update_parameters(model)
        w = [p.detach().clone() for p in model.parameters()]
        if t == 0:
            theta0, ema, want = w, [x.clone() for x in w], w
        else:
            beta = (rho + gamma * t) ** -kappa
            alpha = (rho + gamma * t) ** -eta
            ema = [(1 - beta) * e + beta * x for e, x in zip(ema, w)]
            want = [alpha * (x - x0) + e for x, x0, e in zip(w, theta0, ema)]
        for got, exp in zip(bema.module.parameters(), want):
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
    assert int(bema.n_averaged) == 12
    assert bema.alpha(1) == pytest.approx(11 ** -0.2) and bema.beta(1) == pytest.approx(11 ** -0.5)


def test_ema_follows_its_formula():
    model = _model()
    ema = EMA(model, decay=0.9)
    want = None
    for t in range(8):
        _set(model, _theta(t))
        ema.update_parameters(model)
        w = [p.detach().clone() for p in model.parameters()]
        want = w if want is None else [0.9 * e + 0.1 * x for e, x in zip(want, w)]
        for got, exp in zip(ema.module.parameters(), want):
            torch.testing.assert_close(got, exp)


def test_a_large_bias_power_turns_the_correction_off():
    model = _model()
    off = BEMA(model, bias_power=200.0)
    for t in range(6):
        _set(model, _theta(t))
        off.update_parameters(model)
    ema = [off._ema(i) for i in range(2)]
    for got, e in zip(off.module.parameters(), ema):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)


def test_bema_lags_less_than_the_ema_it_corrects_early_in_an_approach():
    """Iterates approaching 1 from 0: the EMA lags toward the start, BEMA's correction removes part
    of that lag (and, as the formula says, keeps a term alpha_t (theta_t - theta_0) that fades only
    as t ** -eta)."""
    model = torch.nn.Linear(1, 1, bias=False)
    bema, plain = BEMA(model), BEMA(model, bias_power=200.0)  # the same EMA weights, no correction
    for t in range(31):
        _set(model, lambda k, shape: torch.full(shape, 1 - 0.97 ** t))
        bema.update_parameters(model)
        plain.update_parameters(model)
    err_b, err_e = abs(float(bema.module.weight) - 1), abs(float(plain.module.weight) - 1)
    assert err_b < 0.8 * err_e, (err_b, err_e)
    alpha = bema.alpha(30)
    want = float(plain.module.weight) + alpha * (1 - 0.97 ** 30)
    assert float(bema.module.weight) == pytest.approx(want, rel=1e-5)


def test_a_state_dict_round_trip_keeps_two_averages_in_lockstep():
    model = _model()
    a, b = BEMA(model, update_after=2), BEMA(model, update_after=2)
    for t in range(5):
        _set(model, _theta(t))
        a.update_parameters(model)
        b.update_parameters(model)
    c = BEMA(_model(), update_after=2)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    for t in range(5, 10):
        _set(model, _theta(t))
        a.update_parameters(model)
        c.update_parameters(model)
    for x, y in zip(a.state_dict().values(), c.state_dict().values()):
        torch.testing.assert_close(x, y)
    assert int(c.n_updates) == 10 and int(c.n_averaged) == 8


def test_update_after_and_update_every():
    model = _model()
    avg = BEMA(model, update_after=3, update_every=2)
    for t in range(8):
        _set(model, _theta(t))
        avg.update_parameters(model)
    assert int(avg.n_averaged) == 3  # steps 3, 5, 7
    torch.testing.assert_close(avg._theta0(0), torch.full((2, 3), 0.3 * 3 - 0.02 * 9 - 0.1))


def test_a_non_finite_model_changes_nothing():
    model = _model()
    avg = BEMA(model)
    avg.update_parameters(model)
    before = copy.deepcopy(avg.state_dict())
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    avg.update_parameters(model)
    assert int(avg.skipped) == 1
    after = avg.state_dict()
    for k, v in before.items():
        if k != "skipped":
            torch.testing.assert_close(after[k], v)


def test_the_average_copies_buffers_and_runs_the_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    avg = EMA(model)
    model(torch.randn(8, 2) * 3 + 1)
    avg.update_parameters(model)
    torch.testing.assert_close(avg.module[1].running_mean, model[1].running_mean)
    assert avg(torch.randn(4, 2)).shape == (4, 2)


@pytest.mark.parametrize("kwargs,match", [({"ema_power": -1.0}, r"ema_power=-1.0 is invalid"),
                                          ({"lag": 0.5}, r"lag=0.5 is invalid"),
                                          ({"update_every": 0}, r"update_every=0 is invalid")])
def test_bad_parameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BEMA(_model(), **kwargs)


def test_bad_decay_and_model():
    with pytest.raises(ValueError, match=r"decay=1.0 is invalid"):
        EMA(_model(), decay=1.0)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        BEMA("model")
    with pytest.raises(ValueError, match="parameters"):
        BEMA(_model()).update_parameters(torch.nn.Linear(1, 1, bias=False))
