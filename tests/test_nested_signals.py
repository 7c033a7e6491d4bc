"""NestedOptimizer's training signals move the multiplier the right way.

The REINFORCE signals (``"proxy"``, ``"validation"``) are checked on a one-dimensional quadratic
``0.5 w^2`` under SGD, where the reward of a multiplier ``m`` is a fixed function of ``m``: one
step scales the loss by ``(1 - lr m)^2``, so the relative decrease is ``1 - (1 - lr m)^2``. With
``lr = 0.01`` every larger multiplier is better (the rate is far too small); with ``lr = 1.95`` (stable,
but each step overshoots the minimum) the best multiplier is ``1 / 1.95``, so the multiplier
should fall. The only feature is ``depth`` (a constant 0 for one group), so the controller is a
bandit over the multiplier and nothing but the reward can move it. The start is placed at 1e50:
the rewards are scale-free, and the loss then has float64 room to fall by 300 orders of
magnitude without underflowing.

Each case runs three seeds; every seed must move in the right direction and the geometric mean
of the multipliers over the second half of the run must clear the threshold by a margin. The
numbers seen when this was written are in the comments (10 seeds each).

The hindsight signal is checked with unshifted labels (``label_shift=1``), and its replay scores
and labels by hand with ``follow=1`` (the labels then move a scale directly).
"""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import nested_quadratic_run

from nestopt.optim import NestedOptimizer

F64 = torch.float64
SEEDS = (0, 1, 2)


