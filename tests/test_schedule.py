from __future__ import annotations

import math

import pytest
import torch

from nestopt.schedule import (LargeLRConfig, LargeLRScheduler, constant, cosine, exponential, join, linear,
                              step_decay)


def _opt(lr=0.3, groups=1):
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(ps)], lr=lr)


def test_matches_torch_sequential_linear_then_cosine_at_every_step():
    W, T, base, start, low = 20, 200, 0.3, 0.01, 1e-5
    opt = _opt(base)
    ref_sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=start / base, end_factor=1.0, total_iters=W),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T - W, eta_min=low)], milestones=[W])
    ref = []
    for _ in range(T + 1):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    ours_opt = _opt(base)
    ours = LargeLRScheduler(ours_opt, join([linear(start, base, W), cosine(base, low, T - W)], [W]))
    got = []
    for _ in range(T + 1):
        got.append(ours_opt.param_groups[0]["lr"])
        ours_opt.step()
        ours.step()
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-12


def test_hand_computed_values():
    s = join([linear(0.01, 0.3, 5), cosine(0.3, 1e-5, 95)], [5])
    assert s(0) == 0.01 and s(2.5) == pytest.approx(0.155) and s(5) == 0.3
    assert s(5 + 47.5) == pytest.approx(1e-5 + (0.3 - 1e-5) / 2)
    assert s(100) == pytest.approx(1e-5) and s(1000) == pytest.approx(1e-5)
    sd = step_decay(0.3, [30, 60, 90], 0.1)
    assert [sd(t) for t in (0, 29.9, 30, 60, 95)] == pytest.approx([0.3, 0.3, 0.03, 0.003, 0.0003])
    ex = exponential(1.0, 0.5, every=10)
    assert ex(20) == pytest.approx(0.25)
    assert constant(0.2)(123) == 0.2


def _run(sched_factory, steps, resume_at=None):
    opt = _opt(0.3, groups=2)
    sched = sched_factory(opt)
    lrs = []
    for t in range(steps):
        if t == resume_at:
            state_o, state_s = opt.state_dict(), sched.state_dict()
            opt = _opt(0.3, groups=2)
            opt.load_state_dict(state_o)
            sched = sched_factory(opt)
            sched.load_state_dict(state_s)
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_resume_at_every_step_reproduces_the_uninterrupted_rates():
    factory = lambda opt: LargeLRScheduler(opt, LargeLRConfig(warmup_epochs=20, total_epochs=200).schedule())  # noqa: E731
    full = _run(factory, 200)
    assert full[19][0] < full[20][0] == pytest.approx(0.3)  # the warmup/decay boundary
    assert full[0][1] == pytest.approx(2 * full[0][0])  # per-group ratio kept
    for k in range(1, 200):
        assert _run(factory, 200, resume_at=k) == full, k


def test_steps_per_epoch_gives_a_smooth_schedule_in_epochs():
    opt = _opt(0.3)
    sched = LargeLRScheduler(opt, LargeLRConfig(), steps_per_epoch=10)
    for _ in range(25):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 + (0.3 - 0.01) * 2.5 / 5)


def test_config_defaults_env_and_dict():
    cfg = LargeLRConfig()
    assert (cfg.base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.warmup_start_lr) == (0.3, 1e-5, 5, 0.01)
    assert (cfg.grad_clip, cfg.weight_decay, cfg.label_smoothing) == (1.0, 5e-4, 0.1)
    env = {"NESTOPT_LARGE_LR_BASE": "0.5", "NESTOPT_LARGE_LR_WARMUP": "10", "NESTOPT_LARGE_LR_DECAY": "step",
           "NESTOPT_LARGE_LR_DECAY_EPOCHS": "20,40", "NESTOPT_LARGE_LR_GRAD_CLIP": "none", "OTHER": "x"}
    cfg = LargeLRConfig.from_env(env)
    assert cfg.base_lr == 0.5 and cfg.warmup_epochs == 10 and cfg.decay == "step"
    assert cfg.decay_epochs == (20, 40) and cfg.grad_clip is None
    s = cfg.schedule()
    assert s(10) == 0.5 and s(31) == pytest.approx(0.05)
    assert LargeLRConfig.from_dict({"base_lr": 0.8, "lr_grid": [0.1, 0.2]}).lr_grid == (0.1, 0.2)


@pytest.mark.parametrize("values, field", [
    ({"base_lr": -0.1}, "base_lr"), ({"base_lr": 20}, "base_lr"), ({"min_lr": 0.5}, "min_lr"),
    ({"warmup_epochs": 2.5}, "warmup_epochs"), ({"decay": "linear"}, "decay"),
    ({"total_epochs": 3}, "total_epochs"), ({"decay_epochs": (60, 30)}, "decay_epochs"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"lr_grid": ()}, "lr_grid"), ({"colour": 1}, "colour"),
])
def test_invalid_config_names_the_field_value_and_range(values, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        LargeLRConfig.from_dict(values)


def test_invalid_env_value_names_the_variable():
    with pytest.raises(ValueError, match="NESTOPT_LARGE_LR_base_lr='abc'"):
        LargeLRConfig.from_env({"NESTOPT_LARGE_LR_BASE": "abc"})


@pytest.mark.parametrize("make, name", [
    (lambda: linear(0.1, 0.2, 0), "steps"), (lambda: cosine(0.1, 0.2, 10), "min_value"),
    (lambda: step_decay(0.1, [3, 2], 0.5), "milestones"), (lambda: exponential(1.0, 1.5), "factor"),
    (lambda: join([constant(1.0)], [3]), "boundaries"),
])
def test_schedules_validate_when_built(make, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        make()


def test_schedule_rejects_negative_time():
    with pytest.raises(ValueError, match="t >= 0"):
        linear(0.0, 1.0, 5)(-1)
    assert math.isclose(cosine(1.0, 0.0, 10)(5), 0.5)
