from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nestopt.tasks as T
from nestopt.tasks.analytic import AnalyticTask

ANALYTIC = [n for n in T.names() if isinstance(T.get(n), AnalyticTask)]


def test_registry_lists_the_required_tasks():
    required = {"quad-scalar", "quad-sym", "quad-asym", "quad-cond1e2", "quad-cond1e4", "rosenbrock",
                "digits-logreg", "digits-mlp", "digits-cnn", "diabetes-mlp", "charlm-transformer",
                "trading-multihorizon"}
    assert required <= set(T.names())


def test_unknown_task_error_lists_valid_names():
    with pytest.raises(KeyError) as e:
        T.get("no-such-task")
    assert "no-such-task" in str(e.value) and "digits-mlp" in str(e.value)


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_gradient_matches_closed_form(name):
    task = T.get(name)
    task.dtype = torch.float64
    for seed in range(3):
        model = task.init(seed)
        loss = task.loss(model, None)
        (g,) = torch.autograd.grad(loss, model.x)
        torch.testing.assert_close(g, task.grad(model.x.detach()), rtol=1e-12, atol=1e-12)


def test_quadratics_have_the_seed_formulas():
    q = T.AxisQuadratic(c=100.0, dtype=torch.float64)
    x = torch.tensor([10.0, 10.0], dtype=torch.float64)
    assert float(q.f(x)) == pytest.approx(81 + 100 * 64)
    torch.testing.assert_close(q.grad(x), torch.tensor([18.0, 1600.0], dtype=torch.float64))
    assert q.start == (10.0, 10.0)
    s = T.get("quad-scalar")
    assert float(s.f(torch.tensor([10.0]))) == 49.0
    r = T.get("rosenbrock")
    assert float(r.f(torch.tensor([1.0, 1.0]))) == 0.0
    assert float(r.f(torch.tensor([-1.2, 1.0], dtype=torch.float64))) == pytest.approx(24.2)


@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_rotated_quadratic_condition_number(cond):
    task = T.RotatedQuadratic(cond=cond)
    eig = torch.linalg.eigvalsh(task.H64)
    assert float(eig.max() / eig.min()) == pytest.approx(cond, rel=1e-9)
    # Rotated: the Hessian is not diagonal, so coordinates are coupled.
    off = task.H64 - torch.diag(torch.diag(task.H64))
    assert float(off.abs().max()) > 1e-3
    assert float(task.f(task.x_star64)) == 0.0


@pytest.mark.parametrize("name", T.names())
def test_seeded_determinism(name):
    task = T.get(name)
    a, b, c = task.init(5), task.init(5), task.init(6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    s1, s2 = task.sampler(5), task.sampler(5)
    for step in range(3):
        l1 = task.loss(a, s1(step))
        l2 = task.loss(b, s2(step))
        assert torch.equal(l1, l2)
        assert math.isfinite(float(l1.detach()))
    metrics = task.evaluate(a)
    assert math.isfinite(metrics["val_loss"])
    assert ("val_accuracy" in metrics) == task.has_accuracy
    assert task.default_steps > 0 and task.batch_size > 0


def test_trading_task_exposes_heads_losses_and_aucs():
    task = T.get("trading-multihorizon")
    model = task.init(0)
    assert len(model.heads) == 7 == len(T.HORIZON_NAMES)
    assert T.HORIZON_NAMES[0] == "10m" and T.HORIZON_NAMES[-1] == "14d"
    batch = task.sampler(0)(0)
    per_head = task.head_losses(model, batch)
    assert per_head.shape == (7,)
    torch.testing.assert_close(per_head.mean(), task.loss(model, batch))
    metrics = task.evaluate(model)
    for h in T.HORIZON_NAMES:
        assert 0.0 <= metrics[f"val_auc_{h}"] <= 1.0
        assert metrics[f"val_loss_{h}"] > 0


def test_trading_split_holds_out_whole_assets():
    cfg = T.MarketConfig()
    d = T.trading.market_data(cfg)
    per_asset = len(d["x_train"]) // cfg.n_train_assets  # 16 training assets, 8 validation assets
    thin = cfg.val_stride // cfg.stride
    assert len(d["x_val"]) == (cfg.n_assets - cfg.n_train_assets) * -(-per_asset // thin)
    # Standardised with training statistics only.
    assert torch.allclose(d["x_train"].mean(0), torch.zeros(d["x_train"].shape[1]), atol=1e-4)


def test_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(500, generator=g) > 0.4).float()
    s = torch.round(torch.randn(500, generator=g) + y, decimals=1)  # ties included
    assert T.auc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)


@pytest.mark.parametrize("name", T.family_names())
def test_families_sample_deterministic_working_tasks(name):
    fam = T.family(name)
    a, b, c = fam.sample(11), fam.sample(11), fam.sample(12)
    assert a.name == b.name
    ma, mb = a.init(0), b.init(0)
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.loss(ma, a.sampler(0)(0)), b.loss(mb, b.sampler(0)(0)))
    names = {fam.sample(s).name for s in range(6)}
    assert len(names) > 1, "a family must produce different variants"
    assert c is not None


def test_bilinear_game_gradients_and_equilibrium():
    game = T.get_game("bilinear", dim=3)
    x, y = game.init(0)
    fx, fy = game.losses([x, y])
    gx = torch.autograd.grad(fx, x.v, retain_graph=True)[0]
    gy = torch.autograd.grad(fy, y.v)[0]
    ex, ey = game.gradients(x.v.detach(), y.v.detach())
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)
    sv = torch.linalg.svdvals(game.A)
    assert float(sv.min()) == pytest.approx(1.0) and float(sv.max()) == pytest.approx(2.0)
    assert game.distance([x, y]) > 0
    # Simultaneous gradient descent-ascent spirals away from the equilibrium of a bilinear game.
    d0 = game.distance([x, y])
    with torch.no_grad():
        for _ in range(50):
            ex, ey = game.gradients(x.v, y.v)
            x.v -= 0.1 * ex
            y.v -= 0.1 * ey
    assert game.distance([x, y]) > d0


def test_charlm_corpus_is_offline_and_nontrivial():
    from nestopt.tasks.charlm import corpus

    text = corpus()
    assert len(text) > 20_000
    assert len(set(text)) > 40
    assert np.isfinite(T.get("charlm-transformer").evaluate(T.get("charlm-transformer").init(0))["val_loss"])
