from __future__ import annotations

import json
import math

import pytest
import torch

from nestopt.bench import Job, plan, run_bench, run_job, summarize, validate
from nestopt.bench.scoring import TAU_MAX
from nestopt.bench import registry


def test_run_job_is_seeded_and_deterministic():
    a = run_job(Job("digits-logreg", "adamw", 1e-2, 3, 30))
    b = run_job(Job("digits-logreg", "adamw", 1e-2, 3, 30))
    c = run_job(Job("digits-logreg", "adamw", 1e-2, 4, 30))
    assert a["curve"]["val_loss"] == b["curve"]["val_loss"]
    assert a["curve"]["train_loss"] == b["curve"]["train_loss"]
    assert a["curve"]["val_loss"] != c["curve"]["val_loss"]
    assert a["final_val_loss"] == a["curve"]["val_loss"][-1] < a["curve"]["val_loss"][0]
    assert a["ms_per_step"] > 0 and a["steps_done"] == 30 and not a["diverged"]
    assert 0 < a["final_val_accuracy"] <= 1


def test_divergence_is_recorded_and_the_bench_goes_on(tmp_path):
    # SGD's grid reaches lr=1, far past the stability limit 2/200 of the c=100 quadratic.
    doc = run_bench(tasks=["quad-asym"], optimizers=["sgd"], seeds=1, steps=40, out=tmp_path, workers=1)
    sgd = {r["lr"]: r for r in doc["runs"] if r["optimizer"] == "sgd"}
    assert sgd[1.0]["diverged"] and sgd[1.0]["final_val_loss"] is None
    assert sgd[1.0]["diverged_step"] is not None and sgd[1.0]["steps_done"] < 40
    assert not sgd[1e-3]["nonfinite_params"]
    assert not sgd[1e-3]["diverged"] and sgd[1e-3]["final_val_loss"] is not None
    assert len(doc["runs"]) == len(plan(["quad-asym"], ["sgd"], 1, 40))
    assert doc["complete"]
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert validate(json.loads(text)) == []
    # The diverged rate is never the chosen one.
    assert doc["summary"]["chosen_lr"]["quad-asym|sgd"]["lr"] < 0.01


@pytest.fixture
def raising_optimizer():
    class Quits(torch.optim.SGD):
        def step(self, closure=None):
            if self.state.setdefault("n", 0) >= 3:  # type: ignore[call-overload]
                raise RuntimeError("gave up")
            self.state["n"] += 1  # type: ignore[index]
            return super().step(closure)

    spec = registry.register(registry.OptimizerSpec("test-quits", lambda p, lr: Quits(p, lr=lr), default_lr=1e-3))
    yield spec
    registry._REGISTRY.pop(spec.name)


def test_an_optimizer_that_raises_counts_as_diverged(raising_optimizer, tmp_path):
    rec = run_job(Job("quad-asym", "test-quits", 1e-3, 0, 20))
    assert rec["diverged"] and rec["error"] == "RuntimeError: gave up" and rec["steps_done"] == 3


def _record(task, opt, lr, seed, vals, steps=None):
    steps = steps or list(range(0, 10 * len(vals), 10))
    final = None if vals[-1] is None else vals[-1]
    return {"task": task, "optimizer": opt, "lr": lr, "seed": seed, "steps": steps[-1],
            "final_train_loss": final, "final_val_loss": final, "best_val_loss": min(v for v in vals if v is not None),
            "final_val_accuracy": None, "steps_to_target": None, "time_to_target_s": None, "ms_per_step": 1.0,
            "diverged": final is None, "diverged_step": None, "steps_done": steps[-1], "wall_s": 0.1, "error": None,
            "nonfinite_params": False,
            "metrics": {}, "curve": {"step": steps, "train_loss": vals, "val_loss": vals,
                                     "time_s": [s / 1000 for s in steps]}}


