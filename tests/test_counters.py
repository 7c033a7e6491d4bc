"""The step-counter convention (:mod:`nestopt.optim.counters`) in every optimizer that keeps it:
a NaN gradient is counted under ``"nonfinite"`` in ``group["counters"]``, the counts survive
``state_dict`` round trips, ``copy.deepcopy`` and ``pickle``, and state dicts in the layouts used
before the convention still load. Also: ``LearnedOptimizer``'s compiled kernel is per instance."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

from nestopt.meta import LinearUpdate
from nestopt.optim import (ComplexAdam, ComplexMomentum, HypergradientAdam, HypergradientSGD, LearnedOptimizer,
                           Polyak, PolyakAdam)
from nestopt.optim import learned as learned_mod
from nestopt.optim.counters import CounterView, bump, counters, ensure, fresh, read

NEEDS_LOSS = {Polyak, PolyakAdam}

FACTORIES = {
    "polyak": lambda ps: Polyak(ps),
    "polyak-adam": lambda ps: PolyakAdam(ps),
    "complex-momentum": lambda ps: ComplexMomentum(ps, lr=0.05),
    "complex-adam": lambda ps: ComplexAdam(ps, lr=0.05),
    "sgd-hd": lambda ps: HypergradientSGD(ps, lr=0.05),
    "adam-hd": lambda ps: HypergradientAdam(ps, lr=0.05),
    "learned-linear": lambda ps: LearnedOptimizer(ps, net=LinearUpdate(seed=3), compile=False),
    "learned-default": lambda ps: LearnedOptimizer(ps, compile=False),
    "learned-mlp": lambda ps: LearnedOptimizer(ps, net="mlp"),
}


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()]


def _groups(ps):
    return [{"params": [ps[0]]}, {"params": [ps[1]]}]


def _grads(t: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]


def _step(opt, ps, t: int, *, nan: int | None = None) -> None:
    """Set gradients ``_grads(t)`` (a NaN in tensor ``nan``) and step (with a loss where needed)."""
    for i, (p, g) in enumerate(zip(ps, _grads(t))):
        g = g.clone()
        if nan == i:
            g.view(-1)[0] = float("nan")
        p.grad = g
    if type(opt) in NEEDS_LOSS:
        opt.step(loss=torch.tensor(3.0 + t, dtype=torch.float64))
    else:
        opt.step()


def _all_counts(opt) -> list[dict[str, int]]:
    return [dict(g["counters"]) for g in opt.param_groups]


@pytest.mark.parametrize("name", FACTORIES)
def test_nan_gradient_is_counted_and_survives_state_dict_deepcopy_and_pickle(name):
    ps = _params()
    opt = FACTORIES[name](_groups(ps))
    for t in range(2):
        _step(opt, ps, t)
    _step(opt, ps, 2, nan=0)
    scope = type(opt).counter_scope
    if scope == "optimizer":  # a whole-step skip: counted in every group
        assert all(c["nonfinite"] == 1 and c["steps"] == 2 for c in _all_counts(opt))
        assert opt.counters["nonfinite"] == 1 and opt.counters["steps"] == 2
    else:  # group 0 skipped alone, group 1 stepped
        assert _all_counts(opt)[0]["nonfinite"] == 1 and _all_counts(opt)[0]["steps"] == 2
        assert _all_counts(opt)[1]["nonfinite"] == 0 and _all_counts(opt)[1]["steps"] == 3
        assert opt.counters["nonfinite"] == 1 and opt.counters["steps"] == 5
    assert counters(opt) == opt.counters

    # state_dict -> bytes (weights_only, as torch.load does by default) -> a fresh optimizer
    sd = opt.state_dict()
    assert [g["counters"] for g in sd["param_groups"]] == _all_counts(opt)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh_opt = FACTORIES[name](_groups(qs))
    fresh_opt.load_state_dict(torch.load(buf, weights_only=True))
    assert _all_counts(fresh_opt) == _all_counts(opt)

    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for c in copies:
        assert _all_counts(c) == _all_counts(opt)
        assert dict(c.counters) == dict(opt.counters)

    # all of them keep stepping in lockstep and keep counting
    for t in range(3, 5):
        _step(opt, ps, t)
        _step(fresh_opt, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert _all_counts(fresh_opt) == _all_counts(opt)
    for c in copies:  # a copy holds its own parameters: it steps them and counts on its own
        cps = [p for g in c.param_groups for p in g["params"]]
        _step(c, cps, 3, nan=1)
        assert c.counters["nonfinite"] == 2
    assert opt.counters["nonfinite"] == 1


@pytest.mark.parametrize("name", FACTORIES)
def test_a_saved_state_dict_does_not_move_on_and_the_view_is_read_only(name):
    ps = _params()
    opt = FACTORIES[name](_groups(ps))
    _step(opt, ps, 0)
    sd = opt.state_dict()
    view = opt.counters
    _step(opt, ps, 1, nan=1)
    assert sd["param_groups"][0]["counters"]["nonfinite"] == 0  # a copy, not the live dict
    assert view["nonfinite"] == 1  # the view is live
    with pytest.raises(TypeError):
        view["nonfinite"] = 0  # type: ignore[index]
    opt.load_state_dict(sd)
    assert view["nonfinite"] == 0  # still live after load_state_dict replaced the groups


def test_learned_optimizer_saves_its_counters():
    """Fails if LearnedOptimizer's counts are not in its state_dict (they used to be an attribute)."""
    ps = _params()
    opt = LearnedOptimizer(ps, net=LinearUpdate(seed=3), compile=False)
    _step(opt, ps, 0)
    _step(opt, ps, 1, nan=0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["counters"] == {"steps": 1, "nonfinite": 1}
    other = LearnedOptimizer([p.detach().clone().requires_grad_() for p in ps], net=LinearUpdate(seed=3))
    assert other.counters["nonfinite"] == 0
    other.load_state_dict(sd)
    assert other.counters["nonfinite"] == 1 and other.counters["steps"] == 1


def test_a_group_added_later_counts_from_zero_and_group_zero_keeps_the_history():
    ps = _params()
    opt = Polyak([ps[0]])
    _step(opt, [ps[0]], 0, nan=0)
    opt.add_param_group({"params": [ps[1]]})
    assert opt.param_groups[1]["counters"] == fresh(("zero_grad", "at_target"))
    assert opt.param_groups[1]["polyak"] == {"eta": 0.0}
    _step(opt, ps, 1)
    assert _all_counts(opt) == [{"steps": 1, "nonfinite": 1, "zero_grad": 0, "at_target": 0},
                                {"steps": 1, "nonfinite": 0, "zero_grad": 0, "at_target": 0}]
    assert opt.counters["nonfinite"] == 1  # whole-optimizer: group 0's


# -- state dicts saved before the convention ----------------------------------------------------
def _legacy_and_expected(name: str, opt) -> tuple[dict, list[dict[str, int]]]:
    """``opt``'s state dict rewritten into the layout its class used before the counters
    convention, and the counts a load of it must show."""
    sd = copy.deepcopy(opt.state_dict())
    expect = []
    for g in sd["param_groups"]:
        c = g.pop("counters")
        if name.startswith("polyak"):
            g["polyak"] = {**c, "eta": g["polyak"]["eta"]}
            expect.append(c)
        elif name.startswith("complex"):
            g["skipped"] = c["nonfinite"]
            expect.append({"steps": 0, "nonfinite": c["nonfinite"]})  # no step count was kept
        elif name.endswith("-hd"):
            g["hd"] = dict(c)
            if "hd_prev_gsq" in g:
                g["hd"]["prev_gsq"] = g.pop("hd_prev_gsq")
            expect.append(c)
        else:  # LearnedOptimizer's counts were an attribute that state_dict did not save
            expect.append({"steps": 0, "nonfinite": 0})
    return sd, expect


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dicts_in_the_old_layouts_still_load(name):
    ps = _params()
    opt = FACTORIES[name](_groups(ps))
    for t in range(3):
        _step(opt, ps, t, nan=1 if t == 1 else None)
    legacy, expect = _legacy_and_expected(name, opt)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    loaded = FACTORIES[name](_groups(qs))
    loaded.load_state_dict(legacy)
    assert _all_counts(loaded) == expect
    assert not any(k in g for g in loaded.param_groups for k in ("skipped", "hd"))
    if name.startswith("polyak"):
        assert [g["polyak"] for g in loaded.param_groups] == [g["polyak"] for g in opt.param_groups]
    # the algorithm's own state came through the migration (HypergradientSGD's previous ||g||^2)
    for t in range(3, 6):
        _step(opt, ps, t)
        _step(loaded, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_helpers_take_plain_param_groups():
    groups = [{"params": []}, {"params": [], "counters": {"steps": 2}}]
    for g in groups:
        ensure(g, ("replays",))
    assert groups[1]["counters"] == {"steps": 2, "nonfinite": 0, "replays": 0}
    bump(groups, "replays")
    bump(groups[1:], "nonfinite", 3)
    assert read(groups) == {"steps": 0, "nonfinite": 0, "replays": 1}
    assert read(groups, "group") == {"steps": 2, "nonfinite": 3, "replays": 2}
    with pytest.raises(ValueError, match="scope"):
        read(groups, "tensor")
    shared = {"params": [], "counters": {"steps": 1, "nonfinite": 0}}
    before = shared["counters"]
    ensure(shared)
    assert shared["counters"] is not before  # never an alias of a dict someone else holds
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ensure(opt.param_groups[0])
    assert isinstance(counters(opt), CounterView) and counters(opt) == {"steps": 0, "nonfinite": 0}


# -- LearnedOptimizer's compiled kernel is per instance -------------------------------------------
class _FakeCompile:
    """Stands in for ``torch.compile``: the first ``fail`` kernels it builds raise when called
    (as a real one does when no C++ compiler is found); the others run the eager pass, counted."""

    def __init__(self, fail: int) -> None:
        self.fail, self.built, self.calls = fail, 0, 0

    def __call__(self, fn, **kwargs):
        self.built += 1
        if self.built <= self.fail:
            def broken(*args):
                raise RuntimeError("fake compiler failure")
            return broken

        def kernel(*args):
            self.calls += 1
            return fn(*args)
        return kernel


def _run_linear(opt, q, grads) -> torch.Tensor:
    for g in grads:
        q.grad = g.clone()
        opt.step()
    return q.detach().clone()


def test_a_failed_compile_falls_back_in_that_instance_only(monkeypatch):
    monkeypatch.setattr(learned_mod, "_COMPILED", None)  # no kernel from an earlier test in this process
    fake = _FakeCompile(fail=1)
    monkeypatch.setattr(torch, "compile", fake)
    net = LinearUpdate(seed=3)
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(1 << 16, generator=gen)  # large enough for the compiled pass
    grads = [torch.randn(1 << 16, generator=gen) for _ in range(3)]

    # the eager pass itself: the same function the compiled kernel is built from, run as it is
    eager_q = p0.clone().requires_grad_()
    eager_opt = LearnedOptimizer([eager_q], net=net)
    eager_opt._compile_failed = True  # what a failure leaves behind: the per-tensor eager pass
    want = _run_linear(eager_opt, eager_q, grads)

    qa = p0.clone().requires_grad_()
    a = LearnedOptimizer([qa], net=net)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got_a = _run_linear(a, qa, grads[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per instance, not per step
        got_a = _run_linear(a, qa, grads[1:])
    assert fake.built == 1 and a._compile_failed
    assert torch.equal(got_a, want)  # the fallback's numbers are the eager pass's
    assert learned_mod._COMPILED is None  # a failure is not cached for the process

    qb = p0.clone().requires_grad_()
    b = LearnedOptimizer([qb], net=net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_b = _run_linear(b, qb, grads)
    assert fake.built == 2 and fake.calls == 3 and not b._compile_failed  # b compiled anew and used it
    assert torch.equal(got_b, want)
    assert learned_mod._COMPILED is not None  # b's kernel worked: cached for the process

    qc = p0.clone().requires_grad_()
    c = LearnedOptimizer([qc], net=net)
    _run_linear(c, qc, grads)
    assert fake.built == 2 and fake.calls == 6  # the cached success, not a new compile

    assert torch.equal(_run_linear(a, qa, grads[:1]), _run_linear(eager_opt, eager_q, grads[:1]))
    assert fake.calls == 6  # a stays eager


def test_a_compile_that_raises_at_build_time_falls_back_too(monkeypatch):
    monkeypatch.setattr(learned_mod, "_COMPILED", None)

    def no_compile(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", no_compile)
    q = torch.ones(1 << 16, requires_grad=True)
    opt = LearnedOptimizer([q], net=LinearUpdate(seed=3))
    with pytest.warns(RuntimeWarning, match="not supported here"):
        _run_linear(opt, q, [torch.full_like(q, 0.5)])
    assert opt._compile_failed and torch.isfinite(q).all()
    strict = LearnedOptimizer([q], net=LinearUpdate(seed=3), compile=True)
    with pytest.raises(RuntimeError, match="not supported here"):
        _run_linear(strict, q, [torch.full_like(q, 0.5)])
