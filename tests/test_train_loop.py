"""nestopt.train.train_loop: stepping modes, the divergence rule, timing, exceptions, schedulers
and evaluation points."""

from __future__ import annotations

import math
import time

import pytest
import torch

from nestopt.train import DIVERGE_FACTOR, Divergence, LoopResult, train_loop


def _problem(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(32, 4, generator=g)
    y = torch.randn(32, 1, generator=g)
    return model, x, y


def _mse(model, x, y):
    return lambda idx: ((model(x[idx]) - y[idx]) ** 2).mean()


def _batches(step: int) -> torch.Tensor:
    return torch.arange(8) + 8 * (step % 4)


def test_closure_and_plain_step_give_identical_parameters_for_sgd():
    out = []
    for closure in (False, True):
        model, x, y = _problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        res = train_loop(opt, 25, _mse(model, x, y), batch=_batches, closure=closure, clip_norm=1.0)
        assert res.steps_done == 25 and not res.diverged and res.error is None
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_step_fn_replaces_the_stepping():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls = []

    def step_fn(c):
        calls.append(1)
        loss = c()
        opt.step()
        return loss

    res = train_loop(opt, 5, _mse(model, x, y), batch=_batches, step_fn=step_fn)
    assert len(calls) == 5 and res.steps_done == 5


class _Scripted(torch.optim.Optimizer):
    """Does nothing to its parameter; each step's loss comes from a script."""

    def __init__(self, losses):
        self.p = torch.zeros(1, requires_grad=True)
        super().__init__([self.p], {})
        self.losses = list(losses)

    def step(self, closure=None):
        return closure() if closure is not None else None

    def loss(self, step):
        return (self.p * 0).sum() + self.losses[step]


def _scripted_run(train_losses, val_losses=None, **kw):
    opt = _Scripted(train_losses)
    vals = iter(val_losses or [])
    evaluate = (lambda: {"val_loss": next(vals)}) if val_losses is not None else None
    return train_loop(opt, len(train_losses), opt.loss, evaluate=evaluate, **kw)


def test_divergence_fires_on_a_non_finite_training_loss():
    for bad in (math.nan, math.inf):
        res = _scripted_run([1.0, 2.0, bad, 1.0])
        assert res.diverged and res.diverged_step == 3 and res.steps_done == 3 and res.error is None
    res = _scripted_run([1.0, math.nan, 1.0], divergence=None)  # the rule switched off
    assert not res.diverged and res.steps_done == 3


def test_divergence_fires_above_factor_times_the_first_value_and_not_at_it():
    f = DIVERGE_FACTOR
    # val losses: 2.0 at the start, then one per step
    at = _scripted_run([1.0] * 3, [2.0, 1.0, f * 2.0, 1.0])
    assert not at.diverged and at.steps_done == 3 and at.first == 2.0
    above = _scripted_run([1.0] * 3, [2.0, 1.0, f * 2.0 * (1 + 1e-9), 1.0])
    assert above.diverged and above.diverged_step == 2 and above.steps_done == 2
    nonfinite = _scripted_run([1.0] * 3, [2.0, math.nan, 1.0, 1.0])
    assert nonfinite.diverged and nonfinite.diverged_step == 1
    # a tiny first value: the floor keeps the threshold away from zero
    tiny = _scripted_run([1.0] * 2, [0.0, f * 1e-12, 1.0])
    assert tiny.steps_done == 2 and tiny.diverged and tiny.diverged_step == 2
    looser = _scripted_run([1.0] * 3, [2.0, 1.0, f * 2.0 * 5, 1.0], divergence=Divergence(factor=10 * f))
    assert not looser.diverged
    with pytest.raises(ValueError, match="factor"):
        Divergence(factor=0.0)


def test_evaluation_is_not_training_time():
    def slow_eval():
        time.sleep(0.05)
        return {"val_loss": 1.0}

    opt = _Scripted([1.0] * 4)
    seen = []
    res = train_loop(opt, 4, opt.loss, evaluate=slow_eval, eval_every=1,
                     on_eval=lambda step, m, r: seen.append(r.train_time))
    assert res.eval_time >= 5 * 0.05 * 0.9  # start + 4 evaluations
    assert res.train_time < 0.05 and seen[-1] == res.train_time
    # work a callback wraps in res.timed() counts as training time
    opt = _Scripted([1.0] * 2)

    def observe(step, m, r: LoopResult):
        with r.timed():
            time.sleep(0.03)

    res = train_loop(opt, 2, opt.loss, evaluate=lambda: {"val_loss": 1.0}, on_eval=observe)
    assert res.train_time >= 3 * 0.03 * 0.9 and res.ms_per_step == pytest.approx(1e3 * res.train_time / 2)


def test_an_optimizer_exception_is_recorded_as_diverged_with_its_message():
    class Quits(torch.optim.SGD):
        def step(self, closure=None):
            if self.state.setdefault("n", 0) >= 3:
                raise ArithmeticError("gave up")
            self.state["n"] += 1
            return super().step(closure)

    model, x, y = _problem()
    opt = Quits(model.parameters(), lr=0.01)
    res = train_loop(opt, 10, _mse(model, x, y), batch=_batches)
    assert res.diverged and res.error == "ArithmeticError: gave up"
    assert res.steps_done == 3 and res.diverged_step == 4
    opt = Quits(model.parameters(), lr=0.01)
    with pytest.raises(ArithmeticError):  # only the listed exceptions are caught
        train_loop(opt, 10, _mse(model, x, y), batch=_batches, catch=(RuntimeError,))


def test_the_scheduler_is_stepped_once_per_optimizer_step():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    res = train_loop(opt, 6, _mse(model, x, y), batch=_batches, scheduler=sched,
                     on_step=lambda step, loss, r: lrs.append(opt.param_groups[0]["lr"]))
    assert res.steps_done == 6 and sched.last_epoch == 6
    assert lrs == [0.1 * 0.5 ** k for k in range(1, 7)]


def test_evaluation_points_include_the_start_and_the_last_step():
    opt = _Scripted([1.0] * 10)
    steps = []
    train_loop(opt, 10, opt.loss, evaluate=lambda: 1.0, eval_every=4,
               on_eval=lambda step, m, r: steps.append(step))
    assert steps == [0, 4, 8, 10]  # 10 is not a multiple of 4: the last evaluation is still made
    opt = _Scripted([1.0] * 10)
    steps = []
    train_loop(opt, 10, opt.loss, evaluate=lambda: 1.0, eval_every=4, eval_at_start=False,
               on_eval=lambda step, m, r: steps.append(step))
    assert steps == [4, 8, 10]


def test_a_callback_stops_the_run_after_a_final_evaluation():
    opt = _Scripted([1.0] * 10)
    steps = []
    res = train_loop(opt, 10, opt.loss, evaluate=lambda: 1.0, eval_every=4,
                     on_step=lambda step, loss, r: step == 6 or None,
                     on_eval=lambda step, m, r: steps.append(step))
    assert res.stopped and not res.diverged and res.steps_done == 6 and steps == [0, 4, 6]
    res = train_loop(_Scripted([1.0] * 5), 5, _Scripted([1.0] * 5).loss,
                     on_step=lambda step, loss, r: {"not": "a stop"})  # only True stops
    assert res.steps_done == 5 and not res.stopped


def test_the_study_loop_leaves_the_global_rng_and_threads_alone():
    from nestopt.studies.large_lr import train

    g = torch.Generator().manual_seed(3)
    data = {}
    for split in ("train", "val", "test"):  # the shapes of spurious_digits(), without loading it
        data[f"x_{split}"] = torch.rand(96, 1, 10, 10, generator=g)
        data[f"y_{split}"] = torch.randint(0, 10, (96,), generator=g)
        data[f"cue_{split}"] = torch.randint(0, 10, (96,), generator=g)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    a = train(data, 0.05, 0, True, epochs=1)
    assert torch.equal(torch.rand(3), want) and torch.get_num_threads() == threads
    b = train(data, 0.05, 0, True, epochs=1)
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}


def test_the_docstring_example_runs():
    import doctest

    import nestopt.train.loop as loop

    assert doctest.testmod(loop).failed == 0
