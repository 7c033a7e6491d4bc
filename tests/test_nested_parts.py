"""NestedOptimizer in parts: what its step hooks see, where its state travels, and features as
objects."""

from __future__ import annotations

import io
import tempfile

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from _helpers import mse_closure, regression_data, tiny_mlp

from nestopt.optim.nested import Feature, NestedOptimizer, StepView
from nestopt.studies.head_features import HeadFeatures


def _run(opt, model, x, y, steps):
    for _ in range(steps):
        opt.step(mse_closure(opt, model, x, y))


def test_replays_fire_no_step_hook_of_the_base():
    """Over 40 hindsight steps (5 replays of 8 steps at 4 multipliers = 160 replayed base steps),
    a global post-hook sees the base exactly once per real step, and a hook on the nested
    optimizer once per step."""
    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01)
    seen = {"base": 0, "nested": 0}

    def hook(o, *_):
        if o is opt.base:
            seen["base"] += 1
        elif o is opt:
            seen["nested"] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        _run(opt, model, x, y, 40)
    finally:
        handle.remove()
    assert opt.counters["replays"] >= 1 and opt.counters["replay_steps"] >= 32
    assert seen == {"base": 40, "nested": 40}


def test_replays_leave_parameters_as_with_the_hooked_replay():
    """Skipping the wrapper for replays changes nothing numerically: with a global hook
    registered (so real steps go through torch's wrapper) the trajectory equals the unhooked one."""
    x, y = regression_data(64, 1)
    a, b = tiny_mlp(), tiny_mlp()
    oa = NestedOptimizer(a.parameters(), torch.optim.AdamW, lr=0.01, window=3, period=5)
    ob = NestedOptimizer(b.parameters(), torch.optim.AdamW, lr=0.01, window=3, period=5)
    _run(oa, a, x, y, 12)
    handle = register_optimizer_step_post_hook(lambda *_: None)
    try:
        _run(ob, b, x, y, 12)
    finally:
        handle.remove()
    assert oa.counters == ob.counters
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_state_dict_has_only_torchs_two_keys_and_loads_weights_only():
    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01, window=3, period=5)
    _run(opt, model, x, y, 4)  # a window is open: caches of every kind
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert isinstance(sd["param_groups"][0]["nested"], bytes)
    assert all("nested" not in g for g in opt.param_groups)  # the live groups do not carry it
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_distributed_checkpoint_helpers_carry_the_nested_state():
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x, y = regression_data(64, 1)
    a, b, c = tiny_mlp(), tiny_mlp(), tiny_mlp()
    kw = dict(lr=0.01, window=3, period=5, per_tensor_groups=True)
    oa, ob, oc = (NestedOptimizer(m.parameters(), torch.optim.AdamW, **kw) for m in (a, b, c))
    _run(oa, a, x, y, 8)
    _run(ob, b, x, y, 8)
    _run(oc, c, x, y, 1)  # DCP loads in place, into an optimizer that has state
    c.load_state_dict(b.state_dict())
    with tempfile.TemporaryDirectory() as d, pytest.warns(UserWarning):
        dcp.save({"optim": get_optimizer_state_dict(b, ob)}, checkpoint_id=d)
        target = {"optim": get_optimizer_state_dict(c, oc)}
        dcp.load(target, checkpoint_id=d)
    set_optimizer_state_dict(c, oc, target["optim"])
    _run(oa, a, x, y, 9)
    _run(oc, c, x, y, 9)
    assert oa.counters == oc.counters and oa.multipliers() == oc.multipliers()
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_state_without_the_controller_keeps_the_controller_in_use():
    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01, window=3, period=5)
    _run(opt, model, x, y, 6)
    saved = opt.state_dict(controller=False)
    with torch.no_grad():
        opt.controller.net[-1].bias.fill_(0.25)
    opt.load_state_dict(saved)
    assert float(opt.controller.net[-1].bias.detach()) == 0.25