def test_targets_ratios_and_profiles_follow_their_definitions():
    recs = [
        # adamw at 1e-3 (its default): worst final 0.5; at 1e-2: worst final 0.2 -> chosen, target 0.2
        _record("t", "adamw", 1e-3, 0, [1.0, 0.8, 0.6, 0.5]),
        _record("t", "adamw", 1e-3, 1, [1.0, 0.7, 0.5, 0.4]),
        _record("t", "adamw", 1e-2, 0, [1.0, 0.5, 0.2, 0.1]),
        _record("t", "adamw", 1e-2, 1, [1.0, 0.6, 0.3, 0.2]),
        _record("t", "adamw", 1e-1, 0, [1.0, None]),
        _record("t", "adamw", 1e-1, 1, [1.0, 0.1, 0.05, 0.01]),
        # sgd: reaches 0.2 at step 10 on both seeds at 0.3; 0.1 never reaches
        _record("t", "sgd", 0.3, 0, [1.0, 0.2, 0.2, 0.2]),
        _record("t", "sgd", 0.3, 1, [1.0, 0.15, 0.2, 0.19]),
        _record("t", "sgd", 0.1, 0, [1.0, 0.9, 0.8, 0.7]),
        _record("t", "sgd", 0.1, 1, [1.0, 0.9, 0.8, 0.7]),
    ]
    s = summarize(recs)
    assert s["targets"]["t"] == {"val_loss": 0.2, "adamw_lr": 1e-2}
    assert s["chosen_lr"]["t|adamw"]["lr"] == 1e-2  # 1e-1 has a diverged seed: worst = inf
    assert s["chosen_lr"]["t|sgd"]["lr"] == 0.3
    tab = s["table"]
    assert tab["adamw-tuned"]["t"]["steps_to_target_median"] == 25.0  # seeds reach at 20 and 30
    assert tab["sgd-tuned"]["t"]["steps_to_target_median"] == 10.0
    assert tab["adamw-default"]["t"]["steps_to_target_median"] is None  # never at or below 0.2
    assert s["ratios"]["steps"]["sgd-tuned"]["t"] == 1.0
    assert s["ratios"]["steps"]["adamw-tuned"]["t"] == 2.5
    assert s["ratios"]["steps"]["adamw-default"]["t"] is None  # a miss is infinite
    prof = s["profile"]["steps"]
    tau = s["profile"]["tau"]
    assert tau[0] == 1.0 and tau[-1] == pytest.approx(TAU_MAX)
    assert prof["sgd-tuned"][0] == 1.0
    assert prof["adamw-default"][-1] == 0.0
    assert all(a <= b for a, b in zip(prof["adamw-tuned"], prof["adamw-tuned"][1:]))
    first = next(t for t, v in zip(tau, prof["adamw-tuned"]) if v == 1.0)
    assert 2.5 <= first < 2.5 * 1.02
    assert s["scores"]["steps"]["sgd-tuned"] == 1.0
    assert 0 < s["scores"]["steps"]["adamw-tuned"] < 1
    assert s["scores"]["steps"]["adamw-default"] == 0.0


def test_schema_validator_reports_problems():
    doc = {"schema_version": 1, "created": "now", "complete": True, "environment": {}, "config": {},
           "runs": [_record("t", "adamw", 1e-3, 0, [1.0, 0.5])], "summary": {}}
    errs = validate(doc)
    assert any("summary: missing key 'targets'" in e for e in errs)
    doc["summary"] = summarize(doc["runs"])
    assert validate(doc) == []
    del doc["runs"][0]["ms_per_step"]
    doc["runs"][0]["curve"]["step"].append(99)
    doc["runs"][0]["diverged"] = "no"
    errs = validate(doc)
    assert any("ms_per_step" in e for e in errs)
    assert any("differ in length" in e for e in errs)
    assert any("diverged" in e for e in errs)


def test_plan_always_includes_tuned_adamw_and_its_default():
    for stride in (1, 2):
        jobs = plan(["quad-asym"], ["sgd"], seeds=2, steps=10, grid_stride=stride)
        adamw_lrs = {j.lr for j in jobs if j.optimizer == "adamw"}
        assert len(adamw_lrs) >= 5 and registry.get("adamw").default_lr in adamw_lrs
    assert {j.seed for j in jobs} == {0, 1}
    with pytest.raises(KeyError, match="valid names"):
        plan(["nope"], [], 1)
    with pytest.raises(ValueError, match="steps=0"):
        plan(["quad-asym"], [], 1, steps=0)


