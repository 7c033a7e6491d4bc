"""Every script of ``examples/`` runs as a user would run it, at a small size (a fresh interpreter,
an empty folder, a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = {
    "plain_tensorboard.py": ["--steps", "20", "--out", "{tmp}/pt"],
    "lightning_accumulation.py": ["--steps", "5", "--out", "{tmp}/pl"],
    "hf_trainer.py": ["--steps", "4", "--out", "{tmp}/hf"],
    "own_family.py": ["--steps", "2", "--out", "{tmp}/of"],
    "hypergradient_hpo.py": ["--outer", "2"],
}


def test_every_example_has_a_small_size():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_example_runs(name, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in SMALL[name]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    if name == "hf_trainer.py":
        assert "resumed run ends where the whole one does: True" in r.stdout
    if name == "plain_tensorboard.py":
        assert list((tmp_path / "pt").glob("events.out.tfevents.*")) and (tmp_path / "pt" / "telemetry.csv").is_file()
