"""``nestopt study refit``: the analysis's numbers, the strategies' starts, the trading features,
the quick study end to end (evaluation days kept apart), and a user's family by import path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nestopt.cli import main
from nestopt.studies.refit import LRS, Plan, analysis, strategies
from nestopt.studies.refit.features import TRADING_FEATURES, HeadAUC, HeadGrad, Regime
from nestopt.tasks.base import Task, TaskFamily
from nestopt.optim.nested.features import StepView


def _rec(strategy, day, seed, vals, secs_per_eval=1.0, final=None):
    steps = [10 * i for i in range(len(vals))]
    return {"strategy": strategy, "day": day, "seed": seed, "diverged": False,
            "curve": {"step": steps, "val_loss": list(vals), "train_s": [secs_per_eval * i for i in range(len(vals))]},
            "final": {"val_loss": vals[-1] if final is None else final, "val_pnl_bp": 1.0}}


def test_time_to_target_first_evaluation_at_or_below_it():
    r = _rec("x", 0, 0, [0.7, 0.69, 0.68, 0.67])
    assert analysis.time_to(r, 0.68) == (2.0, 20.0)
    assert analysis.time_to(r, 0.60) == (math.inf, math.inf)
    # there before the first step: credited the first evaluation interval, not zero seconds
    assert analysis.time_to(r, 0.75) == (1.0, 10.0)


def test_per_day_speedup_and_target_is_the_worst_seeds_final():
    recs = [_rec("adamw-once", 0, 0, [0.7, 0.69, 0.68]), _rec("adamw-once", 0, 1, [0.7, 0.695, 0.69]),
            _rec("fast", 0, 0, [0.7, 0.69, 0.6], secs_per_eval=0.5), _rec("fast", 0, 1, [0.7, 0.68, 0.6], 0.5),
            _rec("never", 0, 0, [0.7, 0.7, 0.7]), _rec("never", 0, 1, [0.71, 0.71, 0.71])]
    days = analysis.per_day(recs)
    assert days["adamw-once"][0]["target"] == 0.69
    # AdamW: seed 0 at 1 s, seed 1 at 2 s (median 1.5 s); "fast": 0.5 s both -> 3x
    assert days["fast"][0]["speedup"] == pytest.approx(3.0)
    assert days["never"][0]["speedup"] == 0.0 and days["never"][0]["reached"] == 0
    rows = {r["strategy"]: r for r in analysis.summarise(days, {"fast": 10.0, "never": 5.0})}
    assert rows["fast"]["saved_seconds"] == pytest.approx(1.0)
    assert rows["fast"]["break_even_refits"] == 10
    assert rows["never"]["break_even_refits"] is None
    assert rows["fast"]["d_val_loss"] == pytest.approx(0.6 - 0.685)


def test_bootstrap_interval_brackets_the_median_and_is_deterministic():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    lo, hi = analysis.bootstrap(xs)
    assert lo <= 5.0 <= hi and lo < hi
    assert analysis.bootstrap(xs) == (lo, hi)
    assert analysis.bootstrap([2.0] * 5) == (2.0, 2.0)


@pytest.mark.parametrize("ci, verdict", [((1.6, 2.9), "holds"), ((3.5, 4.0), "exceeded"), ((0.5, 1.4), "false"),
                                         ((1.2, 2.0), "inconclusive")])
def test_claim_verdict(ci, verdict):
    assert analysis.claim_verdict({"strategy": "s", "speedup": sum(ci) / 2, "speedup_ci90": ci})["verdict"] == verdict


def test_goal_distance():
    row = {"strategy": "s", "speedup": 1.0, "speedup_ci90": (0.8, 1.2), "d_val_loss": -0.001, "d_pnl": float("nan")}
    g = analysis.goal_distance(row)
    assert not g["met"] and g["factor_needed"] == pytest.approx(2.0) and g["interval_short_by"] == pytest.approx(0.7)
    assert g["parts"]["pnl"] is None and g["parts"]["val_loss"] is True
    ok = analysis.goal_distance({**row, "speedup": 2.5, "speedup_ci90": (1.6, 3.0)})
    assert ok["met"] and ok["factor_needed"] == 1.0


def test_oracle_takes_each_days_best_rate_and_once_the_tuned_rate():
    from nestopt.studies.refit import _oracle_and_once

    recs = []
    for d, best in ((0, LRS[0]), (1, LRS[2])):
        for lr in LRS:
            r = _rec("adamw-per-day", d, 0, [0.7, 0.6 if lr == best else 0.65])
            r["lr"] = lr
            recs.append(r)
    out = _oracle_and_once(recs, once_lr=LRS[1])
    oracle = {r["day"]: r["lr"] for r in out if r["strategy"] == "adamw-per-day"}
    assert oracle == {0: LRS[0], 1: LRS[2]}
    assert {r["lr"] for r in out if r["strategy"] == "adamw-once"} == {LRS[1]}


# -- the strategies -----------------------------------------------------------------------------------

def test_warm_start_and_shrink_perturb_start_from_yesterdays_weights():
    from nestopt.tasks import daily

    cfg = daily.DailyMarketConfig(n_days=30, n_assets=2, window_days=5, seed=2)
    task = daily.DailyTradingTask(6, cfg)
    yesterday = {k: torch.randn_like(v) for k, v in task.init(0).state_dict().items()}
    _, warm = strategies.refit(task, "warm", 0, 0, {"lr": 1e-3}, start=yesterday)
    assert all(torch.equal(warm[k], yesterday[k]) for k in yesterday)
    rec, sp = strategies.refit(task, "shrink-perturb", 0, 0, {"lr": 1e-3, "shrink": 0.5}, start=yesterday)
    fresh = task.init(strategies.run_seed(0, 6) + 1).state_dict()
    for k in yesterday:
        torch.testing.assert_close(sp[k], 0.5 * yesterday[k] + strategies.SHRINK_NOISE * fresh[k])
    assert rec["warm"]
    cold, _ = strategies.refit(task, "adamw-once", 0, 0, {"lr": 1e-3})
    assert not cold["warm"]


def test_a_chain_warm_starts_each_day_from_the_last():
    job = {"family": "trading-daily", "strategy": "warm", "seed": 0, "days": [61, 62], "steps": 3,
           "settings": {"lr": 1e-3}, "cold_lr": 1e-3}
    recs = strategies.run_job(job)
    assert [r["day"] for r in recs] == [61, 62] and all(r["warm"] for r in recs)


def test_muon_strategy_puts_the_heads_on_adamw():
    from nestopt.tasks import daily

    model = daily.DailyTradingTask(61).init(0)
    opt = strategies.make_optimizer("muon", model, {"lr": 1e-3})
    muon = [p for g in opt.param_groups if g["muon"] for p in g["params"]]
    assert {id(p) for p in muon} == {id(model.trunk[0].weight), id(model.trunk[2].weight)}


def test_nested_groups_mark_the_heads_and_features_leave_out_validation():
    from nestopt.tasks import daily

    model = daily.DailyTradingTask(61).init(0)
    groups = strategies._groups(model)
    assert [g.get("head") for g in groups] == [None, None, 0, 1, 2, 3, 4, 5, 6]
    assert "val" not in strategies.BASE_FEATURES  # tomorrow's validation never reaches a refit's controller
    assert strategies.nested_features("nested-no-pnl", tuple(TRADING_FEATURES)) == \
        tuple(f for f in TRADING_FEATURES if f != "pnl")


def _view(groups, g_rms, stats):
    return StepView(groups, g_rms, [0.0] * len(groups), [0.0] * len(groups), None, {}, 1.0,
                    {} if stats is None else {"trading": stats})


def test_trading_features_map_heads_and_keep_their_last_values():
    groups = [{"params": []}, {"params": [], "head": 0}, {"params": [], "head": 1}]
    f = HeadAUC()
    for _ in groups:
        f.add_group()
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(f.values(_view(groups, [1.0] * 3, {"auc": [0.6, 0.45]}))) == pytest.approx([0.0, 0.1, -0.05])
    assert flat(f.values(_view(groups, [1.0] * 3, None))) == pytest.approx([0.0, 0.1, -0.05])  # kept
    g = HeadGrad()
    for _ in groups:
        g.add_group()
    rows = g.values(_view(groups, [5.0, 2.0, 0.5], None))  # needs no stats: the heads' gradient RMS
    assert rows[0] == [0.0] and rows[1][0] == pytest.approx(math.log(2.0 / 1.25), rel=1e-5)
    r = Regime()
    for _ in groups:
        r.add_group()
    assert flat(r.values(_view(groups, [1.0] * 3, {"regime": [0.3, -1.0]}))) == pytest.approx([0.3, -1.0] * 3)
    state = r.state_dict()
    r2 = Regime()
    r2.load_state_dict(state, torch.device("cpu"))
    assert r2.rows.tolist() == r.rows.tolist()


# -- the study end to end -------------------------------------------------------------------------------

def test_quick_study_reports_every_strategy_and_keeps_evaluation_days_apart(tmp_path):
    out = tmp_path / "refit"
    assert main(["study", "refit", "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    names = {r["strategy"] for r in doc["rows"]}
    assert set(strategies.FIXED) <= names
    assert {f"nested-no-{f}" for f in TRADING_FEATURES} <= names
    eval_days = set(range(*doc["plan"]["eval_days"]))
    assert {r["day"] for r in doc["records"]} == eval_days
    assert max(doc["tune_days"]) < min(eval_days)
    assert doc["learned"]["command"].startswith("nestopt meta-train --family trading-daily --days 0:60")
    assert all(c["history"] for c in doc["controllers"].values())
    assert {c["verdict"] for c in doc["claim"]} <= {"holds", "exceeded", "false", "inconclusive"}
    for f in ("steps_to_target.png", "cumulative_pnl.png", "meta_training.png", "speedup.png"):
        assert (out / f).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## The chapter's claim" in report and "| nested-no-pnl |" in report


def test_meta_training_only_sees_the_past_days(monkeypatch, tmp_path):
    from nestopt.studies.refit import meta

    seen = []
    real = meta.RefitControllerInner.__init__

    def spy(self, net, family, seed, lr, trading):
        real(self, net, family, seed, lr, trading)
        seen.append(self.task.day)

    monkeypatch.setattr(meta.RefitControllerInner, "__init__", spy)
    got = meta.controller(out=tmp_path / "o", cache=None, family="trading-daily", days=(0, 5), trading=("pnl",), lr=1e-3,
                          steps=6, horizon=10, unroll=5, pairs=1)
    assert len(seen) >= 2 and all(0 <= d < 5 for d in seen)
    assert len(got["history"]) == 6 and not got["cached"]
    again = meta.controller(out=tmp_path / "o", cache=tmp_path / "c", family="trading-daily", days=(0, 5), trading=("pnl",),
                            lr=1e-3, steps=6, horizon=10, unroll=5, pairs=1)
    assert not again["cached"]  # the first run wrote to out, not to a cache
    third = meta.controller(out=tmp_path / "o", cache=tmp_path / "c", family="trading-daily", days=(0, 5), trading=("pnl",),
                            lr=1e-3, steps=6, horizon=10, unroll=5, pairs=1)
    assert third["cached"] and third["path"] == again["path"]


@pytest.mark.parametrize("argv, match", [
    (["--eval-days", "50:70"], "after the meta-training days"),
    (["--family", "nestopt_nope:Fam"], "cannot be imported"),
    (["--eval-days", "60:200"], "has days 0:105"),
    (["--train-days", "9"], "LO:HI"),
    (["--seeds", "0"], "positive"),
])
def test_bad_study_arguments_exit_2_with_one_line(tmp_path, capsys, argv, match):
    assert main(["study", "refit", "--quick", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


# -- a user's own family, by import path -----------------------------------------------------------------

class DriftTask(Task):
    """A tiny daily refit: linear regression whose slope drifts with the day."""

    default_steps = 20
    batch_size = 16

    def __init__(self, day: int) -> None:
        self.day = day
        self.name = f"drift[day={day}]"
        self.slope = 1.0 + 0.1 * day

    def init(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def sampler(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        return lambda step: torch.randn(self.batch_size, 2, generator=g)

    def loss(self, model, x):
        return ((model(x).squeeze(-1) - self.slope * x.sum(-1)) ** 2).mean()

    def evaluate(self, model):
        x = torch.linspace(-1, 1, 32)[:, None].repeat(1, 2)
        with torch.no_grad():
            return {"val_loss": float(self.loss(model, x))}


class DriftFamily(TaskFamily):
    name = "drift"
    days = range(0, 12)

    def sample(self, seed: int) -> Task:
        return DriftTask(seed)


def test_a_users_family_by_import_path_end_to_end(tmp_path):
    fam = f"{__name__}:DriftFamily"
    net = tmp_path / "net"
    assert main(["meta-train", "--family", fam, "--days", "0:6", "--steps", "3", "--unroll", "5", "--horizon", "10",
                 "--out", str(net)]) == 0
    from nestopt.nets import net_metadata

    meta = net_metadata(net / "net.safetensors")
    assert meta["config"]["families"] == [f"{fam}@0:6"]
    assert f"--family {fam} --days 0:6" in meta["command"]
    out = tmp_path / "study"
    assert main(["study", "refit", "--quick", "--family", fam, "--train-days", "0:6", "--eval-days", "6:8",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["trading_features"] == []  # no monitor_stats: the nested optimizer reads the general features only
    assert {r["strategy"] for r in doc["rows"]} == set(strategies.FIXED)
    assert {r["day"] for r in doc["records"]} == {6, 7}
    assert Plan.quick().steps == doc["steps"]


def test_meta_train_refuses_bad_days_and_families(capsys):
    assert main(["meta-train", "--family", "trading-daily", "--days", "5:3", "--out", "/nonexistent/x"]) == 2
    assert "--days '5:3' is invalid" in capsys.readouterr().err
    assert main(["meta-train", "--family", "nestopt_nope:F", "--out", "/nonexistent/x"]) == 2
    assert "cannot be imported" in capsys.readouterr().err