def test_loading_another_signals_state_says_so():
    model = tiny_mlp()
    a = NestedOptimizer(model.parameters(), signal="frozen", lr=0.01)
    b = NestedOptimizer(model.parameters(), signal="proxy", lr=0.01)
    with pytest.raises(ValueError, match="signal='frozen'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="no 'nested' entry"):
        b.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


class _Constant(Feature):
    name, width, raw, reads = "constant", 2, True, "level"

    def values(self, view: StepView) -> list[list[float]]:
        level = view.inputs.get("level", 0.0)
        return [[level, float(i)] for i in range(len(view.groups))]


def test_a_users_feature_object_reaches_the_controller_with_its_keyword():
    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), signal="frozen", features=("grad_norm", _Constant()),
                          per_tensor_groups=True, lr=0.01)
    opt.step(mse_closure(opt, model, x, y), level=lambda: 0.75)
    assert opt.feature_table()["constant"] == [0.75] * 4
    assert opt.last_features[:, 1].tolist() == [0.75] * 4  # raw: not standardised
    assert opt.last_features[:, 2].tolist() == [0.0, 1.0, 2.0, 3.0]  # every column of a raw feature
    with pytest.raises(TypeError, match="head_stats"):
        opt.step(mse_closure(opt, model, x, y), head_stats={})


def test_a_feature_object_is_copied_for_each_optimizer():
    x, y = regression_data(64, 1)
    a, b = tiny_mlp(), tiny_mlp()
    heads = HeadFeatures()
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "head": 0}]  # noqa: E731
    oa = NestedOptimizer(groups(a), signal="frozen", features=(heads,), lr=0.01)
    ob = NestedOptimizer(groups(b), signal="frozen", features=(heads,), lr=0.01)
    oa.step(mse_closure(oa, a, x, y), head_stats={"loss": [0.5], "auc": [0.9]})
    ob.step(mse_closure(ob, b, x, y))
    assert oa.feature_table()["heads"] == [0.0, 0.0] and oa.last_raw["heads"] == [0.0, 0.0]
    assert oa.features[0].rows[1, 1] == pytest.approx(0.4)
    assert ob.features[0].rows.abs().sum() == 0  # b's copy never saw a's stats
    assert heads.rows.numel() == 0  # the object passed in is left as it was


def test_unknown_feature_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="features='heads' is invalid: expected one of grad_norm"):
        NestedOptimizer(tiny_mlp().parameters(), features=("heads",))


@pytest.mark.parametrize("signal", ["hindsight", "proxy"])
def test_deepcopy_and_pickle_give_an_optimizer_that_steps_in_lockstep(signal):
    import copy
    import pickle

    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01, window=3, period=5, signal=signal)
    _run(opt, model, x, y, 4)
    pairs = [(model, opt), copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for m, o in pairs:
        _run(o, m, x, y, 8)
        assert o.base.param_groups is o.param_groups
    (m0, o0), *rest = pairs
    for m, o in rest:
        assert o.counters == o0.counters and o.multipliers() == o0.multipliers()
        for p, q in zip(m0.parameters(), m.parameters()):
            assert torch.equal(p, q)


def test_counts_follow_the_convention_apart_from_a_counting_base():
    """The nested optimizer counts in ``group["nested_counters"]`` (its groups are its base's
    dicts), so a base that keeps ``group["counters"]`` counts its own steps undisturbed; the
    replays' counts survive the restores that follow them."""
    from nestopt.optim import LearnedOptimizer

    x, y = regression_data(64, 1)
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), LearnedOptimizer, lr=1.0, window=3, period=5)
    _run(opt, model, x, y, 10)
    assert opt.counters["steps"] == 10 and opt.base.counters["steps"] == 10  # replays are not base steps
    assert opt.counters["replays"] == 1 and opt.counters["replay_steps"] == 3 * 4  # window 3, 4 multipliers
    assert all(g["nested_counters"] == dict(opt.counters) for g in opt.param_groups)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["nested_counters"]["replay_closures"] == 4
    with pytest.raises(TypeError):
        opt.counters["steps"] = 0  # a read-only view
