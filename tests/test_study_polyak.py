from __future__ import annotations

import json

import pytest
import torch

from nestopt.studies.polyak import run_study
from nestopt.studies.polyak_experiments import VARIANTS, experiments, measure, run


def test_study_smoke_writes_report_figures_and_verdicts(tmp_path):
    doc = run_study(tmp_path, variants=["global", "diag-exact"], gates_steps=8, gates_seeds=(0,))
    report = (tmp_path / "report.md").read_text()
    for key in ("exp1", "exp2", "exp3", "exp4", "exp5"):
        assert doc["verdicts"][key], key
        assert f"## Experiment {key[-1]}" in report
    assert all(it["verdict"] in ("confirmed", "refuted", "partly") for v in doc["verdicts"].values() for it in v)
    assert {"trajectories.png", "loss_curves.png", "parameter_errors.png", "grad_ratio.png", "logic_gates.png"} <= {
        p.name for p in tmp_path.glob("*.png")}
    saved = json.loads((tmp_path / "results.json").read_text())
    # the logic-gates part: its own section, verdicts and runs (not among the note experiments' verdicts)
    assert "## Logic gates" in report and "logic_gates" not in doc["verdicts"]
    gates = saved["logic_gates"]
    assert [it["key"] for it in gates["verdicts"]] == ["A", "B", "B2", "C", "D", "overall"]
    assert all(it["verdict"] in ("confirmed", "refuted", "partly") for it in gates["verdicts"])
    assert {r["optimizer"] for r in gates["runs"]} == {"global", "tensor", "adamw"}
    assert all(len(r["loss"]) == 9 for r in gates["runs"])


def _runs(exp_key, variant_keys, dtype=torch.float64):
    exp = next(e for e in experiments(dtype) if e.key == exp_key)
    out = []
    for v in VARIANTS:
        if v.key in variant_keys:
            r = run(exp, v, dtype)
            r.metrics = measure(exp, r)
            out.append(r)
    return exp, out


def test_experiment_3_metrics_measure_starvation_and_the_kink():
    exp, (glob, diag) = _runs("exp3", ["global", "diag-exact"])
    m = glob.metrics
    # First step: the shared step is about 1/(4c), so x's error shrinks by about 1 - 1/(2c).
    eta = (81 + 100 * 64) / (4 * 81 + 4 * 100**2 * 64)
    assert m["first_step_rates"]["x"] == pytest.approx(1 - 2 * eta, rel=1e-12)
    assert m["first_step_rates"]["y"] == pytest.approx(abs(1 - 200 * eta), rel=1e-12)
    assert m["grad_ratio_start"] == pytest.approx(18 / 1600)
    assert m["kink_step"] is not None and m["kink_step"] > 0
    assert diag.metrics["rates"]["x"] == pytest.approx(0.5, abs=1e-6)
    assert diag.metrics["zigzags"] == 0


def test_zigzag_count_sees_loss_increases():
    exp, (glob,) = _runs("exp3", ["global"])
    losses = glob.loss
    ups = sum(1 for a, b in zip(losses, losses[1:]) if a > 1e-20 and b > a * (1 + 1e-9))
    assert glob.metrics["zigzags"] == ups > 0
