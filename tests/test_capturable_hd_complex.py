"""The capturable steps of the hypergradient and complex optimizers (issue 28): no host read from
the first step, the default path's results (bitwise where the arithmetic is the same, float32
rounding for HypergradientAdam's multi-tensor statistics and ComplexAdam's complex bias
correction), skipped steps masked on the device (the whole step for the hypergradient
optimizers, one group for the complex ones), state that round-trips, and the values a logger
reads."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from _helpers import HostReads
from nestopt.optim import ComplexAdam, ComplexMomentum, HypergradientAdam, HypergradientSGD

# name -> (factory(groups, capturable), bitwise with the default path)
CONFIGS = {
    "hd-sgd": (lambda gs, c: HypergradientSGD(gs, lr=0.05, capturable=c), True),
    "hd-sgd-additive": (lambda gs, c: HypergradientSGD(gs, lr=0.05, rule="additive", beta=1e-3, capturable=c), True),
    "hd-adam": (lambda gs, c: HypergradientAdam(gs, lr=0.01, weight_decay=0.1, capturable=c), False),
    "hd-adam-additive": (lambda gs, c: HypergradientAdam(gs, lr=0.01, rule="additive", beta=1e-4, scale_max=1.1,
                                                          capturable=c), False),
    "complex-momentum": (lambda gs, c: ComplexMomentum(gs, lr=0.05, weight_decay=0.01, capturable=c), True),
    "complex-momentum-foreach": (lambda gs, c: ComplexMomentum(gs, lr=0.05, foreach=True, capturable=c), True),
    "complex-momentum-heavy-ball": (lambda gs, c: ComplexMomentum(gs, lr=0.05, phase=0.0, weight_decay=0.01,
                                                                  capturable=c), True),
    "complex-adam": (lambda gs, c: ComplexAdam(gs, lr=0.01, weight_decay=0.1, capturable=c), False),
    "complex-adam-phase0": (lambda gs, c: ComplexAdam(gs, lr=0.01, phase=0.0, weight_decay=0.1, capturable=c), True),
}
BAD = {10: float("nan"), 40: float("inf"), 41: -float("inf"), 77: float("nan")}  # step -> injected gradient value
_G = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 5, generator=_G), torch.randn(64, 3, generator=_G)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _opt(model: nn.Module, name: str, capturable: bool):
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.02}]
    return CONFIGS[name][0](groups, capturable)


def _grads(model: nn.Module, i: int) -> None:
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(X), Y).backward()
    if i in BAD:  # steps 40, 41 and 77 hit group 0 (parameters 0 and 1), step 10 group 1 (parameters 2 and 3)
        list(model.parameters())[i % 4].grad.view(-1)[i % 3] = BAD[i]


def _tensors(model: nn.Module, opt) -> list[torch.Tensor]:
    opt.sync_host()
    return [p.detach().clone() for p in model.parameters()] + \
        [v.clone() for p in model.parameters() for v in opt.state[p].values() if torch.is_tensor(v)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor], bitwise: bool) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if bitwise:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _group_values(opt) -> list[float]:
    return [g["hd_scale"] for g in opt.param_groups] if "hd_scale" in opt.param_groups[0] else []


@pytest.mark.parametrize("name", CONFIGS)
def test_capturable_step_reads_nothing_and_equals_the_default_path(name):
    """100 steps, four with a NaN or an inf gradient: no host read in a capturable step (the
    first three, the skipped and the last counted), the default path's parameters, buffers, scales and counts, and a skipped
    step leaves the skipped tensors bitwise as they were (every group for the hypergradient
    optimizers; only the group with the bad gradient for the complex ones, the other steps)."""
    bitwise = CONFIGS[name][1]
    a, b = _model(), _model()
    host, dev = _opt(a, name, False), _opt(b, name, True)
    whole = isinstance(dev, HypergradientSGD | HypergradientAdam)
    for i in range(100):
        _grads(a, i)
        _grads(b, i)
        host.step()
        before = [p.detach().clone() for p in b.parameters()] + [
            v.clone() for p in b.parameters() for v in dev.state[p].values()] if i in BAD and i > 0 else None
        if i < 3 or i in BAD or i == 99:  # (the counting mode costs a Python call per torch operation)
            with HostReads() as h:
                dev.step()
            assert h.n == 0, h.where
        else:
            dev.step()
        if before is not None:
            after = [p.detach() for p in b.parameters()] + [v for p in b.parameters() for v in dev.state[p].values()]
            bad_group = 0 if i % 4 < 2 else 1
            k = len(list(b.parameters()))
            for j, (x, y) in enumerate(zip(before, after)):
                param = j if j < k else None
                skipped = whole or param is None or (param < 2) == (bad_group == 0)
                if param is not None and skipped:
                    assert torch.equal(x, y), f"parameter {param} moved in a skipped step"
            if whole:
                _same(before, after, True)
    _same(_tensors(a, host), _tensors(b, dev), bitwise)
    hv, dv = _group_values(host), _group_values(dev)
    assert dv == hv if bitwise else dv == pytest.approx(hv, rel=1e-6)
    assert dict(dev.counters) == dict(host.counters)
    assert [g["counters"] for g in dev.param_groups] == [g["counters"] for g in host.param_groups]
    if whole:
        assert dict(dev.counters) == {"steps": 96, "nonfinite": 4}
    else:  # per group: its own bad steps
        assert [g["counters"] for g in dev.param_groups] == [{"steps": 97, "nonfinite": 3},
                                                             {"steps": 99, "nonfinite": 1}]


def test_complex_skips_only_the_group_with_a_bad_gradient():
    """The group with the NaN keeps its parameters and buffers bitwise; the other group steps, as
    the default path steps it."""
    for cls in (ComplexMomentum, ComplexAdam):
        a, b = _model(), _model()
        oa = cls([{"params": list(a[0].parameters())}, {"params": list(a[2].parameters())}], lr=0.01, capturable=False)
        ob = cls([{"params": list(b[0].parameters())}, {"params": list(b[2].parameters())}], lr=0.01, capturable=True)
        for i in range(3):
            _grads(a, i)
            _grads(b, i)
            oa.step()
            ob.step()
        _grads(a, 3)
        _grads(b, 3)
        a[2].bias.grad[1] = b[2].bias.grad[1] = float("nan")
        frozen = [t.clone() for p in b[2].parameters() for t in (p.detach(), *ob.state[p].values())]
        moving = [p.detach().clone() for p in b[0].parameters()]
        oa.step()
        ob.step()
        assert all(torch.equal(x, y) for x, y in zip(frozen, [t for p in b[2].parameters()
                                                            for t in (p.detach(), *ob.state[p].values())]))
        assert not any(torch.equal(x, p) for x, p in zip(moving, b[0].parameters()))
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
        ob.sync_host()
        assert [g["counters"] for g in ob.param_groups] == [{"steps": 4, "nonfinite": 0}, {"steps": 3, "nonfinite": 1}]


def test_a_group_without_gradients_counts_nothing():
    a = _model()
    opt = ComplexAdam([{"params": list(a[0].parameters())}, {"params": list(a[2].parameters())}], lr=0.01,
                      capturable=True)
    _grads(a, 0)
    for p in a[2].parameters():
        p.grad = None
    with HostReads() as h:
        opt.step()
    assert h.n == 0, h.where
    assert dict(opt.counters) == {"steps": 1, "nonfinite": 0}
    assert [g["counters"] for g in opt.param_groups] == [{"steps": 1, "nonfinite": 0}, {"steps": 0, "nonfinite": 0}]
    assert all(not opt.state[p] for p in a[2].parameters())


def _run(model, opt, steps) -> None:
    for i in steps:
        _grads(model, i)
        opt.step()


@pytest.mark.parametrize("name", ["hd-sgd", "hd-adam", "complex-momentum", "complex-adam"])
def test_capturable_state_round_trips_bitwise(name):
    """Saved mid-run (state_dict through torch.save, deepcopy, pickle) and continued in lockstep:
    bitwise the run that was not interrupted, counts and scales included; the state dict holds the
    scales as floats and also loads into a default-path optimizer."""
    a, b = _model(), _model()
    oa, ob = _opt(a, name, True), _opt(b, name, True)
    _run(a, oa, range(12))
    _run(b, ob, range(12))
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    for g in loaded["param_groups"]:
        assert all(isinstance(g[k], float) for k in ("hd_scale", "hd_prev_gsq") if k in g)
    c = copy.deepcopy(b)
    oc = _opt(c, name, True)
    oc.load_state_dict(loaded)
    copied = copy.deepcopy((a, oa))  # model and optimizer together: the copy's state is on its parameters
    pickled = pickle.loads(pickle.dumps((a, oa)))
    assert copied[1].capturable is True and pickled[1].capturable is True
    d, e = copy.deepcopy(b), _model()  # a default-path optimizer from the same state dict
    od = _opt(d, name, False)
    buf.seek(0)
    od.load_state_dict(torch.load(buf))  # its own tensors (a loaded state dict's tensors are taken as they are)
    oe = _opt(e, name, True)
    _run(e, oe, range(12))
    oe.capturable = False  # switching paths mid-run: the device values come back to the groups
    for m, o in ((a, oa), (c, oc), (d, od), (e, oe), copied, pickled):
        _run(m, o, range(12, 50))
    for m, o in ((c, oc), copied, pickled):
        _same(_tensors(a, oa), _tensors(m, o), True)
        assert _group_values(o) == _group_values(oa)
        assert [g["counters"] for g in o.param_groups] == [g["counters"] for g in oa.param_groups]
    _same(_tensors(d, od), _tensors(e, oe), True)
    assert _group_values(od) == _group_values(oe)
    assert dict(od.counters) == dict(oe.counters) == dict(oa.counters)


@pytest.mark.parametrize("name", ["hd-sgd", "hd-adam", "complex-adam"])
def test_telemetry_reads_the_device_values(name):
    """telemetry() and counters after capturable steps: the default path's values; the groups'
    own entries lag until something reads them (the step never writes them)."""
    a, b = _model(), _model()
    host, dev = _opt(a, name, False), _opt(b, name, True)
    _run(a, host, range(45))
    _run(b, dev, range(45))
    assert dev.param_groups[0]["counters"]["steps"] == 0  # pending on the device
    ht, dt = host.telemetry(), dev.telemetry()
    assert set(ht) == set(dt)
    for k in ht:
        assert dt[k] == pytest.approx(ht[k], rel=1e-6), k
    assert dev.param_groups[0]["counters"] == host.param_groups[0]["counters"]
    if "scale/0" in dt:
        assert dt["scale/0"] != 1.0 and dt["scale/1"] != 1.0  # the scales moved and came back
    assert dt.get("nonfinite", 0) == ht.get("nonfinite", 0) > 0


def test_complex_momentum_large_tensor_bitwise():
    """A tensor larger than the CPU path's block (2^18 elements, not a multiple of it): the
    capturable step's whole-tensor fused passes give the blocked default step's numbers."""
    torch.manual_seed(0)
    n = (1 << 18) + 7
    wa = nn.Parameter(torch.randn(n))
    wb = nn.Parameter(wa.detach().clone())
    oa = ComplexMomentum([wa], lr=0.01, capturable=False)
    ob = ComplexMomentum([wb], lr=0.01, capturable=True)
    for i in range(4):
        g = torch.randn(n, generator=torch.Generator().manual_seed(i))
        wa.grad, wb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(wa, wb)
    assert torch.equal(oa.state[wa]["momentum_buffer"], ob.state[wb]["momentum_buffer"])


def test_complex_adam_bias_correction_closed_form():
    """Step 1 from zero state on one parameter: m = (1 - beta1) g, so Re(c m) = g exactly for any
    phase (the complex bias correction undoes the first step's gain): p moves by lr g / (|g| + eps)."""
    for phase in (0.0, math.pi / 8, -2.5):
        w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        opt = ComplexAdam([w], lr=0.1, betas=(0.8, 0.9), phase=phase, eps=0.0, capturable=True)
        w.grad = torch.tensor([0.5, -0.25, 2.0], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9, 2.9], dtype=torch.float64), rtol=0, atol=1e-12)
        assert opt.state[w]["step"].item() == 1.0
