"""Smoke test of ``nestopt study games`` (quick mode): every section runs and writes its files."""

import json

from nestopt.studies.games import run_study


def test_games_study_quick(tmp_path):
    doc = run_study(tmp_path, quick=True)
    for name in ("report.md", "results.json", "bilinear.png", "heatmap.png", "gan_curves.png", "gan_samples.png",
                 "lyapunov.png", "ridge_rider.png"):
        assert (tmp_path / name).is_file(), name
    json.loads((tmp_path / "results.json").read_text())
    assert all(r["rel_err"] < 0.05 for r in doc["rates"]["rows"])
    assert "Ridge Rider" in (tmp_path / "report.md").read_text()
