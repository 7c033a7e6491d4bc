"""MuonAdamW (torch's Muon on the hidden matrices, AdamW on the rest), its split rule, and the
peers' place in the bench (entries, suites, determinism)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from nestopt.bench import registry
from nestopt.bench.runner import Job, run_job
from nestopt.bench.scoring import entries_of
from nestopt.bench.suites import SUITES, plan
from nestopt.optim.muon import MuonAdamW, muon_param_groups, split_names


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(12, 8)
        self.pos_embed = nn.Parameter(torch.randn(5, 8))
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos_embed
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h, _ = self.gru(h)
        return self.out(self.norm(torch.relu(self.hidden(h[:, -1]))))


def test_the_split_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    torch.manual_seed(0)
    names = split_names(Net())
    assert names["muon"] == ["gru.weight_ih_l0", "gru.weight_hh_l0", "hidden.weight"]
    assert set(names["adamw"]) == {"tok.weight", "pos_embed", "conv.weight", "conv.bias", "gru.bias_ih_l0",
                                   "gru.bias_hh_l0", "hidden.bias", "norm.weight", "norm.bias", "out.weight",
                                   "out.bias"}
    # head=None: the last linear layer joins Muon; a named head is kept off it
    assert "out.weight" in split_names(Net(), head=None)["muon"]
    named = split_names(Net(), head="hidden")
    assert "hidden.weight" in named["adamw"] and "out.weight" in named["muon"]
    with pytest.raises(ValueError, match="head='lm_head' is invalid"):
        split_names(Net(), head="lm_head")
    with pytest.raises(TypeError, match="model="):
        split_names([torch.zeros(2, 2)])


def test_a_head_tied_to_the_embedding_stays_on_adamw():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

    names = split_names(Tied(), head=None)
    assert names == {"muon": ["mid.weight"], "adamw": ["emb.weight", "mid.bias"]}
    groups = muon_param_groups(Tied(), head=None, lr=0.1)
    assert [g["muon"] for g in groups] == [True, False] and all(g["lr"] == 0.1 for g in groups)


def _pair(fused: bool):
    torch.manual_seed(1)
    net = Net()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ours = MuonAdamW(muon_param_groups(a), lr=3e-3, weight_decay=0.02, fused=fused)
    g = muon_param_groups(b)
    theirs = [torch.optim.Muon(g[0]["params"], lr=3e-3, weight_decay=0.02, adjust_lr_fn="match_rms_adamw"),
              torch.optim.AdamW(g[1]["params"], lr=3e-3, weight_decay=0.02, fused=fused or None)]
    return a, b, ours, theirs


@pytest.mark.parametrize("fused", [False, True])
def test_it_steps_bitwise_as_torch_muon_plus_torch_adamw(fused):
    a, b, ours, theirs = _pair(fused)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        x, y = torch.randint(0, 12, (16, 5), generator=gen), torch.randn(16, 3, generator=gen)
        ours.zero_grad()
        nn.functional.mse_loss(a(x), y).backward()
        ours.step()
        for o in theirs:
            o.zero_grad()
        nn.functional.mse_loss(b(x), y).backward()
        for o in theirs:
            o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    muon_state = ours.state[a.hidden.weight]
    assert set(muon_state) == {"momentum_buffer"}
    assert set(ours.state[a.out.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_adjust_lr_fn_original_is_kellers_scaling():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 8))
    v = nn.Parameter(w.detach().clone())
    w.grad = v.grad = torch.randn(4, 8)
    MuonAdamW([w], lr=0.02, weight_decay=0.0, adjust_lr_fn="original").step()
    torch.optim.Muon([v], lr=0.02, weight_decay=0.0).step()
    assert torch.equal(w, v)


def test_bare_parameters_split_by_shape():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = MuonAdamW(m.parameters(), lr=1e-2)
    assert opt.param_groups[0]["muon"] is None
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    kinds = {tuple(p.shape): set(opt.state[p]) for p in m.parameters()}
    assert kinds[(6, 4)] == kinds[(2, 6)] == {"momentum_buffer"}
    assert kinds[(6,)] == kinds[(2,)] == {"step", "exp_avg", "exp_avg_sq"}


def test_bad_values_are_refused_with_their_names():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] has shape \(3,\)"):
        MuonAdamW([{"params": [w], "muon": True}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['muon'\]='yes' is invalid"):
        MuonAdamW([{"params": [w], "muon": "yes"}])
    with pytest.raises(ValueError, match="lr=-1 is invalid"):
        MuonAdamW([w], lr=-1)
    with pytest.raises(ValueError, match="adjust_lr_fn='moonshot' is invalid"):
        MuonAdamW([w], adjust_lr_fn="moonshot")
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0 is invalid"):
        MuonAdamW([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="ns_steps=0 is invalid"):
        MuonAdamW([w], ns_steps=0)
    with pytest.raises(ValueError, match="dtype torch.complex64"):
        MuonAdamW([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])
    opt = MuonAdamW([w])
    opt.param_groups[0]["momentum"] = 1.5  # a value changed after construction is checked at the step
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['momentum'\]=1.5 is invalid"):
        opt.step()
    assert torch.equal(w, torch.zeros(3))


def test_copies_and_pickles_keep_the_split():
    torch.manual_seed(0)
    m = Net()
    opt = MuonAdamW(muon_param_groups(m), lr=1e-3)
    m(torch.randint(0, 12, (2, 5))).sum().backward()
    opt.step()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert [g["muon"] for g in twin.param_groups] == [True, False]
        assert len(twin.state) == len(opt.state)
    fresh = MuonAdamW(muon_param_groups(m), lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_the_bench_reports_peers_tuned_and_at_their_defaults():
    jobs = plan(["quad-asym"], ["muon"], seeds=1, steps=5)
    muon_lrs = sorted(j.lr for j in jobs if j.optimizer == "muon")
    assert muon_lrs == sorted(registry.LR_GRID_PEER)  # 1e-3, its default, is on the grid
    runs = [{"task": "quad-asym", "optimizer": j.optimizer, "lr": j.lr} for j in jobs]
    chosen = {("quad-asym", "muon"): {"lr": 1e-2}, ("quad-asym", "adamw"): {"lr": 1e-2}}
    entries = entries_of(runs, chosen)
    assert {"muon-tuned", "muon-default", "adamw-tuned", "adamw-default"} <= set(entries)
    assert [r["lr"] for r in entries["muon-default"]] == [1e-3]
    # a default off the grid joins it
    spec = registry.OptimizerSpec("x", lambda p, lr: torch.optim.SGD(p, lr=lr), default_lr=0.5, lr_grid=(0.1, 1.0),
                                  tune=True, default_entry=True)
    assert spec.grid() == [0.1, 1.0, 0.5] and spec.grid(2) == [0.1, 0.5]


def test_the_quick_suite_runs_muon_and_the_full_suite_every_peer_but_the_named_only():
    quick, full = SUITES["quick"].optimizers(), SUITES["full"].optimizers()
    assert "muon" in quick and "muon" in full
    costly = [s.name for s in registry.specs() if s.full_only and not s.named_only]
    named = [s.name for s in registry.specs() if s.named_only]
    assert not set(costly) & set(quick) and set(costly) <= set(full)
    assert not set(named) & (set(quick) | set(full))
    if registry.get("soap").available():
        assert {"soap", "ademamix"} <= set(costly) and named == ["kron"]
        assert "kron" in registry.names()  # still there: `--optimizers kron` runs it


def test_the_bench_gives_muon_its_split():
    spec = registry.get("muon")
    task_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = spec.make_for(task_model)
    assert [g["muon"] for g in opt.param_groups] == [True, False]
    assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(8, 4), (8, 8)]


@pytest.mark.skipif(not registry.get("kron").available(), reason="pytorch-optimizer is not installed")
def test_a_run_with_a_randomised_optimizer_does_not_depend_on_what_ran_before():
    job = Job("digits-logreg", "kron", 1e-3, 0, 12)
    a = run_job(job)
    torch.rand(1000)  # what an earlier job in the same worker would leave behind
    import numpy as np

    np.random.random(1000)
    b = run_job(job)
    assert a["curve"]["val_loss"] == b["curve"]["val_loss"]


def test_overhead_measures_the_peers_and_leaves_the_named_only_out_unless_named(monkeypatch):
    from nestopt.bench import overhead

    seen: list[list[str]] = []

    def fake_rounds(builders, losses, base, cuda, loss_value, times, state, peaks, *rest):
        seen.append(list(builders))
        for n in builders:
            times[n].append(1.0)
            state[n], peaks[n] = 0.0, None

    monkeypatch.setattr(overhead, "_rounds", fake_rounds)
    rows = overhead.measure(n_params=1000, steps=1, rounds=1, warmup=0)
    assert "muon" in seen[0] and {r.name for r in rows} >= {"muon", "adamw"}
    named = [s.name for s in registry.specs() if s.named_only]
    assert not set(named) & set(seen[0])
    if registry.get("soap").available():
        assert {"soap", "ademamix"} <= set(seen[0])
        overhead.measure(["kron"], n_params=1000, steps=1, rounds=1, warmup=0)
        assert "kron" in seen[1]
