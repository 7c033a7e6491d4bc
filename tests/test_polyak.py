from __future__ import annotations

import math

import pytest
import torch

from nestopt.optim.polyak import Polyak, PolyakAdam
from nestopt.tasks import AxisQuadratic

F64 = torch.float64


def _pair(x0: float, y0: float, dtype=F64):
    return torch.tensor([x0], dtype=dtype, requires_grad=True), torch.tensor([y0], dtype=dtype, requires_grad=True)


def _closure(opt, f, params, create_graph=False):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = f(*params)
        loss.backward(create_graph=create_graph)
        return loss
    return closure


def test_experiment_1_matches_the_closed_form_sequence_in_float64():
    x = torch.tensor([10.0], dtype=F64, requires_grad=True)
    opt = Polyak([x])
    f = lambda x: ((x - 3.0) ** 2).sum()  # noqa: E731
    for n in range(1, 31):
        opt.step(_closure(opt, f, [x]))
        expected = 3.0 + (10.0 - 3.0) / 2.0**n
        assert abs(float(x) - expected) <= 1e-12 * abs(expected), (n, float(x), expected)


def test_global_step_is_exactly_loss_over_grad_norm_squared():
    task = AxisQuadratic(c=100.0, dtype=F64)
    x = torch.tensor([10.0, -7.0], dtype=F64, requires_grad=True)
    opt = Polyak([x], scope="global", f_star=0.0)
    for _ in range(5):
        before = x.detach().clone()
        f = float(task.f(before))
        g = task.grad(before)
        expected = before - (f / float(g @ g)) * g  # the formula, from the closed forms
        opt.step(_closure(opt, task.f, [x]))
        torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=0)
        assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(f / float(g @ g), rel=1e-12)


@pytest.mark.parametrize("precondition", ["exact", "hutchinson"])
def test_experiment_3_preconditioned_contracts_both_errors_by_half(precondition):
    f = lambda x, y: ((x - 1) ** 2 + 100 * (y - 2) ** 2).sum()  # noqa: E731
    x, y = _pair(10.0, 10.0)
    if precondition == "exact":  # the Hessian diagonal, (2, 200)
        precondition = lambda p: torch.full_like(p, 2.0 if p is x else 200.0)  # noqa: E731
    opt = Polyak([{"params": [x]}, {"params": [y]}], precondition=precondition, precond_eps=0.0)
    cg = precondition == "hutchinson"
    reached = None
    for n in range(1, 31):
        ex, ey = float(x.detach()) - 1, float(y.detach()) - 2
        opt.step(_closure(opt, f, [x, y], create_graph=cg))
        assert (float(x.detach()) - 1) / ex == pytest.approx(0.5, rel=1e-9)
        assert (float(y.detach()) - 2) / ey == pytest.approx(0.5, rel=1e-9)
        if reached is None and float(f(x.detach(), y.detach())) < 1e-6:
            reached = n
    assert reached is not None and reached <= 30


def test_no_step_on_zero_gradient_target_reached_or_nonfinite_loss():
    x = torch.tensor([3.0, 5.0], dtype=F64, requires_grad=True)
    opt = Polyak([x], f_star=0.0)
    x.grad = torch.zeros_like(x)
    opt.step(loss=torch.tensor(1.0, dtype=F64))
    assert opt.param_groups[0]["counters"]["zero_grad"] == 1
    x.grad = torch.ones_like(x)
    opt.step(loss=0.0)  # at f_star: nothing to gain
    opt.step(loss=-1.0)
    assert opt.param_groups[0]["counters"]["at_target"] == 2
    for bad in (float("nan"), float("inf")):
        opt.step(loss=bad)
    assert opt.param_groups[0]["counters"]["nonfinite"] == 2
    assert torch.equal(x.detach(), torch.tensor([3.0, 5.0], dtype=F64))
    assert opt.param_groups[0]["counters"]["steps"] == 0


