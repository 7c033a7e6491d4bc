"""Every value that decides a step is checked where it enters (nestopt.optim.groups): the
constructor, add_param_group, load_state_dict, and a value changed between steps (by a user or a
scheduler). A bad value is refused with an error naming the group, the key and the value, and
nothing has moved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nestopt.optim import ComplexAdam, HypergradientSGD, NestedOptimizer, Polyak, PolyakAdam

from _helpers import OPTIMIZERS, mse_closure, regression_data, tiny_mlp

BAD_LR = [-1.0, math.nan, math.inf]


def _groups(model, lr=None):
    first = {"params": list(model[0].parameters())}
    second = {"params": list(model[2].parameters())}
    if lr is not None:
        second["lr"] = lr
    return [first, second]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("lr", BAD_LR, ids=["negative", "nan", "inf"])
def test_a_group_with_a_bad_lr_is_refused_when_built_naming_the_group_key_and_value(name, lr):
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]=" + ("nan" if lr != lr else repr(lr))):
        OPTIMIZERS[name](_groups(model, lr))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_add_param_group_refuses_a_bad_lr_and_adds_nothing(name):
    model = tiny_mlp()
    opt = OPTIMIZERS[name]([{"params": list(model[0].parameters())}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]=-1.0"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("lr", BAD_LR, ids=["negative", "nan", "inf"])
def test_an_lr_changed_between_steps_is_refused_by_the_next_step_before_anything_moves(name, lr):
    model = tiny_mlp()
    opt = OPTIMIZERS[name](_groups(model))
    x, y = regression_data(16)
    closure = mse_closure(opt, model, x, y)
    opt.step(closure)
    opt.param_groups[0]["lr"] = lr
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.param_groups[0]["lr"] = 0.001  # fixed: steps again
    opt.step(closure)


def test_a_scheduler_that_sets_a_negative_rate_is_caught_at_the_next_step():
    model = tiny_mlp()
    opt = Polyak(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: -1.0)
    x, y = regression_data(16)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]=-1.0 is invalid"):
        opt.step(mse_closure(opt, model, x, y))
    del sched


@pytest.mark.parametrize(("make", "key", "value"), [
    (lambda ps: Polyak(ps), "momentum", 1.5),
    (lambda ps: Polyak(ps), "f_star", math.nan),
    (lambda ps: Polyak(ps), "max_lr", 0.0),
    (lambda ps: PolyakAdam(ps), "betas", (0.9, 1.0)),
    (lambda ps: ComplexAdam(ps), "phase", 4.0),
    (lambda ps: HypergradientSGD(ps), "rule", "cubic"),
    (lambda ps: HypergradientSGD(ps), "scale_min", -1.0),
])
def test_other_step_values_are_checked_in_a_group_too(make, key, value):
    model = tiny_mlp()
    groups = _groups(model)
    groups[1][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[1\]\['{key}'\]"):
        make(groups)


def test_nested_optimizer_refuses_an_infinite_lr_for_its_base():
    # AdamW itself accepts lr=inf: the parameters were NaN after step 2
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"lr=inf is invalid"):
        NestedOptimizer(model.parameters(), lr=math.inf)


# -- load_state_dict -------------------------------------------------------------------------------
def _stepped(name, model=None):
    model = model or tiny_mlp()
    opt = OPTIMIZERS[name](_groups(model))
    x, y = regression_data(16)
    for _ in range(2):
        opt.step(mse_closure(opt, model, x, y))
    return model, opt


@pytest.mark.parametrize(("source", "target"), [
    ("polyak", "learned-default"), ("complex-adam", "polyak"), ("hypergradient-sgd", "hypergradient-adam"),
    ("polyak-adam", "polyak"), ("learned-default", "complex-momentum"),
])
def test_load_state_dict_refuses_another_optimizers_state_and_says_what_differs(source, target):
    _, src = _stepped(source)
    model, opt = _stepped(target)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"is not a \w+ state: param_groups\[0\]"):
        opt.load_state_dict(src.state_dict())
    assert opt.state_dict()["param_groups"] == before["param_groups"]


def test_load_state_dict_names_torch_optimizer_a_state_came_from():
    model = tiny_mlp()
    adam = torch.optim.Adam(_groups(model))
    with pytest.raises(ValueError, match=r"torch\.optim\.Adam"):
        Polyak(_groups(model)).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", ["polyak-adam", "complex-momentum", "hypergradient-adam", "learned-default",
                                  "nested-proxy"])
def test_load_state_dict_refuses_state_for_a_model_of_other_shapes(name):
    _, src = _stepped(name)
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))  # same tensor count, other shapes
    _, opt = _stepped(name, other)
    with pytest.raises(ValueError, match=r"has shape .* which does not fit its parameter of shape"):
        opt.load_state_dict(src.state_dict())


def test_load_state_dict_refuses_a_bad_saved_value():
    _, opt = _stepped("polyak")
    sd = opt.state_dict()
    sd["param_groups"][1]["lr"] = math.nan
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[1\]\['lr'\]=nan"):
        opt.load_state_dict(sd)


def test_load_state_dict_refuses_a_different_number_of_groups():
    model, opt = _stepped("hypergradient-sgd")
    other = HypergradientSGD(model.parameters())
    with pytest.raises(ValueError, match="has 2 param groups, this HypergradientSGD has 1"):
        other.load_state_dict(opt.state_dict())


def test_a_group_value_that_is_a_tensor_is_checked_on_entry():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]=-0.5"):
        Polyak(_groups(model, torch.tensor(-0.5)))


# -- the nested optimizer's base ------------------------------------------------------------------
def test_nested_refuses_a_non_finite_value_for_its_base():
    # torch's SGD accepts weight_decay=inf: the parameters were NaN after one step
    with pytest.raises(ValueError, match=r"weight_decay=inf is invalid"):
        NestedOptimizer(tiny_mlp().parameters(), torch.optim.SGD, lr=1e-3, weight_decay=math.inf)


@pytest.mark.parametrize("base", [Polyak, torch.optim.LBFGS])
def test_nested_refuses_a_base_whose_step_needs_the_loss(base):
    with pytest.raises(ValueError, match=rf"base={base.__name__} is invalid: its step needs a closure or the loss"):
        NestedOptimizer(tiny_mlp().parameters(), base)


def test_nested_checks_a_base_value_changed_between_steps_with_the_bases_own_rules():
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), signal="proxy", lr=1e-3)
    x, y = regression_data(16)
    closure = mse_closure(opt, model, x, y)
    opt.step(closure)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\]=\(0.9, 1.5\) is invalid for the base AdamW: .*beta"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.step(closure)


def test_nested_add_param_group_refuses_what_its_constructor_refuses():
    opt = NestedOptimizer(tiny_mlp().parameters(), signal="proxy", lr=1e-3)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype torch.float16"):
        opt.add_param_group({"params": nn.Linear(4, 2).half().parameters()})
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]=-1.0"):
        opt.add_param_group({"params": nn.Linear(4, 2).parameters(), "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_nested_loads_a_state_saved_by_a_torch_whose_base_lacked_newer_keys():
    _, opt = _stepped("nested-proxy")
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # older torch releases saved no such keys; torch fills them in
        for k in ("decoupled_weight_decay", "fused", "capturable"):
            g.pop(k, None)
    model, fresh = _stepped("nested-proxy")
    fresh.load_state_dict(sd)


def test_a_numpy_scalar_rate_is_a_rate():
    import numpy as np

    model = tiny_mlp()
    opt = Polyak(model.parameters())
    opt.param_groups[0]["lr"] = np.float32(0.5)
    x, y = regression_data(16)
    opt.step(mse_closure(opt, model, x, y))
    opt.param_groups[0]["lr"] = np.float32("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]=np.float32\(nan\)"):
        opt.step(mse_closure(opt, model, x, y))


@pytest.mark.parametrize(("make", "group", "match"), [
    (lambda g: ComplexAdam(g), {"lr": 0.1, "weight_decay": 20.0}, r"lr \* weight_decay must be at most 1"),
    (lambda g: HypergradientSGD(g), {"scale_min": 2.0, "scale_max": 1.0}, r"expected scale_min <= scale_max"),
    (lambda g: HypergradientSGD(g), {"lr": 1.0, "scale_max": 1e13}, r"could reach 1e\+13"),
    (lambda g: Polyak(g), {"lr": 1e13}, r"allowed range is \[0.0, 1000000000000.0\]"),
])
def test_values_that_are_fine_alone_but_not_together_are_refused(make, group, match):
    model = tiny_mlp()
    with pytest.raises(ValueError, match=match):
        make([{"params": list(model.parameters()), **group}])
    opt = make([{"params": list(model.parameters())}])  # and the same between steps
    x, y = regression_data(16)
    opt.step(mse_closure(opt, model, x, y))
    opt.param_groups[0].update(group)
    with pytest.raises(ValueError, match=match):
        opt.step(mse_closure(opt, model, x, y))


def test_nested_refuses_a_base_switch_flipped_once_the_base_has_state():
    # AdamW itself raised KeyError: 'max_exp_avg_sq' at the next step
    model = tiny_mlp()
    opt = NestedOptimizer(model.parameters(), signal="proxy", lr=1e-3)
    x, y = regression_data(16)
    opt.step(mse_closure(opt, model, x, y))
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"\['amsgrad'\]=True is invalid for the base AdamW: a switch cannot change"):
        opt.step(mse_closure(opt, model, x, y))


def test_complex_momentum_with_a_tiny_imaginary_part_stays_finite():
    # the fused kernel's weight decay -(1 - Re beta) / Im beta overflowed float32: NaN at beta = 1e-76
    from nestopt.optim import ComplexMomentum

    model = tiny_mlp()
    opt = ComplexMomentum(model.parameters(), beta=1e-76)
    x, y = regression_data(16)
    for _ in range(3):
        opt.step(mse_closure(opt, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("key", "value", "match"), [
    ("lr", None, r"\['lr'\]=None is invalid"),  # a required value may not be None (max_lr may)
    ("betas", (1.5, 0.9), r"\['betas'\]\[0\]=1.5"),
    ("lr", torch.tensor([0.1, 0.2]), r"\['lr'\]=tensor of shape \(2,\)"),
])
def test_a_value_set_between_steps_is_refused_naming_it(key, value, match):
    model = tiny_mlp()
    opt = PolyakAdam(model.parameters(), max_lr=0.1)
    x, y = regression_data(16)
    opt.step(mse_closure(opt, model, x, y))
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step(mse_closure(opt, model, x, y))
    opt.param_groups[0]["max_lr"] = None  # optional: fine
    opt.param_groups[0][key] = opt.defaults[key]
    opt.step(mse_closure(opt, model, x, y))


def test_weight_decay_with_a_tensor_rate_is_checked_together():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"lr \* weight_decay must be at most 1"):
        ComplexAdam([{"params": list(model.parameters()), "lr": torch.tensor(0.5), "weight_decay": 10.0}])


def test_nested_refuses_a_base_value_beyond_floats_range():
    with pytest.raises(ValueError, match=r"weight_decay=.* is invalid: expected finite numbers"):
        NestedOptimizer(tiny_mlp().parameters(), torch.optim.SGD, lr=1e-3, weight_decay=10**400)
