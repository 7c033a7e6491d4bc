"""Learned optimizers: update networks, the optimizer's fast paths against the reference update,
weight files and their errors, and a smoke meta-training run."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from nestopt.meta import (CoordinateLSTM, DirectUpdateMLP, GradientAttention, HybridAdamNet, LinearUpdate, MetaConfig,
                          meta_train)
from nestopt.nets import SHIPPED, SHIPPED_NETS, load_net, save_net
from nestopt.optim import LearnedOptimizer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)


def _hybrid_trained() -> HybridAdamNet:
    net = HybridAdamNet()
    with torch.no_grad():  # a network whose step scale varies with its inputs
        torch.manual_seed(3)
        net.net[-1].weight.normal_(0, 0.5)
        net.net[-1].bias.fill_(0.3)
    return net


NETS = {"hybrid": _hybrid_trained, "mlp": DirectUpdateMLP, "mlp-seed": lambda: DirectUpdateMLP("seed"),
        "linear": lambda: LinearUpdate(seed=3), "lstm": CoordinateLSTM, "attention": GradientAttention}


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("chunk", [7, 1 << 15])
def test_optimizer_matches_the_reference_update(kind, chunk):
    """The fast paths (fused AdamW kernel per tensor; chunked MLP) against ``net.update``."""
    x, y = _data()
    net = NETS[kind]()
    a, b = _mlp(), _mlp()
    opt = LearnedOptimizer(a.parameters(), net=net, chunk=chunk)
    states = {p: net.init_state(p) for p in b.parameters()}
    for t in range(1, 16):
        for m in (a, b):
            for p in m.parameters():
                p.grad = None
            nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p in b.parameters():
                delta, states[p] = net.update(p, p.grad, states[p], t)
                p.add_(delta)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_untrained_hybrid_is_adam():
    x, y = _data()
    a, b = _mlp(), _mlp()
    opt = LearnedOptimizer(a.parameters(), net=HybridAdamNet(base_lr=1e-2))
    ref = torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(10):
        for o, m in ((opt, a), (ref, b)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hybrid", "linear"])
def test_state_dict_round_trip_and_nonfinite_skip(kind):
    x, y = _data()
    a, b = _mlp(), _mlp()
    net = NETS[kind]()
    oa, ob = LearnedOptimizer(a.parameters(), net=net), LearnedOptimizer(b.parameters(), net=net)

    def step(o, m):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(4):
        step(oa, a)
        step(ob, b)
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    oc = LearnedOptimizer(b.parameters(), net=net)
    oc.load_state_dict(torch.load(buf))
    for _ in range(4):
        step(oa, a)
        step(oc, b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in a.parameters()]
    oa.zero_grad()
    nn.functional.mse_loss(a(x), y).backward()
    next(a.parameters()).grad.view(-1)[0] = float("nan")
    oa.step()
    assert oa.counters["nonfinite"] == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_weight_files_round_trip_and_fail_loudly(tmp_path):
    net = _hybrid_trained()
    path = save_net(net, tmp_path / "n.safetensors")
    back = load_net(path)
    assert back.config() == net.config()
    for (k, v), (_, w) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="no such file"):
        load_net(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_net(bad)
    # a file whose tensors do not fit its configuration
    from safetensors.torch import save_file

    tensors = {k: v for k, v in net.state_dict().items()}
    tensors["net.0.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "mismatch.safetensors"),
              metadata={"format": "nestopt-update-net/1", "config": json.dumps(net.config()), "meta": "{}"})
    with pytest.raises(ValueError, match="does not match"):
        load_net(tmp_path / "mismatch.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="format"):
        load_net(tmp_path / "other.safetensors")


def _reference_linear(net: LinearUpdate, p0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float):
    p, st = p0.clone(), net.init_state(p0)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * net.step_mult * wd)  # decoupled decay, then the network's update
        delta, st = net.update(p, g, st, t)
        p = p + lr * delta
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_network_with_lr_and_weight_decay_matches_its_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    net = LinearUpdate(seed=3).to(dtype)
    for shape in [(30, 40), (7,)]:
        p0 = torch.randn(shape, generator=gen, dtype=dtype)
        grads = [torch.randn(shape, generator=gen, dtype=dtype) * 10.0**i for i in range(-2, 4)]
        want = _reference_linear(net, p0, grads, lr=2.0, wd=0.1)
        q = p0.clone().requires_grad_()
        opt = LearnedOptimizer([q], net=net, lr=2.0, weight_decay=0.1, compile=False)
        for g in grads:
            q.grad = g.clone()
            opt.step()
        torch.testing.assert_close(q.detach(), want, **({} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}))
        assert not torch.equal(q.detach(), p0)


def _compiles() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _compiles(), reason="torch.compile cannot build kernels on this machine")
def test_linear_network_compiled_pass_matches_the_eager_one():
    """Large tensors take the torch.compile'd fused pass by default (compile=None)."""
    gen = torch.Generator().manual_seed(1)
    net = LinearUpdate(seed=3)
    p0 = torch.randn(1 << 16, generator=gen)
    grads = [torch.randn(1 << 16, generator=gen) for _ in range(3)]
    ends = []
    for compile_ in (None, False):
        q = p0.clone().requires_grad_()
        opt = LearnedOptimizer([q], net=net, weight_decay=0.1, compile=compile_)
        for g in grads:
            q.grad = g.clone()
            opt.step()
        ends.append(q.detach())
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ends[1], _reference_linear(net, p0, grads, 1.0, 0.1))
    with pytest.raises(ValueError, match="compile="):
        LearnedOptimizer([q], net=net, compile="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in this checkout")