@pytest.mark.parametrize("kwargs", [{"scope": "tensor"}, {"precondition": "rms"}, {"momentum": 0.5}, {}])
def test_nonfinite_gradient_in_any_variant_leaves_everything_untouched(kwargs):
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    opt = Polyak([a, b], **kwargs)
    for _ in range(2):
        a.grad, b.grad = torch.tensor([0.5, -0.5]), torch.tensor([1.0])
        opt.step(loss=2.0)
    snap = [a.detach().clone(), b.detach().clone()]
    state = {k: v.clone() for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v)}
    a.grad, b.grad = torch.tensor([float("nan"), 1.0]), torch.tensor([1.0])
    opt.step(loss=2.0)
    assert torch.equal(a, snap[0]) and torch.equal(b, snap[1])
    after = {k: v for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v)}
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert opt.param_groups[0]["counters"]["nonfinite"] == 1


def test_step_needs_the_loss():
    x = torch.zeros(2, requires_grad=True)
    opt = Polyak([x])
    x.grad = torch.ones(2)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


@pytest.mark.parametrize("kwargs, name", [
    ({"scope": "layer"}, "scope"), ({"share": "half"}, "share"), ({"max_lr": 0.0}, "max_lr"),
    ({"momentum": 1.0}, "momentum"), ({"lr": -1.0}, "lr"), ({"precondition": "newton"}, "precondition"),
    ({"eps": -1e-3}, "eps"), ({"f_star": float("nan")}, "f_star"), ({"beta2": 1.0}, "beta2"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        Polyak([torch.zeros(1, requires_grad=True)], **kwargs)


def _first_order_drop(opt, params, grads, loss):
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step(loss=loss)
    return sum(float(g.flatten() @ (b - p.detach()).flatten()) for g, b, p in zip(grads, before, params))


@pytest.mark.parametrize("share, factor", [("norm", 1.0), ("equal", 1.0), ("global", 1.0), ("whole", 3.0)])
def test_shares_keep_the_first_order_drop_at_the_gap(share, factor):
    # Three tensors with very different gradient scales. The linear model's predicted drop is
    # sum_i g_i . (p_i - p_i'), which must equal the gap f - f* (the note's "whole" share: k times it).
    params = [torch.zeros(3, dtype=F64, requires_grad=True) for _ in range(3)]
    grads = [torch.tensor([1.0, 2.0, 2.0], dtype=F64), torch.tensor([0.01, 0.0, 0.0], dtype=F64),
             torch.tensor([30.0, -40.0, 0.0], dtype=F64)]
    opt = Polyak(params, scope="tensor", share=share)
    assert _first_order_drop(opt, params, grads, 5.0) == pytest.approx(factor * 5.0, rel=1e-12)


def test_global_share_equals_global_scope_and_norm_share_equalises_step_lengths():
    grads = [torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([0.1], dtype=F64)]
    a = [torch.zeros(2, dtype=F64, requires_grad=True), torch.zeros(1, dtype=F64, requires_grad=True)]
    b = [torch.zeros(2, dtype=F64, requires_grad=True), torch.zeros(1, dtype=F64, requires_grad=True)]
    _first_order_drop(Polyak(a, scope="tensor", share="global"), a, grads, 2.0)
    _first_order_drop(Polyak(b, scope="global"), b, grads, 2.0)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=0)
    c = [torch.zeros(2, dtype=F64, requires_grad=True), torch.zeros(1, dtype=F64, requires_grad=True)]
    _first_order_drop(Polyak(c, scope="tensor", share="norm"), c, grads, 2.0)
    # Each piece moves (f - f*) / sum_j ||g_j|| = 2 / 5.1, whatever its own gradient scale.
    assert float(c[0].norm()) == pytest.approx(2.0 / 5.1, rel=1e-12)
    assert float(c[1].norm()) == pytest.approx(2.0 / 5.1, rel=1e-12)


def test_one_group_fast_path_matches_the_general_path_bitwise():
    # One param group and scope="global" take a shortcut; two groups sharing one step size take
    # the general path. Same arithmetic, so the same bits, counters and eta.
    torch.manual_seed(0)
    shapes = [(3, 4), (4,), (40000,)]  # the last takes the BLAS-dot branch of the norm pass
    init = [torch.randn(s, dtype=torch.float32) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float32) for s in shapes] for _ in range(3)]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    fast = Polyak(a, lr=0.5, max_lr=2e-5)  # binding: eta = 2 / ||g||^2 is about 5e-5
    general = Polyak([{"params": b[:1]}, {"params": b[1:]}], lr=0.5, max_lr=2e-5)
    for gs in grads:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step(loss=2.0)
        general.step(loss=2.0)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        assert general.param_groups[1]["polyak"] == fast.param_groups[0]["polyak"]
        assert general.param_groups[1]["counters"] == fast.param_groups[0]["counters"]


