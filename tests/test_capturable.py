"""The capturable step (``capturable=True``) of Polyak, PolyakAdam and the nested optimizer, and
the machinery every nestopt optimizer shares for it (:mod:`nestopt.optim.base`,
:mod:`nestopt.optim.counters`): no host read in the step, the same results as the host step
(bitwise for Polyak, whose arithmetic is the same; to float32 rounding for the nested optimizer,
whose controller runs in torch instead of NumPy), skipped steps masked on the device, counts and
device values written back when read, state dicts, copies and pickles. The hypergradient,
complex and learned optimizers' capturable steps have their own files."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from _helpers import HostReads

from nestopt.nets import Controller, HybridAdamNet
from nestopt.optim import (ComplexMomentum, HypergradientAdam, LearnedOptimizer, NestedOptimizer, Polyak,
                           PolyakAdam)
from nestopt.optim.counters import outcome
from nestopt.optim.nested import DEFAULT_FEATURES, FEATURES

BAD = {10: float("nan"), 37: float("inf"), 61: float("-inf")}  # steps whose gradient holds a non-finite value

POLYAK = {
    "global": lambda ps: Polyak(ps),
    "f_star": lambda ps: Polyak(ps, f_star=0.5),  # reaches its target: at_target skips
    "max_lr": lambda ps: Polyak(ps, max_lr=0.05, eps=1e-8),
    "tensor-momentum": lambda ps: Polyak(ps, scope="tensor", momentum=0.5),
    "group-equal": lambda ps: Polyak(ps, scope="group", share="equal"),
    "group-global-momentum": lambda ps: Polyak(ps, scope="group", share="global", momentum=0.9),
    "tensor-whole": lambda ps: Polyak(ps, scope="tensor", share="whole", max_lr=1.0),
    "rms": lambda ps: Polyak(ps, precondition="rms"),
    "rms-tensor-momentum": lambda ps: Polyak(ps, precondition="rms", scope="tensor", momentum=0.3),
    "callable": lambda ps: Polyak(ps, precondition=lambda p: 1.0 + p.detach().abs()),
    "adam": lambda ps: PolyakAdam(ps),
    "adam-tensor": lambda ps: PolyakAdam(ps, scope="tensor"),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)


def _train(make, capturable, steps=100, model=None, opt=None, start=0, count_reads=True):
    """``steps`` steps (non-finite gradients at the steps of ``BAD``); the host reads that the first
    three, the skipped and the last of them made (every step runs the same code, a skipped one
    aside: the counting mode costs a Python call per torch operation)."""
    model = model if model is not None else _model()
    opt = opt if opt is not None else make(_groups(model))
    opt.capturable = capturable
    x, y = _data()
    reads: list[str] = []
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if t in BAD:
            model[0].weight.grad[1, 2] = BAD[t]
        if count_reads and (t < start + 3 or t in BAD or t == start + steps - 1):  # (the mode slows a step 10x)
            with HostReads() as h:
                opt.step(loss=loss)
            reads += h.where
        else:
            opt.step(loss=loss)
    return model, opt, reads


@pytest.mark.parametrize("name", list(POLYAK))
def test_polyak_capturable_step_reads_nothing_and_equals_the_host_step_bitwise(name):
    host_model, host_opt, _ = _train(POLYAK[name], False, count_reads=False)
    dev_model, dev_opt, reads = _train(POLYAK[name], True)
    assert reads == [], f"{name}: the capturable step read the host: {reads[:5]}"
    for a, b in zip(host_model.parameters(), dev_model.parameters()):
        assert torch.equal(a, b), f"{name}: the capturable step's parameters differ from the host step's"
    assert dict(dev_opt.counters) == dict(host_opt.counters)
    assert dev_opt.counters["nonfinite"] >= len(BAD)  # the injected gradients were skipped
    dev_opt.sync_host()
    for gh, gd in zip(host_opt.param_groups, dev_opt.param_groups):
        assert gd["polyak"]["eta"] == gh["polyak"]["eta"]
        assert gd["counters"] == gh["counters"]
    for ph, pd in zip(host_model.parameters(), dev_model.parameters()):
        sh, sd = host_opt.state[ph], dev_opt.state[pd]
        assert sorted(sh) == sorted(sd)
        for k in sh:
            assert torch.equal(torch.as_tensor(sh[k]), torch.as_tensor(sd[k]).cpu()), f"{name}: state[{k!r}] differs"


def test_a_skipped_capturable_step_leaves_everything_bitwise_as_it_was():
    model, opt, _ = _train(POLYAK["rms-tensor-momentum"], True, steps=5, count_reads=False)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() if torch.is_tensor(v) else v for st in opt.state.values() for k, v in st.items()}
    opt.zero_grad()
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    model[2].bias.grad[0] = float("nan")
    with HostReads() as h:
        opt.step(loss=torch.tensor(1.0))
    assert h.n == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = {k: v for st in opt.state.values() for k, v in st.items()}
    assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(v)) for k, v in state.items())
    assert opt.counters["nonfinite"] == 1


def test_counts_wait_on_the_device_until_they_are_read():
    model, opt, _ = _train(POLYAK["global"], True, steps=12, count_reads=False)
    # the groups' own ints lag behind: the counts are on the device until someone reads them
    assert opt.param_groups[0]["counters"]["steps"] == 0
    assert opt.counters["steps"] == 11 and opt.counters["nonfinite"] == 1  # step 10 had a NaN
    assert opt.param_groups[0]["counters"]["steps"] == 11
    tel = opt.telemetry()
    assert tel["steps/0"] if "steps/0" in tel else tel["steps"] == 11.0
    assert tel["eta/1"] == opt.param_groups[1]["polyak"]["eta"] > 0


def test_capturable_state_dict_round_trips_bitwise_and_loads_into_the_host_step():
    model_a, opt_a, _ = _train(POLYAK["adam-tensor"], True, steps=20, count_reads=False)
    model_b = copy.deepcopy(model_a)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    for capturable in (True, False):
        buf.seek(0)
        m = copy.deepcopy(model_b)
        opt = POLYAK["adam-tensor"](_groups(m))
        opt.load_state_dict(torch.load(buf, weights_only=True))
        opt.capturable = capturable
        _train(None, capturable, steps=15, model=m, opt=opt, start=20, count_reads=False)
        if capturable:
            ref_model = m
            ref_counts = dict(opt.counters)
        else:
            assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref_model.parameters()))
            assert dict(opt.counters) == ref_counts
    _train(None, True, steps=15, model=model_a, opt=opt_a, start=20, count_reads=False)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_capturable_optimizer_carries_its_device_values(how):
    model, opt, _ = _train(POLYAK["rms"], True, steps=12, count_reads=False)
    pair = {"m": model, "o": opt}
    both = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    m2, opt2 = both["m"], both["o"]
    assert opt2.capturable is True
    assert dict(opt2.counters) == dict(opt.counters)
    _train(None, True, steps=10, model=model, opt=opt, start=12, count_reads=False)
    _train(None, True, steps=10, model=m2, opt=opt2, start=12, count_reads=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_switching_paths_mid_run_gives_the_same_run():
    ref, ref_opt, _ = _train(POLYAK["group-global-momentum"], False, count_reads=False)
    model = _model()
    opt = POLYAK["group-global-momentum"](_groups(model))
    for k in range(5):  # 20 steps each, alternating
        _train(None, k % 2 == 0, steps=20, model=model, opt=opt, start=20 * k, count_reads=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert dict(opt.counters) == dict(ref_opt.counters)


def test_capturable_defaults_to_the_host_step_on_the_cpu_and_checks_its_value():
    opt = Polyak(_model().parameters())
    assert opt.capturable is None and not opt.on_device()
    with pytest.raises(ValueError, match=r"capturable=1 is invalid: expected None \(on for CUDA parameters\), True or False"):
        opt.capturable = 1
    with pytest.raises(ValueError, match="capturable=True is invalid with precondition='hutchinson'"):
        Polyak(_model().parameters(), precondition="hutchinson", capturable=True)


def test_outcome_takes_the_first_condition_that_holds():
    t, f = torch.tensor(True), torch.tensor(False)
    keys = ("steps", "nonfinite", "zero_grad")
    assert outcome(keys, [("nonfinite", f), ("zero_grad", t), ("nonfinite", t)], "steps").tolist() == [0, 0, 1]
    assert outcome(keys, [("nonfinite", t), ("zero_grad", t)], "steps").tolist() == [0, 1, 0]
    assert outcome(keys, [("nonfinite", f), ("zero_grad", f)], "steps").tolist() == [1, 0, 0]


def test_polyak_capturable_step_compiles_without_a_graph_break():
    """``torch.compile(opt.step, fullgraph=True)`` after one eager step (which makes the device
    state, as torch's CUDA-graph recipe's warm-up does): no graph break, the same counts, and the
    parameters of the eager capturable step to float32 rounding (inductor fuses the arithmetic)."""
    results = []
    for compiled in (False, True):
        model = _model()
        opt = Polyak(model.parameters(), momentum=0.5, capturable=True)
        x, y = _data()

        def one(step, t):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if t == 3:
                model[0].weight.grad[0, 0] = float("nan")
            step(loss=loss)

        one(opt.step, 0)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for t in range(1, 6):
            one(step, t)
        results.append(([p.detach().clone() for p in model.parameters()], dict(opt.counters)))
    (eager, counts), (comp, counts_c) = results
    assert counts_c == counts == {"steps": 5, "nonfinite": 1, "zero_grad": 0, "at_target": 0}
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


COMPILED = {  # the capturable steps that swap a fused kernel (no meta kernel) for fused selects under compile
    "adamw-hd": lambda ps: HypergradientAdam(ps, lr=1e-2, capturable=True),
    "complex-momentum": lambda ps: ComplexMomentum(ps, lr=0.01, capturable=True),
    "learned-hybrid": lambda ps: LearnedOptimizer(ps, net=HybridAdamNet(), capturable=True),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_other_capturable_steps_compile_without_a_graph_break(name):
    results = []
    for compiled in (False, True):
        model = _model()
        opt = COMPILED[name](model.parameters())
        x, y = _data()

        def one(step, t):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if t == 2:
                model[2].weight.grad[0, 0] = float("inf")
            step()

        one(opt.step, 0)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for t in range(1, 4):
            one(step, t)
        results.append(([p.detach().clone() for p in model.parameters()], dict(opt.counters)))
    (eager, counts), (comp, counts_c) = results
    assert counts_c == counts and counts["nonfinite"] == 1
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- the nested optimizer ---------------------------------------------------------------------------
def _controller(n_features: int, scratchpad: int = 0) -> Controller:
    ctrl = Controller(n_features, 16, scratchpad, seed=3)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return ctrl


NESTED_FEATURES = {"default": list(DEFAULT_FEATURES), "all": [*DEFAULT_FEATURES, "mult"]}


def _nested(features="default", scratchpad=0):
    feats = NESTED_FEATURES[features]
    n = sum(FEATURES[f] for f in feats)

    def make(groups):
        return NestedOptimizer([p for g in groups for p in g["params"]], torch.optim.AdamW, lr=1e-2, fused=True,
                               weight_decay=0.01, signal="frozen", features=feats, per_tensor_groups=True,
                               controller=_controller(n, scratchpad), scratchpad=scratchpad, stats_every=4)
    return make


@pytest.mark.parametrize("features,scratchpad", [("default", 0), ("all", 2)])
def test_nested_capturable_step_reads_nothing_and_follows_the_host_step(features, scratchpad):
    """The controller runs in torch's float64 instead of NumPy's, so the multipliers differ in their
    last bits, and a multiplier's last bit flips a float32 rate's: one ulp at the first step, which
    training then carries along. The measure of "to float32 rounding" over 100 steps is therefore
    what one ulp does: a host run started from parameters one ulp away drifts as far."""
    make = _nested(features, scratchpad)
    host_model, host_opt, _ = _train(make, False, count_reads=False)
    dev_model, dev_opt, reads = _train(make, True)
    assert reads == [], f"the nested capturable step read the host: {reads[:5]}"
    nudged = _model()
    with torch.no_grad():
        w = nudged[0].weight
        w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))  # every element one ulp up
    nudged, _, _ = _train(make, False, model=nudged, count_reads=False)
    ulp = max(float((a - b).detach().abs().max()) for a, b in zip(host_model.parameters(), nudged.parameters()))
    drift = max(float((a - b).detach().abs().max()) for a, b in zip(host_model.parameters(), dev_model.parameters()))
    assert 0 < drift <= 3 * ulp + 1e-6, f"the capturable step drifted {drift:.2e} from the host's; one ulp: {ulp:.2e}"
    assert dict(dev_opt.counters) == dict(host_opt.counters)
    assert dev_opt.counters["nonfinite"] == len(BAD)
    # the multipliers moved (the controller is not the zero map) and agree with the host's
    assert max(abs(m - 1.0) for m in host_opt.multipliers()) > 0.05
    # (after 100 steps of that drift: the same values to a few parts in 10^4)
    assert dev_opt.multipliers() == pytest.approx(host_opt.multipliers(), rel=1e-3)
    assert dev_opt.feature_table().keys() == host_opt.feature_table().keys()
    for k, v in host_opt.feature_table().items():
        assert dev_opt.feature_table()[k] == pytest.approx(v, rel=1e-3, abs=1e-3), k
    assert dev_opt.loss_tracker.ema == pytest.approx(host_opt.loss_tracker.ema, rel=1e-4)


def test_nested_capturable_state_dict_round_trips_bitwise():
    make = _nested("all", 2)
    model_a, opt_a, _ = _train(make, True, steps=30, count_reads=False)
    model_b = copy.deepcopy(model_a)
    sd = opt_a.state_dict()
    opt_b = make(_groups(model_b))
    opt_b.load_state_dict(copy.deepcopy(sd))
    _train(None, True, steps=20, model=model_a, opt=opt_a, start=30, count_reads=False)
    _train(None, True, steps=20, model=model_b, opt=opt_b, start=30, count_reads=False)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert dict(opt_a.counters) == dict(opt_b.counters)
    assert opt_a.multipliers() == opt_b.multipliers()


def test_nested_capturable_step_refuses_what_it_cannot_run():
    ps = list(_model().parameters())
    with pytest.raises(ValueError, match="only signal='frozen' runs on the device"):
        NestedOptimizer(ps, torch.optim.AdamW, fused=True, capturable=True)
    with pytest.raises(ValueError, match=r"features \['curvature'\]"):
        NestedOptimizer(ps, torch.optim.AdamW, fused=True, signal="frozen", features=[*DEFAULT_FEATURES, "curvature"],
                        capturable=True)
    with pytest.raises(ValueError, match="without fused=True"):
        NestedOptimizer(ps, torch.optim.AdamW, signal="frozen", capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_graph_captures_a_training_step_with_polyak_and_matches_the_uncaptured_one():
    """torch's recipe for ``capturable`` optimizers: warm up on a side stream, capture forward,
    backward and step in a graph, replay it; the replayed run equals the eager one."""
    dev = torch.device("cuda")
    results = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1)).to(dev)
        opt = Polyak(model.parameters(), momentum=0.5)
        assert opt.on_device()
        x, y = torch.randn(128, 64, device=dev), torch.randn(128, 1, device=dev)

        def train_step():
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                train_step()
        torch.cuda.current_stream().wait_stream(s)
        if captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                train_step()
            for _ in range(20):
                graph.replay()
        else:
            for _ in range(20):
                train_step()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in model.parameters()], dict(opt.counters)))
    (eager, counts), (graphed, counts_g) = results
    assert counts_g == counts
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_capturable_step_synchronises_a_cuda_device():
    """On a GPU, torch's own sync detector (``torch.cuda.set_sync_debug_mode("error")``) raises on
    any operation that waits for the device: every nestopt optimizer's capturable step runs under
    it after a warm-up step (which makes the device state)."""
    import test_conformance

    dev = torch.device("cuda")
    for spec in [s for s in test_conformance.SPECS if s.name.endswith("[capturable]")]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(dev)
        opt = spec.make_for(model, lr=spec.conformance_lr or spec.default_lr)
        x, y = torch.randn(64, 8, device=dev), torch.randn(64, 1, device=dev)
        for t in range(4):
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.cuda.synchronize()
            if t:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step(loss=loss) if spec.needs_loss else opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert opt.counters["steps"] == 4, spec.name
