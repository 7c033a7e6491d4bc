from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestopt.bench import validate

ROOT = Path(__file__).resolve().parents[1]


def nestopt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nestopt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_bench_micro_suite_smoke(tmp_path):
    out = tmp_path / "out"
    r = nestopt("bench", "--tasks", "quad-asym,digits-logreg", "--optimizers", "sgd,adam", "--seeds", "1",
                "--steps", "20", "--workers", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    from nestopt.bench import registry

    # The quick suite's grids (every other rate) for the three tuned optimizers, 2 tasks, 1 seed.
    grids = sum(len(registry.get(o).lr_grid[::2]) for o in ("adamw", "sgd", "adam"))
    assert doc["complete"] and len(doc["runs"]) == 2 * grids
    assert doc["config"]["grid_stride"] == 2
    run = doc["runs"][0]
    for key in ("task", "optimizer", "seed", "final_train_loss", "final_val_loss", "steps_to_target",
                "ms_per_step", "diverged", "curve"):
        assert key in run
    assert len(list(out.glob("*.png"))) >= 3
    assert "## Scores" in (out / "report.md").read_text()
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, expect", [
    (["bench", "--tasks", "no-such-task", "--out", "{tmp}"], ["unknown task 'no-such-task'", "digits-mlp"]),
    (["bench", "--optimizers", "no-such-opt", "--out", "{tmp}"], ["unknown optimizer 'no-such-opt'", "adamw"]),
    (["bench", "--steps", "0", "--out", "{tmp}"], ["--steps 0"]),
    (["bench", "--steps", "-5", "--out", "{tmp}"], ["--steps -5"]),
    (["bench", "--seeds", "0", "--out", "{tmp}"], ["--seeds 0"]),
    (["bench", "--suite", "huge", "--out", "{tmp}"], ["unknown suite 'huge'", "quick"]),
    (["bench", "--steps", "ten", "--out", "{tmp}"], ["invalid integer 'ten'"]),
    (["bench"], ["--out"]),
    (["bench", "--out", "{file}/sub"], ["not a writable folder"]),
    (["overhead", "--params", "0"], ["--params 0"]),
    (["overhead", "--optimizers", "nope"], ["unknown optimizer 'nope'"]),
    (["frobnicate"], ["invalid choice"]),
    (["meta-train", "--method", "nope", "--out", "{tmp}"], ["--method 'nope'", "pes"]),
    (["meta-train", "--method", "pes", "--sigma", "0", "--out", "{tmp}"], ["--sigma 0"]),
    (["meta-train", "--method", "pes", "--workers", "0", "--out", "{tmp}"], ["--workers 0"]),
    (["study", "controller-variants", "--variant", "nope", "--out", "{tmp}"], ["--variant 'nope'", "'window 16'"]),
    (["study", "controller-variants", "--seeds", "0", "--out", "{tmp}"], ["--seeds 0"]),
    (["study", "polyak", "--seeds", "5", "--out", "{tmp}"], ["--seeds 5 does not apply to the polyak study",
                                                            "only controller-variants and refit take --seeds"]),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, expect):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = [a.replace("{tmp}", str(tmp_path / "o")).replace("{file}", str(blocker)) for a in args]
    r = nestopt(*args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    for e in expect:
        assert e in r.stderr


def test_listings():
    r = nestopt("tasks")
    assert r.returncode == 0 and "trading-multihorizon" in r.stdout and "bilinear" in r.stdout
    r = nestopt("optimizers")
    assert r.returncode == 0 and "adamw" in r.stdout and "propagate" in r.stdout


def test_overhead_prints_ratio_table(tmp_path):
    r = nestopt("overhead", "--params", "300k", "--steps", "2", "--rounds", "1", "--json", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr
    assert "x AdamW(fused)" in r.stdout and "x SGD(foreach)" in r.stdout
    rows = json.loads((tmp_path / "o.json").read_text())
    names = [row["name"] for row in rows]
    assert names[:2] == ["torch AdamW(fused=True)", "torch SGD(foreach=True)"] and "adamw" in names
    ref = {row["name"]: row for row in rows}
    assert ref["torch AdamW(fused=True)"]["state_floats_per_param"] == pytest.approx(2.0)
    assert ref["torch SGD(foreach=True)"]["state_floats_per_param"] == 0.0


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="SIGINT delivery, /proc")
def test_ctrl_c_writes_the_results_gathered_so_far(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nestopt.cli", "bench", "--tasks", "charlm-transformer",
                             "--optimizers", "sgd", "--seeds", "2", "--steps", "200", "--workers", "2",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # Interrupt once the progress log shows finished runs (a fixed sleep is flaky on a loaded machine).
    lines: list[str] = []
    deadline = time.monotonic() + 180
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("bench: ") and " runs, " in line and not line.startswith("bench: 0/"):
            break
    workers = _children(proc.pid)
    assert workers, "the bench started no worker processes"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 15  # (the resource tracker sees its parent's exit a moment later)
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(w) for w in workers), "a worker process outlived the interrupted bench"
    # An interrupted run writes what it finished to OUT/partial/, never to OUT itself.
    assert not (out / "results.json").exists()
    doc = json.loads((out / "partial" / "results.json").read_text())
    assert doc["complete"] is False
    assert 0 < len(doc["runs"]) < 28
    assert validate(doc) == []
    assert "Interrupted" in (out / "partial" / "report.md").read_text()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nestopt: interrupted: ") and str(out / "partial") in last, last


def test_version_prints_the_package_version():
    import subprocess
    import sys

    from nestopt import __version__

    r = subprocess.run([sys.executable, "-m", "nestopt", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"nestopt {__version__}"


@pytest.mark.parametrize("command", ["optimizers", "tasks"])
def test_a_closed_pipe_ends_the_command_quietly(command):
    # `nestopt optimizers | head -1`: the reader goes away before the listing is written
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "nestopt", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
