"""Hypergradient descent (Baydin et al. 2018): the rule against its formula and its behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from nestopt.optim.hypergradient import HypergradientAdam, HypergradientSGD

C = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


def _grad(w: torch.Tensor) -> torch.Tensor:
    return C * w  # gradient of 0.5 * sum(c w^2)


def test_sgd_rule_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    opt = HypergradientSGD([w], lr=0.1, beta=0.05)
    ref = w.detach().clone()
    s, prev = 1.0, None
    for _ in range(5):
        w.grad = _grad(w.detach())
        g = _grad(ref)
        if prev is not None:
            s *= 1 + 0.05 * float(g @ prev) / (float(g.norm()) * float(prev.norm()))
        ref = ref - 0.1 * s * g
        prev = g
        opt.step()
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["hd_scale"] == pytest.approx(s, rel=1e-12)


def test_additive_rule_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    opt = HypergradientSGD([w], lr=0.1, rule="additive", beta=0.01)
    g1 = _grad(w.detach().clone())
    w.grad = g1.clone()
    opt.step()
    g2 = _grad(w.detach().clone())
    w.grad = g2.clone()
    opt.step()
    # alpha_t = alpha_{t-1} + beta g_t . g_{t-1}: as a scale on lr, s = 1 + (beta / lr) g2.g1
    assert opt.param_groups[0]["hd_scale"] == pytest.approx(1 + 0.01 / 0.1 * float(g2 @ g1), rel=1e-12)


@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
def test_rate_grows_when_too_small_and_shrinks_when_too_large(cls):
    def run(lr: float) -> float:
        w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = cls([w], lr=lr, beta=0.05)
        for _ in range(60):
            w.grad = _grad(w.detach())
            opt.step()
        return opt.param_groups[0]["hd_scale"]

    small, large = (1e-3, 0.6) if cls is HypergradientSGD else (1e-4, 1.5)
    assert run(small) > 1.5
    assert run(large) < 1.0


def test_adam_first_step_is_adamw():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    v = torch.nn.Parameter(w.detach().clone())
    hd = HypergradientAdam([w], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([v], lr=0.01, weight_decay=0.1)
    for p in (w, v):
        p.grad = torch.tensor([0.5, -0.1, 2.0])
    hd.step()
    ref.step()
    torch.testing.assert_close(w, v)


def test_scale_is_clipped_and_arguments_checked():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = HypergradientSGD([w], lr=1e-4, beta=0.9, scale_max=2.0)
    for _ in range(50):
        w.grad = _grad(w.detach())
        opt.step()
    assert opt.param_groups[0]["hd_scale"] == 2.0
    with pytest.raises(ValueError, match="rule"):
        HypergradientSGD([w], rule="newton")
    with pytest.raises(ValueError, match="beta"):
        HypergradientAdam([w], beta=-1.0)
    with pytest.raises(ValueError, match="scale_max"):
        HypergradientSGD([w], scale_min=1.0, scale_max=0.5)
    assert math.isfinite(float(w.detach().sum()))
