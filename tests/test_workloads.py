"""The benchmark workloads ``digits-cnn``, ``gru-seq``, ``wide-mlp`` and ``logic-gates``.

- determinism: ``init(seed)`` is bitwise identical, and two ``run_job`` calls with one seed give
  the same curve (a different seed a different one);
- quality: tuned AdamW (at the best rate of the benchmark grid for the task, hard-coded below)
  reaches the task's absolute ``goal`` within ``default_steps`` on every tested seed;
- the ``digits-cnn`` and ``gru-seq`` families (and ``logic-gates``): deterministic, varied, trainable;
- the default ``digits-cnn`` model is the one from before ``DigitsCNN`` took channel widths.

Everything runs on one thread, as a benchmark worker does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import nestopt.tasks as T
from nestopt.bench.runner import Job, run_job

WORKLOADS = ["digits-cnn", "gru-seq", "wide-mlp", "logic-gates"]

# AdamW's best rate per task: the grid (1e-4, 3e-4, ..., 0.3, 1.0) was run offline with
# `run_job(Job(task, "adamw", lr, seed, task.default_steps))` on seeds 0, 1, 2 and one thread; the
# rate is the benchmark's choice (the lowest worst-seed final validation loss). digits-cnn: worst-seed
# val_loss 0.082 at 1e-2 (3e-3: 0.088), and seeds 0-9 gave accuracy >= 0.970; logic-gates: 0.017 at
# 3e-2 (1e-2: 0.042), and seeds 0-7 gave accuracy 1.0 except seed 4 (0.83), which is not tested
# here. At their benchmark budgets (gru-seq 200 steps, wide-mlp 100): gru-seq accuracy 1.0 and loss
# <= 0.002 at 3e-2 and at 0.1 on seeds 0-2; wide-mlp accuracy >= 0.972 and loss <= 0.073 at 1e-3.
BEST_LR = {"digits-cnn": 1e-2, "gru-seq": 0.1, "wide-mlp": 1e-3, "logic-gates": 3e-2}
SEEDS = {"digits-cnn": (0, 1, 2), "gru-seq": (0, 1, 2), "wide-mlp": (0, 1, 2), "logic-gates": (0, 1, 2)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_workloads_are_registered_in_order():
    names = T.names()
    assert set(WORKLOADS) <= set(names)
    i = names.index("digits-cnn")
    assert names[i + 1:i + 3] == ["gru-seq", "wide-mlp"]
    assert {"digits-cnn", "gru-seq", "logic-gates"} <= set(T.family_names())


@pytest.mark.parametrize("name", WORKLOADS)
def test_init_is_bitwise_deterministic(name):
    task = T.get(name)
    assert _same_state(task.init(3), task.init(3))
    assert _same_state(T.get(name).init(3), task.init(3))  # a fresh task object too
    assert not _same_state(task.init(3), task.init(4))


@pytest.mark.parametrize("name", WORKLOADS)
def test_run_job_is_deterministic(name):
    steps = 12

    def curve(seed: int) -> dict:
        rec = run_job(Job(name, "adamw", 1e-3, seed, steps))
        assert not rec["diverged"] and rec["steps_done"] == steps
        return {k: v for k, v in rec["curve"].items() if k != "time_s"}  # time_s is wall time

    a, b, c = curve(0), curve(0), curve(1)
    assert a == b
    assert a["val_loss"] != c["val_loss"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_goal_is_declared(name):
    task = T.get(name)
    assert isinstance(task.goal, dict) and task.goal
    assert all(isinstance(v, float) and math.isfinite(v) for v in task.goal.values())
    assert task.info()["goal"] == task.goal
    assert set(task.goal) <= set(task.evaluate(task.init(0)))
    assert not task.meets_goal(task.evaluate(task.init(0)))  # an untrained model is below the bar


@pytest.mark.parametrize("name,seed", [(n, s) for n in WORKLOADS for s in SEEDS[n]])
def test_tuned_adamw_reaches_the_goal(name, seed):
    task = T.get(name)
    rec = run_job(Job(name, "adamw", BEST_LR[name], seed, task.default_steps))
    assert not rec["diverged"], rec["error"]
    metrics = {"val_loss": rec["final_val_loss"], **rec["metrics"]}
    assert task.meets_goal(metrics), f"{name} seed {seed}: {metrics} misses {task.goal}"


def test_meets_goal_reads_loss_keys_as_upper_bounds():
    task = T.get("gru-seq")
    task.goal = {"val_loss": 0.1, "val_accuracy": 0.9}
    assert task.meets_goal({"val_loss": 0.1, "val_accuracy": 0.9})
    assert not task.meets_goal({"val_loss": 0.11, "val_accuracy": 0.95})
    assert not task.meets_goal({"val_loss": 0.05, "val_accuracy": 0.89})
    assert not task.meets_goal({"val_loss": float("nan"), "val_accuracy": 0.95})
    assert not task.meets_goal({"val_loss": 0.05})
    task.goal = None
    with pytest.raises(ValueError):
        task.meets_goal({"val_loss": 0.0})


class _DigitsCNNBefore(nn.Module):
    """``DigitsCNN`` as it was before it took channel widths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.head = nn.Linear(16 * 4 * 4, 10)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_default_digits_cnn_is_unchanged(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        before = _DigitsCNNBefore()
    assert _same_state(T.get("digits-cnn").init(seed), before)
    task = T.get("digits-cnn")
    assert (task.default_steps, task.batch_size) == (400, 64)
    assert task.description == "CNN conv3x3(8)-conv3x3/2(16)-linear on 8x8 digits"


def test_wide_mlp_has_about_a_million_parameters():
    model = T.get("wide-mlp").init(0)
    assert sum(p.numel() for p in model.parameters()) == 64 * 960 + 960 + 960 * 960 + 960 + 960 * 10 + 10 == 994_570


def test_gru_seq_data_are_fixed_and_need_the_order():
    from nestopt.tasks.sequence import order_data

    xt, yt, xv, yv = T.get("gru-seq").data()
    assert xt.shape == (4096, 24) and xv.shape == (1024, 24)
    assert torch.equal(xt, order_data(24)[0])
    assert set(yt.tolist()) == set(range(8))
    # Exactly three markers (4 = X, 5 = Y) per sequence, and the label is their order.
    marks = xt >= 4
    assert bool((marks.sum(1) == 3).all())
    for i in range(50):
        bits = (xt[i][marks[i]] - 4).tolist()
        assert yt[i] == bits[0] * 4 + bits[1] * 2 + bits[2]
    # The counts alone do not give the class: XXY and XYX (labels 1 and 2) both occur.
    assert {1, 2} <= set(yt.tolist())


FAMILIES = ["digits-cnn", "gru-seq", "logic-gates"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_sample_is_deterministic(name):
    fam = T.family(name)
    a, b = fam.sample(5), T.family(name).sample(5)
    assert a.name == b.name and (a.default_steps, a.batch_size) == (b.default_steps, b.batch_size)
    assert _same_state(a.init(0), b.init(0))
    sa, sb = a.sampler(1), b.sampler(1)
    ma = a.init(0)
    for step in range(2):
        assert torch.equal(a.loss(ma, sa(step)), b.loss(ma, sb(step)))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gives_distinct_variants(name):
    fam = T.family(name)
    tasks = [fam.sample(s) for s in range(10)]
    names = {t.name for t in tasks}
    assert len(names) >= 3, names
    assert all(t.name.startswith(f"{name}[") for t in tasks), names
    shapes = {tuple(tuple(p.shape) for p in t.init(0).parameters()) for t in tasks}
    assert len(shapes) >= 2


@pytest.mark.parametrize("name,seed", [(n, s) for n in FAMILIES for s in (0, 1)])
def test_family_variant_trains(name, seed):
    task = T.family(name).sample(seed)
    model = task.init(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    next_batch = task.sampler(0)
    before = task.evaluate(model)["val_loss"]
    for step in range(40):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, next_batch(step))
        loss.backward()
        opt.step()
    after = task.evaluate(model)["val_loss"]
    assert math.isfinite(after) and after < before, (task.name, before, after)


@pytest.mark.parametrize("name", ["digits-cnn", "gru-seq"])
def test_family_variants_have_no_target(name):
    assert all(T.family(name).sample(s).goal is None for s in range(4))


@pytest.mark.parametrize("name", T.names())
def test_every_task_describes_itself(name):
    info = T.get(name).info()  # (quad-sym's optimum lives in .target: the goal must not collide with it)
    json.dumps(info)
    assert info["name"] == name and (info["goal"] is None or info["goal"] == T.get(name).goal)