def test_group_scope_gives_one_step_size_per_group():
    a, b, c = (torch.zeros(2, dtype=F64, requires_grad=True) for _ in range(3))
    opt = Polyak([{"params": [a, b]}, {"params": [c]}], scope="group")
    for p, g in zip((a, b, c), ([1.0, 0.0], [0.0, 1.0], [0.0, 4.0])):
        p.grad = torch.tensor(g, dtype=F64)
    opt.step(loss=1.0)
    e0, e1 = opt.param_groups[0]["polyak"]["eta"], opt.param_groups[1]["polyak"]["eta"]
    # ||g_group0|| = sqrt(2), ||g_group1|| = 4; shares sqrt(2)/(sqrt(2)+4) and 4/(sqrt(2)+4).
    assert e0 == pytest.approx((math.sqrt(2) / (math.sqrt(2) + 4)) / 2.0, rel=1e-12)
    assert e1 == pytest.approx((4 / (math.sqrt(2) + 4)) / 16.0, rel=1e-12)


def test_max_lr_caps_the_step_and_momentum_accumulates():
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = Polyak([x], max_lr=0.01)
    x.grad = torch.tensor([1e-3], dtype=F64)
    opt.step(loss=1.0)
    assert opt.param_groups[0]["polyak"]["eta"] == 0.01
    assert float(x) == pytest.approx(1.0 - 1e-5, rel=1e-12)
    y = torch.tensor([0.0], dtype=F64, requires_grad=True)
    opt = Polyak([y], momentum=0.5)
    for _ in range(2):
        y.grad = torch.tensor([1.0], dtype=F64)
        opt.step(loss=1.0)
    assert float(y) == pytest.approx(-(1.0 + 1.5), rel=1e-12)  # buffers 1, then 0.5 + 1


def test_hutchinson_without_create_graph_says_what_to_do():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = Polyak([x], precondition="hutchinson")
    loss = (x**2).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step(loss=loss)


def test_polyak_adam_step_has_the_polyak_magnitude():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    opt = PolyakAdam([x], betas=(0.0, 0.0))  # u = g / (|g| + eps): sign-like direction
    g = torch.tensor([0.2, -3.0, 0.01], dtype=F64)
    x.grad = g.clone()
    opt.step(loss=4.0)
    u = g / (g.abs() + 1e-8)
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=F64) - (4.0 / float(g @ u)) * u
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="precondition"):
        PolyakAdam([x], precondition="rms")


def test_float32_and_scheduler_compatibility():
    x = torch.tensor([10.0, 10.0], requires_grad=True)
    task = AxisQuadratic(c=1.0)
    opt = Polyak([x])
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=10)
    for _ in range(10):
        opt.step(_closure(opt, task.f, [x]))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert float(task.f(x.detach())) < 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_whose_norm_overflows_half_still_steps(dtype):
    # ||g||^2 = 1e5 * 300^2 = 9e9: inf in float16 and coarse in bfloat16, so the norm is taken in float32.
    x = torch.ones(100_000, dtype=dtype, requires_grad=True)
    x.grad = torch.full_like(x, 300.0)
    small = torch.ones(3, dtype=dtype, requires_grad=True)  # a small tensor alongside, fused norm path
    small.grad = torch.zeros_like(small)
    opt = Polyak([x, small])
    opt.step(loss=torch.tensor(2.0))
    counts = opt.param_groups[0]["counters"]
    assert counts["steps"] == 1 and counts["nonfinite"] == 0
    assert opt.param_groups[0]["polyak"]["eta"] == pytest.approx(2.0 / 9e9, rel=1e-3)