def _bandit_run(signal: str, lr: float, steps: int, seed: int, val_every: int = 2, **kw) -> float:
    """Geometric mean of the multiplier over the second half of the run."""
    w = torch.nn.Parameter(torch.full((1,), 1e50, dtype=F64))
    opt = NestedOptimizer([w], torch.optim.SGD, lr=lr, signal=signal, features=["depth"], hidden=8, seed=seed,
                          **kw)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    logs = []
    for t in range(steps):
        loss = opt.step(closure)
        logs.append(math.log(opt.multipliers()[0]))
        if signal == "validation" and (t + 1) % val_every == 0:
            # a deterministic problem: the training loss is the validation loss
            opt.observe_validation(loss.detach())
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0.0  # no overflow, no underflow
    assert opt.counters["controller_updates"] > 0
    half = logs[len(logs) // 2:]
    return math.exp(sum(half) / len(half))


def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def test_proxy_raises_a_rate_that_is_too_small():
    ms = [_bandit_run("proxy", 0.01, 150, s) for s in SEEDS]  # 10 seeds: 2.1 to 5.8
    assert all(m > 1.3 for m in ms), ms
    assert _geo(ms) > 2.5, ms


def test_proxy_lowers_a_rate_that_is_too_large():
    ms = [_bandit_run("proxy", 1.95, 150, s) for s in SEEDS]  # 10 seeds: 0.44 to 0.58
    assert all(m < 0.8 for m in ms), ms
    assert _geo(ms) < 0.65, ms


def test_validation_signal_raises_a_rate_that_is_too_small():
    ms = [_bandit_run("validation", 0.01, 200, s, controller_lr=1e-2) for s in SEEDS]  # 10 seeds: 2.5 to 8.0
    assert all(m > 1.5 for m in ms), ms
    assert _geo(ms) > 2.0, ms


def test_validation_signal_lowers_a_rate_that_is_too_large():
    ms = [_bandit_run("validation", 1.95, 200, s, controller_lr=1e-2) for s in SEEDS]  # 10 seeds: 0.20 to 0.78
    assert all(m < 0.9 for m in ms), ms
    assert _geo(ms) < 0.75, ms


def test_validation_signal_trains_once_per_observation_and_holds_its_noise():
    """One controller update per observation (after the first, which has nothing to compare), and
    the exploration draw is held between observations: the multiplier is constant while the
    controller is not updated."""
    w = torch.nn.Parameter(torch.full((1,), 1e50, dtype=F64))
    opt = NestedOptimizer([w], torch.optim.SGD, lr=0.01, signal="validation", features=["depth"], hidden=8)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    for k in range(6):
        seen = []
        for _ in range(3):
            opt.step(closure)
            seen.append(opt.multipliers()[0])
        assert seen[0] == seen[1] == seen[2] != 1.0
        opt.observe_validation(float(0.5 * w.detach() ** 2))
        assert opt.counters["controller_updates"] == k  # the first observation has no previous one


_quadratic_run = nested_quadratic_run


def test_hindsight_with_unshifted_labels_raises_a_small_rate_and_lowers_a_large_one():
    small = _quadratic_run(lr=0.01, label_shift=1.0)
    assert small.multipliers()[0] > 3.0, small.multipliers()  # 9.4 when written
    assert small.last_hindsight["best"] == max(small.last_hindsight["scores"])  # the largest replay still wins
    large = _quadratic_run(lr=0.8, label_shift=1.0)  # unstable for curvature 4 (needs lr * m < 0.5)
    assert large.multipliers()[0] < 0.8, large.multipliers()  # 0.42 when written (0.5 / 0.8 = 0.625 is the edge)


def _line_search_run(lr: float, label_shift: float, steps: int = 33):
    """follow=1 on 0.5 w^2 in float64: the scale is the product of the labels, the controller untouched."""
    w = torch.nn.Parameter(torch.full((1,), 3.0, dtype=F64))
    opt = NestedOptimizer([w], torch.optim.SGD, lr=lr, features=["depth"], window=4, period=8, follow=1.0,
                          label_shift=label_shift)
    trail = [w.detach().clone()]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    replays = []
    for t in range(steps):
        opt.step(closure)
        trail.append(w.detach().clone())
        if opt.counters["replays"] > len(replays):
            replays.append((t, dict(opt.last_hindsight["scores"]), opt.last_hindsight["best"], opt.multipliers()[0]))
    return replays, trail


def test_hindsight_scores_are_the_cached_gradient_replays_by_hand():
    """The first replay (step 8) re-applies the gradients of steps 4..7 from the snapshot at step 4,
    at m times the rates used: for SGD on 0.5 w^2 (gradient w) the end point is
    w_4 - m lr (w_4 + w_5 + w_6 + w_7), scored by the loss there; m = 1 is the step's own loss."""
    lr = 0.3
    replays, trail = _line_search_run(lr, 1.0, steps=9)
    t, scores, best, _ = replays[0]
    assert t == 8
    w = [float(x) for x in trail]  # w_k: the point step k's gradient is taken at (multipliers 1 so far)
    for m, score in scores.items():
        end = w[8] if m == 1.0 else w[4] - m * lr * sum(w[4:8])
        assert score == pytest.approx(0.5 * end * end, rel=1e-12), m
    # end = w_4 (1 - 0.3 m (1 + 0.7 + 0.49 + 0.343)) = w_4 (1 - 0.76 m): lowest at m = 1.32, so 1.5 of the grid
    assert best == 1.5


def test_label_shift_one_labels_the_best_replay_itself():
    """lr = 1.6 (each step overshoots: w -> -0.6 w). The cached-gradient replays of that oscillating
    window favour m = 1 here (scores by hand in the test above), so label_shift=1 keeps the scale at
    1, while the default shift of 2 doubles it, and then halves it back through a 0.1 label when the
    doubled rate diverges."""
    one, _ = _line_search_run(1.6, 1.0)
    two, _ = _line_search_run(1.6, 2.0)
    for _, scores, best, _ in one:
        assert best == min(scores, key=scores.get)  # the best replay itself
    assert [r[2] for r in one] == [1.0, 1.0, 1.0, 1.0]
    assert [r[3] for r in one] == [1.0, 1.0, 1.0, 1.0]
    assert two[0][2] == 2.0 and two[0][3] == pytest.approx(2.0)  # nearest 2 x the best (1.0)
    for _, scores, best, _ in two:
        b = min(scores, key=scores.get)
        assert best == min(scores, key=lambda m: (abs(math.log(m) - math.log(2 * b)), m))
