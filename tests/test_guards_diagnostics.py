from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nestopt.diagnostics as D
import nestopt.tasks as T
from nestopt.guards import GuardConfig, TrainingGuard
from nestopt.schedule import LargeLRConfig, LargeLRScheduler


def _train(corrupt_at=None, nan_grad_at=None, steps=300, guard_on=True, **guard_kw):
    task = T.get("digits-mlp")
    model = task.init(0)
    next_batch = task.sampler(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = TrainingGuard(model, opt, checkpoint_every=10, **guard_kw) if guard_on else None
    for step in range(steps):
        if step == corrupt_at:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 5.0)
        opt.zero_grad()
        loss = task.loss(model, next_batch(step))
        loss.backward()
        if step == nan_grad_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        if guard is None or guard.step(loss):
            opt.step()
    return task.evaluate(model)["val_loss"], guard, model


def test_a_loss_spike_from_corrupted_parameters_is_rolled_back():
    clean, clean_guard, _ = _train()
    assert "rollback" not in clean_guard.counts  # no false alarm on ordinary batch noise
    hit, guard, _ = _train(corrupt_at=150)
    unguarded, _, _ = _train(corrupt_at=150, guard_on=False)
    rollbacks = [e for e in guard.events if e["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["reason"] == "loss spike" and rollbacks[0]["step"] == 151
    assert rollbacks[0]["restored_step"] == 150  # the last good checkpoint
    assert abs(hit - clean) <= 0.05 * clean, (hit, clean)
    assert unguarded > 1.05 * clean  # the corruption does matter without the guard


def test_nan_gradient_never_reaches_the_parameters():
    task = T.get("digits-logreg")
    model = task.init(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = TrainingGuard(model, opt)
    loss = task.loss(model, task.sampler(0)(0))
    loss.backward()
    model.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    assert guard.step(loss) is False
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert guard.events[-1]["action"] == "skip_nonfinite_grad"


def test_nan_loss_restores_the_last_good_state():
    _, guard, model = _train(steps=40, corrupt_at=None)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    assert guard.step(torch.tensor(float("nan"))) is False
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.events[-1]["action"] == "rollback" and guard.events[-1]["reason"] == "non-finite loss"


def test_nan_gradient_mid_training_keeps_training_finite():
    val, guard, model = _train(nan_grad_at=100, steps=150)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.counts["skip_nonfinite_grad"] == 1


def test_sustained_large_gradients_halve_the_learning_rate_through_the_scheduler():
    model = nn.Linear(3, 1, bias=False)
    p = model.weight
    opt = torch.optim.SGD([p], lr=0.3)
    sched = LargeLRScheduler(opt, LargeLRConfig(warmup_epochs=0, decay="none", total_epochs=10).schedule())
    guard = TrainingGuard(model, opt, sched, sustained=3, halve_norm=10.0, clip_norm=1.0)
    for _ in range(3):
        p.grad = torch.full((1, 3), 100.0)
        assert guard.step(1.0)
    assert guard.counts["lr_halved"] == 1 and sched.scale == 0.5
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15)  # the schedule keeps the halving
    assert float(p.grad.norm()) == pytest.approx(1.0)  # clipped
    assert guard.counts["clip"] == 3


def test_plateau_sparsity_and_confidence_actions():
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    guard = TrainingGuard(model, opt, plateau_patience=2)
    for v in (1.0, 0.9, 0.95, 0.95):
        guard.on_eval(v)
    assert guard.counts["lr_lowered"] == 1 and opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    guard.on_diagnostics(sparsity=0.05)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1.5e-4)
    with pytest.warns(RuntimeWarning, match="possible collapse"):
        guard.on_diagnostics(confidence=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.on_diagnostics(sparsity=0.5, confidence=0.9)  # healthy: no action


def test_checkpoint_memory_is_bounded(tmp_path):
    _, guard, _ = _train(steps=100, keep=2)
    assert len(guard._ckpts) == 2
    _, guard, _ = _train(steps=100, keep=3, checkpoint_dir=tmp_path / "ck")
    assert len(list((tmp_path / "ck").glob("*.pt"))) == 3
    guard.save_log(tmp_path / "log.json")
    assert (tmp_path / "log.json").read_text().startswith("{")


def test_guard_config_validation():
    with pytest.raises(ValueError, match="^spike_factor="):
        GuardConfig(spike_factor=1.0)
    with pytest.raises(ValueError, match="^keep="):
        TrainingGuard(nn.Linear(1, 1), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), keep=0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.act = nn.ReLU()
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_diagnostics_on_known_values():
    net = _Net()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 0.0]]))
        net.fc.bias.zero_()
        net.out.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        net.out.bias.zero_()
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    y = torch.tensor([0, 1])
    # relu outputs: [1, 0, 0.05] and [0, 1, 0]: four of six below 0.1
    assert D.activation_sparsity(net, x) == pytest.approx(4 / 6)
    # weights: fc has 4 of 6 entries below 0.1 (the zeros and 0.05), out has 4 of 6 zeros
    assert D.weight_compressibility(net) == pytest.approx(8 / 12)
    assert D.accuracy(net, x, y) == 1.0
    assert D.pruned_accuracy(net, x, y, fractions=(0.0,))[0.0] == 1.0
    logits = net(x)
    assert D.prediction_confidence(net, x) == pytest.approx(float(torch.softmax(logits, -1).max(-1).values.mean()))
    assert D.feature_utilization(net, x) == pytest.approx(2 / 3)  # the third feature varies by 0.035
    net.zero_grad()
    net(x).sum().backward()
    assert D.gradient_norm(net) == pytest.approx(float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm()))


