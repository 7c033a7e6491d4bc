"""LearnedOptimizer's capturable step (issue 28): no host read from the first step, the default
path's results (bitwise where the arithmetic is the same, float32 rounding for the hybrid's
batched per-tensor network), skipped steps masked on the device, state that round-trips, and the
compiled kernels with their fall-back."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from _helpers import HostReads
from nestopt.nets import CoordinateLSTM, DirectUpdateMLP, HybridAdamNet, LinearUpdate
from nestopt.optim import LearnedOptimizer
from nestopt.optim import learned_device


def _hybrid() -> HybridAdamNet:
    net = HybridAdamNet()
    with torch.no_grad():  # a network whose step scale varies with its inputs
        torch.manual_seed(3)
        net.net[-1].weight.normal_(0, 0.5)
        net.net[-1].bias.fill_(0.3)
    return net


NETS = {"linear": lambda: LinearUpdate(seed=3), "mlp": DirectUpdateMLP, "mlp-seed": lambda: DirectUpdateMLP("seed"),
        "hybrid": _hybrid, "lstm": lambda: CoordinateLSTM(hidden=4)}
BITWISE = {"linear", "mlp", "mlp-seed", "lstm"}  # the hybrid's network runs batched over tensors: float32 rounding
BAD = {10: float("nan"), 40: float("inf"), 41: -float("inf"), 77: float("nan")}  # step -> injected gradient value


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


_G = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 5, generator=_G), torch.randn(64, 3, generator=_G)


def _opt(model: nn.Module, net, capturable: bool, **kw) -> LearnedOptimizer:
    groups = [{"params": list(model[0].parameters()), "weight_decay": 0.1}, {"params": list(model[2].parameters()), "lr": 0.5}]
    return LearnedOptimizer(groups, net=net, capturable=capturable, chunk=16, compile=False, **kw)


def _grads(model: nn.Module, i: int) -> None:
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(X), Y).backward()
    if i in BAD:
        list(model.parameters())[i % 4].grad.view(-1)[i % 5] = BAD[i]


def _state(opt: LearnedOptimizer) -> list[object]:
    opt.sync_host()
    return [v.clone() if torch.is_tensor(v) else v for p in opt.state for v in opt.state[p].values()]


def _same(a: list[object], b: list[object], bitwise: bool = True) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if torch.is_tensor(x):
            if bitwise:
                assert torch.equal(x.cpu(), y.cpu())
            else:
                torch.testing.assert_close(x.cpu(), y.cpu(), rtol=1e-5, atol=1e-6)
        elif bitwise:
            assert x == y
        else:
            assert x == pytest.approx(y, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("kind", NETS)
def test_capturable_step_reads_nothing_and_equals_the_default_path(kind):
    """100 steps, four of them with a NaN or an inf gradient: no host read in a capturable step
    (the first three, the skipped and the last counted), the default path's parameters, buffers and counts, and a skipped step
    leaves every tensor bitwise as it was."""
    net = NETS[kind]()
    a, b = _model(), _model()
    host, dev = _opt(a, net, False), _opt(b, net, True)
    for i in range(100):
        _grads(a, i)
        _grads(b, i)
        host.step()
        before = [p.detach().clone() for p in b.parameters()] + _state(dev) if i in BAD else None
        if i < 3 or i in BAD or i == 99:  # (the counting mode costs a Python call per torch operation)
            with HostReads() as h:
                dev.step()
            assert h.n == 0, h.where
        else:
            dev.step()
        if before is not None:  # skipped on the device: nothing moved, bitwise
            _same(before, [p.detach().clone() for p in b.parameters()] + _state(dev))
    bitwise = kind in BITWISE
    for p, q in zip(a.parameters(), b.parameters()):
        if bitwise:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _same(_state(host), _state(dev), bitwise)
    assert dict(dev.counters) == dict(host.counters) == {"steps": 96, "nonfinite": 4}


def _run(model, opt, steps) -> None:
    for i in steps:
        _grads(model, i)
        opt.step()


@pytest.mark.parametrize("kind", ["linear", "hybrid", "mlp"])
def test_capturable_state_round_trips_bitwise(kind):
    """Saved mid-run (state_dict through torch.save, deepcopy, pickle) and continued in lockstep:
    bitwise the run that was not interrupted; the state dict also loads into a default-path
    optimizer, which continues with the default path's numbers."""
    net = NETS[kind]()
    a, b = _model(), _model()
    oa, ob = _opt(a, net, True), _opt(b, net, True)
    _run(a, oa, range(12))
    _run(b, ob, range(12))
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert all(isinstance(v, float) for st in loaded["state"].values() for k, v in st.items() if k in ("v_bar", "m_sq", "v_sum"))
    c = copy.deepcopy(b)
    oc = _opt(c, net, True)
    oc.load_state_dict(loaded)
    copied = copy.deepcopy((a, oa))  # model and optimizer together: the copy's state is on its parameters
    pickled = pickle.loads(pickle.dumps((a, oa)))
    assert copied[1].capturable is True and pickled[1].capturable is True
    # a default-path optimizer from the same state dict, beside a default-path run from the start
    d, e = copy.deepcopy(b), _model()
    od = _opt(d, net, False)
    buf.seek(0)
    od.load_state_dict(torch.load(buf))  # (its own copy: a loaded "step" tensor is taken as it is, as torch does)
    oe = _opt(e, net, False)
    _run(e, oe, range(12))
    for m, o in ((a, oa), (c, oc), (d, od), (e, oe), copied, pickled):
        _run(m, o, range(12, 45))
    for m, o in ((c, oc), copied, pickled):
        for p, q in zip(a.parameters(), m.parameters()):
            assert torch.equal(p, q)
        _same(_state(oa), _state(o))
        assert dict(o.counters) == {"steps": 42, "nonfinite": 3}
    assert dict(oc.counters) == dict(oa.counters) == {"steps": 42, "nonfinite": 3}
    for p, q in zip(d.parameters(), e.parameters()):
        if kind in BITWISE:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_device_values_are_written_back_when_read():
    """Counters, telemetry and the per-tensor floats in ``state`` are the device's values once
    read (and the pending counts are not counted twice)."""
    net = _hybrid()
    a, b = _model(), _model()
    host, dev = _opt(a, net, False), _opt(b, net, True)
    _run(a, host, range(45))
    _run(b, dev, range(45))
    pa, pb = next(a.parameters()), next(b.parameters())
    assert dev.param_groups[0]["counters"]["steps"] == 0  # read directly it lags: nothing was read yet
    assert dev.counters["nonfinite"] == 3 and dev.counters["steps"] == 42
    assert dev.telemetry()["nonfinite"] == 3.0 and dev.telemetry()["steps"] == 42.0
    assert dev.param_groups[1]["counters"] == {"steps": 42, "nonfinite": 3}
    assert dev.state[pb]["m_sq"] == pytest.approx(host.state[pa]["m_sq"], rel=1e-5)
    assert dev.state[pb]["v_sum"] == pytest.approx(host.state[pa]["v_sum"], rel=1e-5)
    assert int(dev.state[pb]["step"]) == int(host.state[pa]["step"]) == 42
    dev.capturable = False  # the host path from here, from the values written back
    _run(b, dev, range(45, 50))
    _run(a, host, range(45, 50))
    assert dict(dev.counters) == dict(host.counters) == {"steps": 47, "nonfinite": 3}
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _compiles() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _compiles(), reason="torch.compile cannot build kernels on this machine")
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_compiled_capturable_kernels_match_the_default_path(kind):
    """Tensors of 65536 elements take the compiled kernels (the linear network's masked pass, the
    MLP's fused chunk): no host read, the default path's numbers to float32 rounding, a skipped
    step bitwise nothing."""
    gen = torch.Generator().manual_seed(1)
    net = NETS[kind]()
    p0 = torch.randn(1 << 16, generator=gen)
    grads = [torch.randn(1 << 16, generator=gen) * 0.1 for _ in range(4)]
    grads[2][5] = float("nan")
    host_q, dev_q, fast_q = (p0.clone().requires_grad_() for _ in range(3))
    host = LearnedOptimizer([host_q], net=net, weight_decay=0.1, compile=False)
    fast = LearnedOptimizer([fast_q], net=net, weight_decay=0.1)  # the default path's compiled kernels
    dev = LearnedOptimizer([dev_q], net=net, weight_decay=0.1, capturable=True)
    for i, g in enumerate(grads):
        host_q.grad, dev_q.grad, fast_q.grad = g.clone(), g.clone(), g.clone()
        host.step()
        fast.step()
        before = dev_q.detach().clone()
        with HostReads() as h:
            dev.step()
        assert h.n == 0, h.where
        if i == 2:
            assert torch.equal(dev_q, before)
    assert not dev._compile_failed
    assert ("_linear_pass_masked" if kind == "linear" else "_mlp_chunk") in learned_device._COMPILED_FNS
    torch.testing.assert_close(dev_q, host_q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast_q, host_q, rtol=1e-5, atol=1e-7)
    assert not torch.equal(dev_q, p0)
    assert dict(dev.counters) == {"steps": 3, "nonfinite": 1}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_failed_compile_of_a_capturable_kernel_warns_and_runs_eager(monkeypatch, kind):
    monkeypatch.setattr(learned_device, "_COMPILED_FNS", {})

    def no_compile(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", no_compile)
    net = NETS[kind]()
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(1 << 16, generator=gen)
    g = torch.randn(1 << 16, generator=gen)
    qa, qb = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    a = LearnedOptimizer([qa], net=net, capturable=True)
    b = LearnedOptimizer([qb], net=net, capturable=True, compile=False)
    with pytest.warns(RuntimeWarning, match="not supported here"):
        qa.grad = g.clone()
        a.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per instance
        qa.grad = g.clone()
        a.step()
    for _ in range(2):
        qb.grad = g.clone()
        b.step()
    assert a._compile_failed and not learned_device._COMPILED_FNS
    assert torch.equal(qa, qb)  # the fall-back is the eager kernel: the same numbers
    strict = LearnedOptimizer([qa], net=net, capturable=True, compile=True)
    qa.grad = g.clone()
    with pytest.raises(RuntimeError, match="not supported here"):
        strict.step()
