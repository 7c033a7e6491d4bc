"""A step that raises leaves every parameter, gradient, state tensor and counter bitwise as it
was (nestopt.optim.transaction), for every optimizer, and the next step then goes on exactly as
if the failed call had never happened."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from nestopt.optim import NestedOptimizer

from _helpers import OPTIMIZERS, regression_data, tiny_mlp

class Boom(RuntimeError):
    pass


def _setup(name: str):
    model = tiny_mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = OPTIMIZERS[name](groups)
    x, y = regression_data(32)
    return model, opt, x, y


def _closure(opt, model, x, y, fail_on: int | None = None, calls: list[int] | None = None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if fail_on is not None and calls is not None and len(calls) == fail_on:
            raise Boom("the closure failed")
        return loss
    return closure


def _step(opt, model, x, y, closure=None):
    closure = closure or _closure(opt, model, x, y)
    opt.step(closure)
    if isinstance(opt, NestedOptimizer) and opt.signal == "validation":
        opt.observe_validation(float(nn.functional.mse_loss(model(x), y)))


def _everything(model, opt) -> list:
    """Every parameter, gradient and optimizer value, as bytes and plain values."""
    out: list = []
    for p in model.parameters():
        out.append(p.detach().clone())
        out.append(None if p.grad is None else p.grad.clone())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # state tensors, groups, counters (the nested optimizer's own state too)
    out.append(buf.getvalue())
    if isinstance(opt, NestedOptimizer):
        out += [p.detach().clone() for p in opt.controller.parameters()]
        out += [None if p.grad is None else p.grad.clone() for p in opt.controller.parameters()]
    return out


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.view(torch.uint8) if x.numel() else x, y.view(torch.uint8) if y.numel() else y)):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_whose_closure_raises_changes_nothing_and_the_run_goes_on_as_if_it_never_happened(name):
    model, opt, x, y = _setup(name)
    for _ in range(6):  # state, counters and (nested) a replay window exist
        _step(opt, model, x, y)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    before = _everything(model, opt)
    calls: list[int] = []
    with pytest.raises(Boom) as err:
        opt.step(_closure(opt, model, x, y, fail_on=1, calls=calls))
    assert _same(_everything(model, opt), before)
    assert "the closure" in err.value.__notes__[0] and "as they were" in err.value.__notes__[0]
    for _ in range(5):  # the failed call left no trace: the run and an untouched copy stay identical
        _step(opt, model, x, y)
        _step(twin_opt, twin_model, x, y)
    assert _same(_everything(model, opt), _everything(twin_model, twin_opt))


@pytest.mark.parametrize("name", ["polyak", "nested-hindsight", "learned-default"])
def test_a_keyboard_interrupt_in_the_closure_is_rolled_back_and_still_a_keyboard_interrupt(name):
    model, opt, x, y = _setup(name)
    for _ in range(3):
        _step(opt, model, x, y)
    before = _everything(model, opt)

    def closure():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert _same(_everything(model, opt), before)


def test_a_hindsight_replay_whose_closure_raises_leaves_the_parameters_and_gradients_as_they_were():
    # the audit's case: the replay had moved the parameters (by up to 0.009) and left the gradients None
    model, opt, x, y = _setup("nested-hindsight")
    failed_at = None
    for t in range(12):
        twin_model, twin_opt = copy.deepcopy((model, opt))
        before = _everything(model, opt)
        calls: list[int] = []
        try:
            opt.step(_closure(opt, model, x, y, fail_on=2, calls=calls))  # call 2: the first replay's
        except Boom as err:
            failed_at = t
            assert "hindsight replay's closure" in err.__notes__[0]
            break
        finally:
            pass
    assert failed_at is not None, "no replay happened"
    assert _same(_everything(model, opt), before)
    assert all(p.grad is not None for p in model.parameters())
    for _ in range(9):  # and the next replays go on as in a copy that never failed
        _step(opt, model, x, y)
        _step(twin_opt, twin_model, x, y)
    assert opt.counters["replays"] == twin_opt.counters["replays"] >= 2
    assert _same(_everything(model, opt), _everything(twin_model, twin_opt))


@pytest.mark.parametrize("name", ["nested-proxy", "nested-hindsight"])
def test_a_controller_update_that_raises_after_moving_the_controller_is_rolled_back(name, monkeypatch):
    model, opt, x, y = _setup(name)
    for _ in range(3):
        _step(opt, model, x, y)
    real = opt.controller_opt.step
    failed = []

    def update_then_fail(*a, **k):
        real(*a, **k)  # the controller's weights and Adam state have moved
        failed.append(1)
        raise Boom("controller update failed")

    for _ in range(12):
        twin_model, twin_opt = copy.deepcopy((model, opt))
        before = _everything(model, opt)
        monkeypatch.setattr(opt.controller_opt, "step", update_then_fail)
        try:
            _step(opt, model, x, y)
        except Boom as err:
            assert "controller" in err.__notes__[0]
            break
    assert failed, "the controller never trained"
    assert _same(_everything(model, opt), before)
    monkeypatch.setattr(opt.controller_opt, "step", real)
    for _ in range(6):
        _step(opt, model, x, y)
        _step(twin_opt, twin_model, x, y)
    assert _same(_everything(model, opt), _everything(twin_model, twin_opt))


def test_a_closure_that_zeroes_gradients_in_place_is_named_in_the_note():
    model, opt, x, y = _setup("polyak")
    _step(opt, model, x, y)

    def closure():
        opt.zero_grad(set_to_none=False)
        raise Boom("after zeroing in place")

    with pytest.raises(Boom) as err:
        opt.step(closure)
    assert "changed in place" in err.value.__notes__[0]


def test_an_error_inside_the_update_kernel_says_the_update_had_begun(monkeypatch):
    model, opt, x, y = _setup("polyak")
    _step(opt, model, x, y)

    def broken(*a, **k):
        raise Boom("kernel failed")

    monkeypatch.setattr(torch, "_foreach_add_", broken)
    with pytest.raises(Boom) as err:
        opt.step(_closure(opt, model, x, y))
    assert "partly updated" in err.value.__notes__[0]


def test_an_error_before_the_update_says_nothing_moved_even_deep_in_the_step():
    # Polyak's Hutchinson preconditioner refuses a closure without create_graph inside its
    # directions, before any running statistic is touched
    from nestopt.optim import Polyak

    model = tiny_mlp()
    opt = Polyak(model.parameters(), precondition="hutchinson")
    x, y = regression_data(16)
    with pytest.raises(RuntimeError, match="create_graph") as err:
        opt.step(_closure(opt, model, x, y))
    assert "as they were" in err.value.__notes__[0]
