"""``nestopt study controller``: the analysis on known records, and a small end-to-end run."""

from __future__ import annotations

import json

import pytest

from nestopt.studies import controller as C


def _rec(task, opt, lr, seed, final, ttt):
    return {"task": task, "optimizer": opt, "lr": lr, "seed": seed, "final_val_loss": final,
            "diverged": final is None, "time_to_target_s": ttt, "ms_per_step": 1.0, "error": None}


def test_robustness_counts_rates_within_2x_of_the_methods_best():
    best = {"t": 0.01}
    lrs = C._around(0.01, C.ROBUST)
    recs = []
    for lr, a, n in zip(lrs, [None, 4.0, 1.0, 1.9, None], [3.0, 2.0, 2.0, 2.5, 9.0]):
        recs.append(_rec("t", "adamw", lr, 0, 1.0, a))
        recs.append(_rec("t", C._name("hindsight"), lr, 0, 1.0, n))
        recs.append(_rec("t", "adamw-hd", lr, 0, 1.0, None))
    rob = C.robustness(recs, ("t",), best)
    assert rob["adamw"]["robust"] == 2  # 1.0 and 1.9 are within 2x of 1.0; 4.0 is not
    assert rob["nested (default)"]["robust"] == 4  # 2, 2, 2.5, 3 within 2x of 2; 9 is not
    assert rob["adamw-hd"]["robust"] == 0  # never reaches the target


def _two_tasks(nested_ttt):
    """Records on two tasks, 3 seeds: AdamW reaches the target only at lr* (1 robust rate per
    task); the nested optimizer's time to target per (seed, factor) comes from ``nested_ttt``."""
    best = {"t1": 0.01, "t2": 0.1}
    recs = []
    for t in best:
        for f, lr in zip(C.ROBUST, C._around(best[t], C.ROBUST)):
            for s in range(3):
                recs.append(_rec(t, "adamw", lr, s, 1.0, 1.0 if f == 1.0 else None))
                recs.append(_rec(t, "n", lr, s, 1.0, nested_ttt(s, f)))
    return recs, best


def test_robust_difference_separates_a_clear_lead_from_seed_luck():
    # Clearly more robust: every seed reaches the target at every rate within 2x of the best.
    recs, best = _two_tasks(lambda s, f: 1.0 + 0.1 * s)
    d = C.robust_difference(recs, ("t1", "t2"), best, "n", "adamw", draws=300)
    assert d["observed"] == 10 - 2
    assert d["interval90"][0] > 0 and d["ahead"] == 1.0
    assert C.robust_verdict(d) == "more"
    # A lead that rests on one seed per cell: the nested optimizer reaches the target away from lr*
    # on seeds 0 and 1 only at factor 0.316, else on seed 0 alone (median: not reached).
    recs, best = _two_tasks(lambda s, f: 1.0 if (f == 1.0 or (f == 0.316 and s < 2)) else None)
    d = C.robust_difference(recs, ("t1", "t2"), best, "n", "adamw", draws=300)
    assert d["observed"] == 4 - 2
    assert d["interval90"][0] <= 0 < d["interval90"][1]
    assert C.robust_verdict(d) == "no clear difference"
    # Reproducible for a given seed.
    assert C.robust_difference(recs, ("t1", "t2"), best, "n", "adamw", draws=300) == d


def test_paired_verdict_needs_a_clear_margin():
    best = {"t": 1.0}
    recs = []
    for s in range(4):
        for f, lr in zip(C.ABLATION, C._around(1.0, C.ABLATION)):
            recs.append(_rec("t", "a", lr, s, 0.5, None))
            recs.append(_rec("t", "b", lr, s, 1.0 if s < 3 else 0.4, None))
    p = C.paired(recs, "a", "b", C.ABLATION, seeds=4, best_lr=best)
    assert (p["wins"], p["losses"], p["pairs"]) == (9, 3, 12)
    assert p["verdict"] == "better"  # 9 - 3 = 6 >= max(3, 25% of 12)
    p = C.paired(recs, "a", "b", C.ABLATION, seeds=4, best_lr=best, tol=0.01)
    one_seed = C.paired(recs, "a", "b", (1.0,), seeds=1, best_lr=best)
    assert one_seed["pairs"] == 1 and one_seed["verdict"] == "no clear effect"


def test_small_study_end_to_end(tmp_path):
    doc = C.run_study(tmp_path, seeds=1, ablation_seeds=1, head_seeds=1, tasks=("quad-asym",), workers=1,
                      head_steps=10)
    report = (tmp_path / "report.md").read_text()
    for section in ("## 1. Robustness", "## 2. Ablations", "## 3. Per-head feedback", "## 4. Cost and peers"):
        assert section in report
    assert len(doc["ablations"]) == len(C.CONFIGS) - 1
    assert C.robust_verdict(doc["robust_difference"]) in ("more", "less", "no clear difference")
    assert "90% interval" in report
    assert all(r["verdict"] in ("helped", "hurt", "no clear effect") for r in doc["ablations"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best_lr"]["quad-asym"] > 0
    for f in ("robustness.png", "ablations.png", "heads.png"):
        assert (tmp_path / f).stat().st_size > 1000


def test_frozen_sweep_of_an_untrained_controller_is_adamw(tmp_path):
    from nestopt.nets import Controller
    from nestopt.nets import save_net
    from nestopt.optim.nested import DEFAULT_FEATURES, FEATURES
    from nestopt.studies.controller import frozen_sweep

    path = save_net(Controller(sum(FEATURES[f] for f in DEFAULT_FEATURES), hidden=8, features=DEFAULT_FEATURES),
                    tmp_path / "ctl.safetensors")
    (row,) = frozen_sweep(str(path), tasks=("quad-asym",), lrs=(1e-2,), seeds=1)
    assert row["multiplier"] == 1.0  # the untrained controller's last layer is zero: multiplier 1
    assert row["frozen"] == pytest.approx(row["adamw"], rel=1e-4)


def test_variants_study_scores_each_variant_against_adamw(tmp_path):
    doc = C.run_variants(tmp_path, variants=("label shift 1", "label shift 2 (default)"), seeds=1, tasks=("quad-asym",), workers=1)
    assert set(doc["robustness"]) == {"adamw", "label shift 1", "label shift 2 (default)"}
    assert all(0 <= m["robust"] <= m["cells"] == len(C.ROBUST) for m in doc["robustness"].values())
    report = (tmp_path / "variants.md").read_text()
    assert "| label shift 2 (default) | `label_shift=2.0` |" in report
    d = doc["robust_difference"]["label shift 1"]
    lo, hi = d["interval90"]
    assert lo == hi == d["observed"]  # one seed: every draw resamples the same run
    assert f"{d['observed']:+d} [{lo:+d}, {hi:+d}]" in report
    assert json.loads((tmp_path / "variants.json").read_text())["variants"]["label shift 1"] == {"label_shift": 1.0}
    with pytest.raises(ValueError, match="variant 'bogus' is unknown"):
        C.run_variants(tmp_path, variants=("bogus",))