@pytest.mark.parametrize("name, kind", [("default", LinearUpdate), ("mlp", DirectUpdateMLP)])
def test_shipped_networks_load_by_name_and_train(name, kind):
    x, y = _data()
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), net=name)
    assert isinstance(opt.net, kind)
    assert SHIPPED_NETS[name].is_file()
    start = float(nn.functional.mse_loss(model(x), y).detach())
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert float(nn.functional.mse_loss(model(x), y).detach()) < 0.7 * start


def test_meta_training_improves_the_meta_loss_and_resumes_exactly(tmp_path):
    cfg = MetaConfig(families=("quadratic",), unroll=5, horizon=20, outer_steps=40, outer_lr=3e-2,
                     checkpoint_every=20, seed=1)
    net = HybridAdamNet()
    hist = meta_train(copy.deepcopy(net), cfg)
    first = sum(h["meta_loss"] for h in hist[:8]) / 8
    last = sum(h["meta_loss"] for h in hist[-8:]) / 8
    assert last < first, (first, last)
    # interrupted at 20 and resumed: the same network as one uninterrupted run
    full = copy.deepcopy(net)
    meta_train(full, cfg)
    part = copy.deepcopy(net)
    meta_train(part, MetaConfig(**{**cfg.__dict__, "outer_steps": 20}), checkpoint=tmp_path / "c.pt")
    resumed = copy.deepcopy(net)
    meta_train(resumed, cfg, checkpoint=tmp_path / "c.pt", resume=True)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="net="):
        LearnedOptimizer(_mlp().parameters(), net=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        LearnedOptimizer(_mlp().parameters(), net=HybridAdamNet(), lr=-1.0)
    with pytest.raises(ValueError, match="features"):
        DirectUpdateMLP("raw")
    with pytest.raises(KeyError, match="valid"):
        MetaConfig(families=("nope",)).check()


def test_study_and_meta_train_command_end_to_end(tmp_path):
    import subprocess
    import sys

    from nestopt.studies.learned import run_study

    out = tmp_path / "meta"
    proc = subprocess.run([sys.executable, "-m", "nestopt.cli", "meta-train", "--net", "hybrid", "--steps", "6",
                           "--unroll", "2", "--horizon", "4", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    net_file = out / "net.safetensors"
    assert isinstance(load_net(net_file), HybridAdamNet)
    from safetensors import safe_open

    with safe_open(str(net_file), "pt") as f:  # the file names the command that reproduces it
        assert json.loads(f.metadata()["meta"])["command"] == \
            "nestopt meta-train --net hybrid --steps 6 --unroll 2 --horizon 4 --out DIR"
    doc = run_study(tmp_path / "study", nets={"tiny": str(net_file), "sgd (defaults)": "peer:sgd"}, workers=1,
                    held_out=(("digits-mlp", 101),), seeds=1, long=None)
    assert [r["net"] for r in doc["rows"]] == ["tiny", "sgd (defaults)"]
    from nestopt.bench import registry
    from nestopt.studies.learned import _make

    peer = _make("peer:sgd", [torch.zeros(2, requires_grad=True)], 1.0)  # untuned: its own default rate
    assert peer.param_groups[0]["lr"] == registry.get("sgd").default_lr != 1.0
    proc = subprocess.run([sys.executable, "-m", "nestopt.cli", "study", "learned", "--peer", "nope", "--out",
                           str(tmp_path / "bad")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--peer 'nope' is invalid" in proc.stderr
    report = (tmp_path / "study" / "report.md").read_text()
    assert "| task | steps | net |" in report and "Acceptance" in report
    assert "**sgd (defaults)**" in report and "a reference, not a candidate" in report
    assert (tmp_path / "study" / "heldout_curves.png").stat().st_size > 1000
    assert (tmp_path / "study" / "meta_training.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", NETS)
def test_every_network_round_trips_through_its_file(kind, tmp_path):
    net = NETS[kind]()
    back = load_net(save_net(net, tmp_path / "n.safetensors"))
    assert type(back) is type(net) and back.config() == net.config()
    p = torch.randn(3, 4)
    g = torch.randn(3, 4)
    state = net.init_state(p)
    d1, _ = net.update(p, g, state, 1)
    d2, _ = back.update(p, g, back.init_state(p), 1)
    assert d1.shape == p.shape and torch.equal(d1, d2)


def test_surrogate_training_reduces_the_surrogate_loss():
    net = DirectUpdateMLP()
    hist = meta_train(net, MetaConfig(families=("quadratic",), unroll=5, horizon=20, outer_steps=30, method="surrogate",
                                      outer_lr=1e-2))
    assert sum(h["meta_loss"] for h in hist[-5:]) < sum(h["meta_loss"] for h in hist[:5])


def test_es_estimate_points_along_the_backpropagated_meta_gradient():
    """Antithetic ES on one truncation against the exact (first-order) meta-gradient of the same
    unroll, same batches: 64 pairs for ~100 meta-parameters should agree in direction."""
    from nestopt.meta.train import _Inner, es_gradient

    net = HybridAdamNet()
    with torch.no_grad():
        torch.manual_seed(0)
        net.net[-1].weight.normal_(0, 0.3)
    inner = _Inner(net, "quadratic", seed=3)
    batches = inner.draw(10)
    snap = inner.snapshot()
    meta_loss, _ = inner.unroll(net, 10, False, batches)
    exact = torch.autograd.grad(meta_loss, list(net.parameters()), allow_unused=True)
    exact = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(net.parameters(), exact)])
    inner.restore(snap)
    before = [p.detach().clone() for p in net.parameters()]
    est = es_gradient(inner, net, 10, 0.01, 64, torch.Generator().manual_seed(0), batches)
    assert float(exact @ est / (exact.norm() * est.norm())) > 0.3
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before)), "ES must leave the network as it was"
    assert inner.t == snap[2]


def test_es_meta_training_runs_and_improves():
    net = HybridAdamNet()
    hist = meta_train(net, MetaConfig(families=("quadratic",), unroll=5, horizon=20, outer_steps=30, method="es",
                                      es_pairs=4, outer_lr=3e-2, seed=2))
    assert len(hist) == 30 and not any(h["skipped"] for h in hist)


def test_persistent_es_summed_over_a_run_matches_the_runs_meta_gradient():
    """PES carries each pair's perturbation sum across truncations; summed over one task's run its
    estimate is unbiased for the gradient of the run's total meta-loss (all truncations with the
    same Phi). Checked against central finite differences of that total (14 meta-parameters)."""
    from nestopt.meta import PersistentES
    from nestopt.meta.train import _Inner

    torch.manual_seed(0)
    net = HybridAdamNet(hidden=2)
    with torch.no_grad():
        net.net[-1].weight.normal_(0, 0.5)
        net.net[0].weight.normal_(0, 0.5)
    params = list(net.parameters())
    flat0 = torch.nn.utils.parameters_to_vector(params).detach().clone()

    def total(flat):
        torch.nn.utils.vector_to_parameters(flat, params)
        inner, out = _Inner(net, "quadratic", 3), 0.0
        for _ in range(10):  # ten one-step truncations
            meta_loss, _ = inner.unroll(net, 1, False, inner.draw(1))
            out += float(meta_loss.detach())
        torch.nn.utils.vector_to_parameters(flat0, params)
        return out

    fd = torch.stack([torch.tensor((total(flat0 + 1e-3 * e) - total(flat0 - 1e-3 * e)) / 2e-3)
                      for e in torch.eye(flat0.numel())])
    pes = PersistentES(net, "quadratic", 3, pairs=64)
    gen, est = torch.Generator().manual_seed(0), torch.zeros_like(flat0)
    for _ in range(10):
        grad, _, _ = pes.step(net, 1, 0.01, gen)
        est += grad
    assert pes.t == 10
    assert torch.equal(torch.nn.utils.parameters_to_vector(params), flat0), "PES must leave the network as it was"
    assert float(est @ fd / (est.norm() * fd.norm())) > 0.9


def test_pes_meta_training_is_the_same_over_two_worker_processes():
    cfg = MetaConfig(families=("quadratic",), unroll=5, horizon=10, outer_steps=4, method="pes", es_pairs=2,
                     outer_lr=3e-2, seed=2)
    one = HybridAdamNet()
    two = copy.deepcopy(one)
    h1 = meta_train(one, cfg)
    h2 = meta_train(two, MetaConfig(**{**cfg.__dict__, "workers": 2}))
    assert [h["meta_loss"] for h in h1] == [h["meta_loss"] for h in h2]
    assert not any(h["skipped"] for h in h1)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="workers"):
        MetaConfig(workers=0).check()


