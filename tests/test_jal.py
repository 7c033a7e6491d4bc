"""JAL, the joint asymmetric loss: hand-computed values, and the properties the paper proves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nestopt.losses import JALLoss, amse_loss, amse_min_a, jal_loss, nce_loss


def _p(logits):
    e = [math.exp(z) for z in logits]
    return [v / sum(e) for v in e]


def test_values_match_a_hand_computation_on_an_asymmetric_batch():
    rows, labels, a = [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], [0, 2], 4.0
    nce, amse = [], []
    for z, y in zip(rows, labels):
        p = _p(z)
        nce.append(-math.log(p[y]) / sum(-math.log(q) for q in p))
        amse.append(sum(((a if k == y else 0.0) - q) ** 2 for k, q in enumerate(p)) / 3)
    logits, target = torch.tensor(rows, dtype=torch.float64), torch.tensor(labels)
    assert float(nce_loss(logits, target)) == pytest.approx(sum(nce) / 2, rel=1e-6)
    assert float(amse_loss(logits, target, a=a)) == pytest.approx(sum(amse) / 2, rel=1e-6)
    got = jal_loss(logits, target, alpha=0.7, beta=1.3, a=a)
    assert float(got) == pytest.approx(0.7 * sum(nce) / 2 + 1.3 * sum(amse) / 2, rel=1e-6)
    assert float(JALLoss(alpha=0.7, beta=1.3, a=a)(logits, target)) == pytest.approx(float(got))
    per = jal_loss(logits, target, a=a, reduction="none")
    assert per.shape == (2,) and float(per[1]) == pytest.approx(nce[1] + amse[1], rel=1e-6)


def test_binary_logits_read_as_two_classes():
    z = torch.tensor([1.5, -0.3, 0.0, 2.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    two = torch.stack([torch.zeros_like(z), z], 1)
    assert float(jal_loss(z, y, a=5.0)) == pytest.approx(float(jal_loss(two, y.long(), a=5.0)), rel=1e-7)


def test_nce_is_symmetric_its_losses_over_the_classes_sum_to_one():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.1]]).repeat(4, 1)
    total = nce_loss(logits, torch.arange(4), reduction="sum")
    assert float(total) == pytest.approx(1.0, rel=1e-6)


def _risk(p, w, a):
    K = len(w)
    return sum(wi * sum(((a if k == i else 0.0) - p[k]) ** 2 for k in range(K)) / K for i, wi in enumerate(w))


@pytest.mark.parametrize("w", [(0.5, 0.3, 0.2), (0.45, 0.35, 0.2), (0.6, 0.1, 0.3)])
def test_amse_is_asymmetric_exactly_when_a_clears_the_bound(w):
    """The paper's condition: the weighted risk's minimiser over the simplex is the one-hot of the
    largest weight iff a >= sum(w) / (w_max - w_second)."""
    order = sorted(w, reverse=True)
    bound = sum(w) / (order[0] - order[1])
    m = w.index(order[0])
    onehot = [1.0 if k == m else 0.0 for k in range(3)]
    grid = [(i / 50, j / 50, 1 - i / 50 - j / 50) for i, j in itertools.product(range(51), range(51)) if i + j <= 50]
    for a, asymmetric in ((bound * 1.02, True), (bound * 0.9, False)):
        best = min(grid, key=lambda p: _risk(p, w, a))
        beats = _risk(best, w, a) < _risk(onehot, w, a) - 1e-12
        assert beats is not asymmetric, (a, bound, best)


def test_the_bound_under_symmetric_noise():
    assert amse_min_a(0.4, 2) == pytest.approx(5.0)
    assert amse_min_a(0.2, 2) == pytest.approx(1 / 0.6)
    assert amse_min_a(0.0, 10) == 1.0
    assert amse_min_a(0.5, 10) == pytest.approx(1 / (0.5 - 0.5 / 9))
    # the bound is the one the simplex test checks: weights of a clean class under symmetric noise
    eta, K = 0.3, 4
    w = [1 - eta] + [eta / (K - 1)] * (K - 1)
    assert amse_min_a(eta, K) == pytest.approx(sum(w) / (w[0] - w[1]))
    with pytest.raises(ValueError, match=r"noise_rate=0.5 is invalid"):
        amse_min_a(0.5, 2)


def test_the_gradient_stays_finite_at_extreme_logits():
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0]], requires_grad=True)
    jal_loss(logits, torch.tensor([1, 1])).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kwargs,match", [({"a": 0.5}, r"a=0.5 is invalid"), ({"alpha": -1.0}, r"alpha=-1.0 is invalid"),
                                          ({"alpha": 0.0, "beta": 0.0}, r"alpha=0 and beta=0"),
                                          ({"reduction": "avg"}, r"reduction='avg' is invalid")])
def test_bad_parameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jal_loss(torch.zeros(2, 2), torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match=match):
        JALLoss(**kwargs)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        jal_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"target of shape \(3,\) is invalid"):
        jal_loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        jal_loss(torch.zeros(2), torch.tensor([0.5, 1.0]))