def test_class_separation_grows_with_separated_classes():
    net = nn.Sequential(nn.Identity(), nn.Linear(2, 2))
    y = torch.tensor([0] * 50 + [1] * 50)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(100, 2, generator=g) * 0.5
    near = noise + torch.stack([y.float(), torch.zeros(100)], 1)
    far = noise + 4 * torch.stack([y.float(), torch.zeros(100)], 1)
    assert D.class_separation(net, far, y) > 3 * D.class_separation(net, near, y)


def test_callback_samples_every_n_steps_and_times_itself():
    net = _Net()
    x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
    cb = D.DiagnosticsCallback(net, x, y, every=10)
    out = [cb(s) for s in range(25)]
    assert [o is not None for o in out].count(True) == 3 and len(cb.history) == 3
    assert cb.seconds > 0
    with pytest.raises(ValueError, match="every=0"):
        D.DiagnosticsCallback(net, x, y, every=0)


def test_large_lr_study_smoke(tmp_path):
    from nestopt.studies.large_lr import run_study, spurious_digits

    d = spurious_digits()
    assert 0.93 < float((d["cue_train"] == d["y_train"]).float().mean()) < 0.97
    assert float((d["cue_test"] == d["y_test"]).float().mean()) < 0.2
    doc = run_study(tmp_path, seeds=1, epochs=1, grid=(0.01, 0.3))
    assert {v["verdict"] for v in doc["verdicts"]} <= {"holds", "does not hold", "mixed"}
    assert len(doc["runs"]) == 4 and doc["diagnostics_overhead"] >= 0
    assert (tmp_path / "metrics_vs_lr.png").exists() and "## Verdicts" in (tmp_path / "report.md").read_text()


def test_all_metrics_in_one_pass_equals_the_separate_functions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    before = [p.detach().clone() for p in net.parameters()]
    m = D.all_metrics(net, x, y)
    pr = D.pruned_accuracy(net, x, y)
    assert m["activation_sparsity"] == pytest.approx(D.activation_sparsity(net, x))
    assert m["confidence"] == pytest.approx(D.prediction_confidence(net, x))
    assert m["class_separation"] == pytest.approx(D.class_separation(net, x, y))
    assert m["feature_utilization"] == pytest.approx(D.feature_utilization(net, x))
    assert (m["pruned_accuracy_50"], m["pruned_accuracy_80"]) == (pr[0.5], pr[0.8])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))  # pruning was undone
