"""Smoke test of `nestopt study hpo` (quick settings) and its measurement helpers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("optuna")

from nestopt.studies import hpo  # noqa: E402


def test_quick_study_writes_every_section(tmp_path):
    doc = hpo.run_study(tmp_path, quick=True)
    for name in ("results.json", "report.md", "exactness.png", "hpo.png", "distill.png", "augment.png", "stn.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {"exactness", "cost", "hpo", "distill", "augment", "stn", "leak"}
    # CG converges on the well-conditioned problem: more iterations, smaller error, to a cosine of ~1
    rows = [r for r in doc["exactness"]["cond25_decay0.001"]["rows"] if r["solver"] == "cg"]
    assert rows[-1]["rel_error"] < rows[0]["rel_error"] and rows[-1]["cosine"] > 0.999
    assert "## 3. One weight decay per weight" in (tmp_path / "report.md").read_text()


def test_logistic_problem_has_the_condition_number_asked_for():
    p = hpo.logistic_problem(250.0, decay=1e-3)
    assert p["grad_norm"] < 1e-10  # Newton solved the inner problem
    x_cond = p["feature_cond"]
    assert x_cond == 250.0 and p["hessian_cond"] > 10


def test_peak_extra_memory_sees_a_large_allocation():
    hpo._mallopt_for_measurement()
    mb = hpo.peak_extra_mb(lambda: torch.ones(8 * 2**20, dtype=torch.float64).sum())  # 64 MB
    if mb is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 50 < mb < 200