def _meta_controller():
    from nestopt.nets import Controller
    from nestopt.optim.nested import DEFAULT_FEATURES, FEATURES

    return Controller(sum(FEATURES[f] for f in DEFAULT_FEATURES), hidden=8, features=DEFAULT_FEATURES)


def test_controller_runs_replay_exactly_and_keep_the_weights_set_now():
    from nestopt.meta.train import make_inner

    ctl = _meta_controller()
    with torch.no_grad():
        ctl.net[-1].weight.normal_(0, 0.5)
    inner = make_inner(ctl, "teacher-mlp", 4)
    assert 1e-4 <= inner.lr <= 1.0
    snap = inner.snapshot()
    batches = inner.draw(6)
    first, _ = inner.unroll(ctl, 6, False, batches)
    inner.restore(snap)
    again, _ = inner.unroll(ctl, 6, False, batches)
    assert float(first) == float(again)
    flat = torch.nn.utils.parameters_to_vector(list(ctl.parameters())).detach()
    torch.nn.utils.vector_to_parameters(flat * 3, list(ctl.parameters()))  # new storage, as ES sets it
    inner.restore(snap)
    assert torch.equal(torch.nn.utils.parameters_to_vector(list(ctl.parameters())), flat * 3)
    other, _ = inner.unroll(ctl, 6, False, batches)
    assert float(other) != float(first)  # the run sees the weights set now, not stale cached ones
    x = torch.randn(3, ctl.n_features, dtype=torch.float64)
    z, _ = ctl.forward_numpy(x.numpy())
    torch.testing.assert_close(torch.from_numpy(z).float(), ctl(x.float())[0].detach(), rtol=1e-5, atol=1e-6)


def test_controller_meta_training_writes_a_file_the_nested_optimizer_loads(tmp_path):
    from nestopt.optim import NestedOptimizer
    from nestopt.nets import Controller

    ctl = _meta_controller()
    with pytest.raises(ValueError, match="es' or 'pes"):
        meta_train(ctl, MetaConfig(families=("quadratic",), unroll=2, horizon=4, outer_steps=1))
    hist = meta_train(ctl, MetaConfig(families=("teacher-mlp",), unroll=3, horizon=6, outer_steps=3, method="pes",
                                      es_pairs=2, seed=1))
    assert len(hist) == 3 and not any(h["skipped"] for h in hist)
    path = save_net(ctl, tmp_path / "ctl.safetensors")
    model = _mlp()
    opt = NestedOptimizer(model.parameters(), signal="frozen", controller=path, lr=1e-3)
    assert isinstance(opt.controller, Controller) and opt.features_on == ctl.features
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="made for"):
        NestedOptimizer(model.parameters(), signal="frozen", controller=path, features=("grad_norm",))
    with pytest.raises(ValueError, match="not an update network"):
        LearnedOptimizer(model.parameters(), net=path)
