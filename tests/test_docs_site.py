"""The documentation site builds with ``mkdocs build --strict``: every page in the navigation,
every link between pages, and the API reference rendered from the docstrings (mkdocstrings)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "api" / "optim" / "index.html").is_file()
    html = (site / "api" / "optim" / "index.html").read_text()
    assert "Polyak" in html and "observe_loss" in html  # rendered from the docstrings
    assert (site / "integrations" / "index.html").is_file() and (site / "getting-started" / "index.html").is_file()
