"""The conformance table: every registered optimizer joins each test here automatically.

An optimizer added to ``nestopt.bench.registry`` is checked for: loss reduction on an asymmetric
quadratic and on Rosenbrock, a bitwise ``state_dict`` round trip in lockstep, two param groups
with different learning rates, a torch ``LRScheduler`` driving it, ``step(closure)`` returning the
loss, and its declared rule for non-finite gradients.

Every nestopt optimizer is in the table twice: as registered, and with ``capturable=True`` (the
step with no host read, ``[capturable]`` in the test id). The nested optimizer's capturable entry
uses ``signal="frozen"`` (the only signal that runs on the device) with a controller whose output
layer is not zero, so its multipliers move.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from _helpers import regression_data, tiny_mlp

from nestopt.bench import registry
from nestopt.tasks import AxisQuadratic, Rosenbrock

def _capturable(spec: registry.OptimizerSpec) -> registry.OptimizerSpec:
    """``spec`` with ``capturable=True`` (the nested optimizer: frozen, its controller perturbed)."""
    if spec.name == "nested-adamw":
        def build(params, lr):
            from nestopt.nets import Controller
            from nestopt.optim.nested import DEFAULT_FEATURES, FEATURES, NestedOptimizer

            ctrl = Controller(sum(FEATURES[f] for f in DEFAULT_FEATURES), 8, seed=1)
            with torch.no_grad():
                ctrl.net[-1].weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
            return NestedOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True,
                                   per_tensor_groups=True, signal="frozen", controller=ctrl, capturable=True)
        return dataclasses.replace(spec, name=f"{spec.name}[capturable]", build=build, needs_loss=False)

    def build(params, lr):
        opt = spec.build(params, lr)
        opt.capturable = True
        return opt
    return dataclasses.replace(spec, name=f"{spec.name}[capturable]", build=build)


# every nestopt optimizer but the Hutchinson preconditioner (its probes are seeded on the host) and
# the large-rate recipe (torch's SGD under a schedule)
SPECS = registry.specs() + [_capturable(s) for s in registry.specs()
                            if s.origin == "nestopt" and s.name not in ("polyak-hutchinson", "sgd-largelr")]
ids = [s.name for s in SPECS]


def _lr(spec: registry.OptimizerSpec) -> float:
    return spec.conformance_lr if spec.conformance_lr is not None else spec.default_lr


def _step(spec, opt, closure):
    """One step the way the bench does it: closure for loss-needing optimizers."""
    if spec.needs_loss:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def _run(spec, model, loss_fn, steps, lr=None, groups=None):
    lr = _lr(spec) if lr is None else lr
    opt = spec.make(groups, lr=lr) if groups is not None else spec.make_for(model, lr=lr)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward(create_graph=spec.create_graph)
        return loss

    for _ in range(steps):
        _step(spec, opt, closure)
    return opt


_mlp = tiny_mlp


def _data(seed: int = 1):
    return regression_data(32, seed)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
@pytest.mark.parametrize("problem", ["quad-asym", "rosenbrock"])
def test_reduces_loss_on_analytic_problems(spec, problem):
    task = AxisQuadratic(c=100.0) if problem == "quad-asym" else Rosenbrock()
    model = task.point(task.start)
    start = float(task.f(model.x.detach()))
    _run(spec, model, lambda: task.f(model.x), steps=300)
    end = float(task.f(model.x.detach()))
    assert torch.isfinite(model.x).all()
    assert end < 0.5 * start, f"{spec.name}: loss {start:.4g} -> {end:.4g} on {problem}"


def _flat(v, out: list) -> None:
    if torch.is_tensor(v):
        out.append(v.detach().clone())
    elif isinstance(v, (list, tuple)):  # SOAP's and Kron's per-dimension factors
        for x in v:
            _flat(x, out)
    elif isinstance(v, str):  # Kron's einsum expressions
        out.append(torch.tensor(list(v.encode()), dtype=torch.uint8))
    elif v is not None:
        out.append(torch.tensor(float(v)))


def _flat_state(opt) -> list[torch.Tensor]:
    if hasattr(opt, "sync_host"):  # what a capturable step keeps on the device, written back (its contract)
        opt.sync_host()
    out: list[torch.Tensor] = []
    for st in opt.state.values():
        for k in sorted(st):
            _flat(st[k], out)
    return out


def _same_draws(spec, k: int) -> None:
    """An optimizer that draws from the global generators (limit "global-rng") gets the same draws
    in both copies of a lockstep comparison: both generators seeded alike before each step."""
    if "global-rng" in spec.limits:
        import numpy as np

        torch.manual_seed(k)
        np.random.seed(k)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_state_dict_round_trip_in_lockstep(spec):
    x, y = _data()
    a, b = _mlp(), _mlp()
    opt_a = spec.make_for(a, lr=_lr(spec))
    opt_b = spec.make_for(b, lr=_lr(spec))

    def closure_for(model, opt):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward(create_graph=spec.create_graph)
            return loss
        return closure

    for k in range(4):
        _same_draws(spec, k)
        _step(spec, opt_a, closure_for(a, opt_a))
        _same_draws(spec, k)
        _step(spec, opt_b, closure_for(b, opt_b))
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    del opt_b
    opt_c = spec.make_for(b, lr=_lr(spec))
    buf.seek(0)
    opt_c.load_state_dict(torch.load(buf, weights_only=False))
    for k in range(4, 8):
        _same_draws(spec, k)
        _step(spec, opt_a, closure_for(a, opt_a))
        _same_draws(spec, k)
        _step(spec, opt_c, closure_for(b, opt_c))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{spec.name}: parameters differ after a state_dict round trip"
    for sa, sc in zip(_flat_state(opt_a), _flat_state(opt_c)):
        assert torch.equal(sa, sc), f"{spec.name}: optimizer state differs after a round trip"


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_two_param_groups_with_different_learning_rates(spec):
    x, y = _data()
    model = _mlp()
    lr = _lr(spec) * 0.2
    groups = [{"params": model[0].parameters(), "lr": lr}, {"params": model[2].parameters(), "lr": lr / 10}]
    loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    if "group-lrs" in spec.limits:
        # A documented limitation of that optimizer: it must refuse loudly, not misbehave.
        with pytest.raises((RuntimeError, ValueError)):
            _run(spec, model, loss_fn, steps=1, groups=groups)
        return
    start = float(loss_fn())
    before = [p.detach().clone() for p in model.parameters()]
    opt = _run(spec, model, loss_fn, steps=30, groups=groups)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr / 10]
    assert float(loss_fn()) < start
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), "every group must move"
    if spec.group_independent:
        # Each group must step exactly as an optimizer holding that group alone would.
        ref = _mlp()
        opt0 = spec.make(ref[0].parameters(), lr=lr)
        opt2 = spec.make(ref[2].parameters(), lr=lr / 10)
        for _ in range(30):
            for o in (opt0, opt2):
                o.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(ref(x), y)
            loss.backward(create_graph=spec.create_graph)
            for o in (opt0, opt2):
                if spec.needs_loss:
                    o.step(lambda: loss)
                else:
                    o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_lr_scheduler_drives_the_learning_rate(spec):
    x, y = _data()
    model = _mlp()
    opt = spec.make(model.parameters(), lr=_lr(spec))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=spec.create_graph)
        return loss

    for i in range(3):
        assert opt.param_groups[0]["lr"] == pytest.approx(_lr(spec) * 0.5**i)
        _step(spec, opt, closure)
        sched.step()
    # A schedule that sets the rate to zero must stop the parameters (weight decay included).
    zero = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = _weights(spec, opt, model)
    iterate = [opt.state[p]["z"].clone() for p in model.parameters()] if "lr-zero-averages" in spec.limits else []
    for _ in range(2):
        _step(spec, opt, closure)
        zero.step()
    if "lr-zero-averages" in spec.limits:
        # Documented: the iterate z stops at lr=0 while the average x keeps moving toward it.
        for p, z in zip(model.parameters(), iterate):
            assert torch.equal(opt.state[p]["z"], z), f"{spec.name}: the iterate moved at lr=0"
        return
    for p, q in zip(_weights(spec, opt, model), frozen):
        assert torch.equal(p, q), f"{spec.name}: parameters moved at lr=0"


def _weights(spec, opt, model) -> list[torch.Tensor]:
    """The model's weights as evaluated (eval mode for optimizers that have one)."""
    if spec.train_eval_modes:
        opt.eval()
    out = copy.deepcopy([p.detach() for p in model.parameters()])
    if spec.train_eval_modes:
        opt.train()
    return out


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_step_with_closure_returns_the_loss(spec):
    x, y = _data()
    model = _mlp()
    opt = spec.make(model.parameters(), lr=_lr(spec))
    seen = []

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=spec.create_graph)
        seen.append(loss.detach().clone())
        return loss

    out = opt.step(closure)
    assert out is not None and torch.equal(out.detach(), seen[0])


@pytest.mark.parametrize("spec", SPECS, ids=ids)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_follows_the_declared_rule(spec, bad):
    x, y = _data()
    model = _mlp()
    opt = _run(spec, model, lambda: nn.functional.mse_loss(model(x), y), steps=2)
    params = [p.detach().clone() for p in model.parameters()]
    state = _flat_state(opt)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=spec.create_graph)
        next(model.parameters()).grad.view(-1)[0] = bad
        return loss

    _step(spec, opt, closure)
    if spec.nonfinite == "skip":
        for p, q in zip(model.parameters(), params):
            assert torch.equal(p, q), f"{spec.name}: a non-finite gradient changed the parameters"
        for s, t in zip(_flat_state(opt), state):
            assert torch.equal(s, t), f"{spec.name}: a non-finite gradient changed the state"
    else:
        # Declared "propagate" (torch's rule): the bad value reaches the parameters, which is
        # why the bench treats a non-finite loss as divergence and a guard is needed in training.
        assert spec.nonfinite == "propagate"
        assert not all(torch.isfinite(p).all() for p in model.parameters()), \
            f"{spec.name} no longer propagates non-finite gradients: declare nonfinite='skip'"
