"""Deep optimal stopping: the problems, the rule's arithmetic, a closed-form price, the tasks and the study."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nestopt.tasks as T
from nestopt.studies.stopping import Plan, run_study, verdicts
from nestopt.studies.stopping_parts import fit_backward, lower_bound, paired, prune
from nestopt.tasks.stopping import MaxCall, TradeExit, continuation, rule_rewards, soft_regret


def test_max_call_paths_are_martingales_after_carry_and_the_payoff_is_discounted():
    p = MaxCall(d=3, s0=100.0)
    s = p.prices(200_000, seed=0)
    assert s.shape == (200_000, 10, 3) and torch.all(s[:, 0] == 100.0)
    t = torch.arange(10, dtype=torch.float64) * (3.0 / 9)
    carry = torch.exp(-(p.rate - p.dividend) * t)[None, :, None]
    mean = (s * carry).mean((0, 2))
    assert torch.allclose(mean, torch.full_like(mean, 100.0), rtol=3e-3)
    g = p.rewards(s)
    n, i = 4, 17
    assert float(g[i, n]) == pytest.approx(math.exp(-0.05 * 4 / 3) * max(float(s[i, n].max()) - 100.0, 0.0))
    assert float(MaxCall(d=2, s0=110.0).simulate(4, seed=1)["g"][0, 0]) == pytest.approx(10.0)


def test_continuation_and_rule_rewards_by_hand():
    g = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 0.5, 4.0], [0.0, 0.0, 6.0, 1.0]], dtype=torch.float64)
    stop = torch.tensor([[False, True], [True, False], [False, False]])  # decisions at dates 1, 2
    c = continuation(stop, g)
    # c[:, n] = reward of the rule from date n+1 on
    assert c.tolist() == [[2.0, 2.0, 3.0], [5.0, 4.0, 4.0], [1.0, 1.0, 1.0]]
    assert rule_rewards(stop, g).tolist() == [2.0, 5.0, 1.0]
    probs = torch.tensor([[0.25, 0.5], [1.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    # regret per date: max(g, c) - (g F + c (1 - F))
    want = ((2 - (1 * 0.25 + 2 * 0.75)) + (3 - (2 * 0.5 + 3 * 0.5))
            + 0.0 + (4 - 4.0) + (1 - 1.0) + (6 - (6 * 0.5 + 1 * 0.5))) / 3
    assert float(soft_regret(probs, g, c)) == pytest.approx(want)


def test_the_backward_rule_prices_a_call_with_no_early_exercise_at_black_scholes():
    """With no rate and no dividend an American call is never exercised early: the optimal value is
    the Black-Scholes price, which the lower bound on fresh paths must approach from below."""
    p = MaxCall(d=1, s0=100.0, rate=0.0, dividend=0.0, maturity=1.0, dates=4)
    bs = 100.0 * (2 * 0.5 * (1 + math.erf(0.1 / math.sqrt(2))) - 1)  # sigma sqrt(T) / 2 = 0.1
    fit = fit_backward(p, seed=0, n_train=16_384, steps=60, batch=2048)
    lb = lower_bound(p, fit["nets"], fit["start_stop"], n_paths=200_000, seed=7)
    assert lb["mean"] <= bs + 3 * lb["se"]
    assert lb["mean"] >= 0.98 * bs, (lb, bs)


def test_trade_exit_paths():
    p = TradeExit(n_assets=2, n_bars=3000)
    d = p.simulate(None, seed=0)
    assert d["x"].shape[1:] == (8, p.n_features) and d["g"].shape[1] == 8
    assert torch.all(d["g"][:, 0] == 0) and torch.isfinite(d["x"]).all()
    other = p.simulate(None, seed=0, stream=1)
    assert not torch.equal(other["g"][:50], d["g"][:50])
    hot = TradeExit(n_assets=2, n_bars=3000, vol_scale=2.0).simulate(None, seed=0)
    assert float(hot["x"][..., 4].mean() - d["x"][..., 4].mean()) > 0.5  # log realised volatility, about log 2 up
    with pytest.raises(ValueError, match=r"vol_scale=0.0 is invalid"):
        TradeExit(vol_scale=0.0)
    with pytest.raises(ValueError, match=r"n_bars=100 is invalid"):
        TradeExit(n_bars=100)


@pytest.mark.parametrize("name", ["stopping-maxcall-d2", "stopping-maxcall-d5", "stopping-exit"])
def test_the_tasks_join_the_registry_and_train(name):
    task = T.get(name)
    model = task.init(0)
    batch = task.sampler(0)(0)
    loss = task.loss(model, batch)
    loss.backward()
    assert float(loss.detach()) >= 0 and all(p.grad is not None for p in model.parameters())
    m = task.evaluate(model)
    assert {"val_loss", "val_value", "val_value_se"} <= set(m) and m["val_loss"] >= 0
    assert ("val_price" in m) == name.startswith("stopping-maxcall")
    assert not torch.equal(task.train_data()["g"][:8], task.val_data()["g"][:8])


def test_pruning_zeroes_the_smallest_weights_and_paired_differences():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 1))
    pruned = prune(model, 0.5)
    ws = [p for p in pruned.parameters() if p.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == 12  # half of the 25 matrix weights, rounded down
    assert torch.equal(pruned[0].bias, model[0].bias)
    diff, se = paired(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert diff == pytest.approx(5 / 3) and se == pytest.approx(math.sqrt(4 / 3 / 3))


def _doc(hi_b, hi_p, r_steps, c_steps, rp, cp, jal, ood):
    return {"plan": {"grid": [0.01, 0.1, 1.0]},
            "rates": {"highest_stable": {"bema-clip": hi_b, "plain": hi_p},
                      "best": {"bema-clip": {"mean": 0.6, "lr": 0.1}, "plain": {"mean": 0.5, "lr": 0.01}}},
            "time_to_target": {"target": 0.5, "recipe_lr": 0.3, "constant_lr": 0.01, "recipe_steps": r_steps,
                               "constant_steps": c_steps},
            "pruning": {"recipe_prunable": rp, "constant_prunable": cp},
            "jal": {"diff": {"0": {"mean": 0.0, "se": 0.001}, "0.2": jal[0], "0.4": jal[1]},
                    "auc": {k: {"ce": 0.5, "jal": 0.5} for k in ("0", "0.2", "0.4")}},
            "ood": {"recipe": 0.33, "constant": 0.3, "diff": ood[0], "se": ood[1], "gain": ood[0] / 0.3,
                    "recipe_in": 0.6, "constant_in": 0.6}}


def test_verdicts_follow_their_rules():
    yes = {v["key"]: v["verdict"] for v in verdicts(_doc(0.5, 0.1, [60, 70], [100, 100], 0.5, 0.2,
                                                         ({"mean": 0.01, "se": 0.002}, {"mean": 0.02, "se": 0.005}),
                                                         (0.04, 0.01)))}
    assert yes == {"rates": "holds", "speed": "holds", "pruning": "holds", "jal": "holds", "ood": "holds"}
    no = verdicts(_doc(1.0, 1.0, [90, None], [100, 100], 0.3, 0.2,
                       ({"mean": -0.01, "se": 0.002}, {"mean": -0.02, "se": 0.005}), (0.01, 0.01)))
    assert {v["key"]: v["verdict"] for v in no} == {"rates": "does not hold", "speed": "does not hold",
                                                     "pruning": "does not hold", "jal": "does not hold",
                                                     "ood": "does not hold"}
    assert "already stable at the grid's largest rate (1)" in no[0]["evidence"]
    mixed = {v["key"]: v["verdict"] for v in verdicts(_doc(0.4, 0.1, [81, 81], [100, 100], 0.5, 0.5,
                                                           ({"mean": 0.01, "se": 0.002}, {"mean": -0.01, "se": 0.005}),
                                                           (0.02, 0.005)))}
    assert mixed == {"rates": "does not hold", "speed": "does not hold", "pruning": "mixed", "jal": "does not hold",
                     "ood": "mixed"}
    # better at every noise rate by the same margin as on clean labels: a better loss, not robustness
    doc = _doc(0.4, 0.1, [81, 81], [100, 100], 0.5, 0.5, ({"mean": 0.01, "se": 0.001}, {"mean": 0.01, "se": 0.001}),
               (0.02, 0.005))
    doc["jal"]["diff"]["0"] = {"mean": 0.01, "se": 0.001}
    jal = next(v for v in verdicts(doc) if v["key"] == "jal")
    assert jal["verdict"] == "does not hold" and "better at every noise rate, not more robust" in jal["evidence"]


def test_study_smoke_writes_prices_verdicts_and_figures(tmp_path):
    doc = run_study(tmp_path, Plan.quick_plan())  # about 10 s on 2 idle cores
    assert [v["key"] for v in doc["verdicts"]] == ["rates", "speed", "pruning", "jal", "ood"]
    assert all(v["verdict"] in ("holds", "mixed", "does not hold") and v["evidence"] for v in doc["verdicts"])
    (row,) = doc["prices"]
    assert row["eval_seed"] != row["train_seed"] and row["se"] > 0 and (row["d"], row["s0"]) == (2, 100)
    assert {"prices.png", "value_vs_lr.png", "auc_vs_noise.png"} <= {p.name for p in tmp_path.glob("*.png")}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdicts"] == doc["verdicts"]
    assert "## Verdicts" in (tmp_path / "report.md").read_text()