def test_bench_outputs_curves_profile_and_report(tmp_path):
    doc = run_bench(tasks=["quad-sym", "digits-logreg"], optimizers=["sgd-momentum"], seeds=1, steps=30,
                    out=tmp_path, workers=1)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"curves_quad-sym.png", "curves_digits-logreg.png", "profile.png", "lr_sensitivity.png"} <= set(pngs)
    report = (tmp_path / "report.md").read_text()
    assert "adamw-tuned" in report and "adamw-default" in report and "sgd-momentum-tuned" in report
    assert all(math.isfinite(v) for v in doc["summary"]["scores"]["time"].values())


@pytest.fixture
def scheduled_optimizer():
    from nestopt.schedule import constant

    spec = registry.register(registry.OptimizerSpec(
        "test-frozen-by-schedule", lambda p, lr: torch.optim.SGD(p, lr=lr), default_lr=0.1,
        schedule=lambda lr, steps: constant(0.0)))
    yield spec
    registry._REGISTRY.pop(spec.name)


def test_the_bench_drives_an_optimizer_with_its_schedule(scheduled_optimizer):
    rec = run_job(Job("quad-asym", "test-frozen-by-schedule", 0.1, 0, 10))
    assert rec["curve"]["val_loss"][-1] == rec["curve"]["val_loss"][0]  # lr 0 from the first step


def test_the_large_lr_recipe_joins_the_bench():
    spec = registry.get("sgd-largelr")
    assert spec.tune and spec.clip_norm == 1.0 and spec.schedule is not None
    s = spec.schedule(0.3, 100)
    assert s(0) == pytest.approx(0.01) and s(5) == pytest.approx(0.3) and s(100) == pytest.approx(1e-5)
    rec = run_job(Job("digits-logreg", "sgd-largelr", 0.3, 0, 40))
    assert not rec["diverged"] and rec["final_val_loss"] < rec["curve"]["val_loss"][0]


def test_overhead_floor_rows_read_every_gradient_then_step_as_the_reference(monkeypatch):
    """The floor rows of ``nestopt overhead`` are the reference optimizer after one norm pass over
    all gradients: same parameters as the reference, one pass per step, nothing else."""
    from nestopt.bench import overhead
    from nestopt.optim import tensors

    read = []
    real = tensors.host_sq_norms
    monkeypatch.setattr(tensors, "host_sq_norms", lambda ts, *e: read.append(len(ts)) or real(ts, *e))
    base = overhead.synthetic_params(5000)
    a = [p.detach().clone().requires_grad_() for p in base]
    b = [p.detach().clone().requires_grad_() for p in base]
    for x, y, p in zip(a, b, base):
        x.grad, y.grad = p.grad.clone(), p.grad.clone()
    floor = overhead.REFERENCES["norm pass + AdamW(fused=True)"](a)
    ref = overhead.REFERENCES["torch AdamW(fused=True)"](b)
    for _ in range(3):
        floor.step()
        ref.step()
    assert read == [len(base)] * 3
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_a_studys_variant_runs_in_the_bench_workers():
    """Variants are registered explicitly (no import by name): the spawned workers get the
    parent's, including from a module that registers its own copy when the spec is unpickled."""
    import _variant_study  # noqa: F401  (registers the variant here)

    from nestopt.bench import run_jobs

    name = "test-variant:sgd-momentum-0.5"
    assert name in {s.name for s in registry.variants()} and name not in registry.names()
    jobs = [Job("quad-asym", name, 0.01, s, 30) for s in (0, 1)]
    parallel, _ = run_jobs(jobs, workers=2)
    serial, _ = run_jobs(jobs, workers=1)
    key = lambda r: r["seed"]  # noqa: E731
    for a, b in zip(sorted(parallel, key=key), sorted(serial, key=key)):
        assert a["error"] is None and not a["diverged"]
        assert a["final_val_loss"] == b["final_val_loss"]
