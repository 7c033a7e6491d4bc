"""Outputs that never lose work, stops that are clean, and one-line CLI errors (issue 21).

- ``bench``, ``study`` and ``meta-train`` refuse a non-empty ``--out`` without ``--force``
  (``--resume`` for meta-train), and take it with ``--force``; an empty existing folder is fine;
- a rerun with ``--force`` replaces the whole older result (no figure of two runs mixes);
- an interrupted run never replaces a complete result: what it finished goes to ``OUT/partial/``;
- an interrupted study keeps its finished parts (a real SIGTERM sent from here);
- a background job (SIGINT ignored, as a shell starts one) still stops on SIGINT, with exit 130;
- a bad CLI input is exit 2 and one line on stderr naming the value;
- ``run_bench`` from a script without a main guard stops at once with the guard named.

Most cases run ``nestopt.cli.main`` in this process with the commands' work replaced by a stub
(:func:`no_work`): fast, and a check that fails cannot start minutes of work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nestopt import cli

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


class Started(Exception):
    """Raised by a stubbed command body: the command got past its checks."""


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work replaced by ``Started``."""
    import nestopt.bench
    import nestopt.bench.overhead
    import nestopt.meta
    from nestopt.studies import registry

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(nestopt.bench, "run_bench", started)
    monkeypatch.setattr(nestopt.meta, "meta_train", started)
    monkeypatch.setattr(nestopt.bench.overhead, "measure", started)
    for name, study in list(registry._STUDIES.items()):
        monkeypatch.setitem(registry._STUDIES, name, dataclasses.replace(study, run=started))


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


COMMANDS = {
    "bench": ["bench", "--tasks", "quad-asym", "--optimizers", "sgd", "--seeds", "1", "--steps", "5", "--workers", "1"],
    "study": ["study", "polyak"],
    "meta-train": ["meta-train", "--net", "linear", "--steps", "2", "--unroll", "2", "--horizon", "4"],
}


# -- refusing a non-empty --out -------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_a_non_empty_out_is_refused_without_force(tmp_path, capsys, no_work, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"complete": true}')
    before = _snapshot(out)
    rc, _, err = run(capsys, *COMMANDS[command], "--out", out)
    line = one_line(err)
    assert rc == 2 and "--force" in line and str(out) in line and "not empty" in line, line
    assert _snapshot(out) == before


def test_meta_train_names_resume_for_a_folder_with_a_checkpoint(tmp_path, capsys, no_work):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    rc, _, err = run(capsys, *COMMANDS["meta-train"], "--out", tmp_path)
    line = one_line(err)
    assert rc == 2 and "--resume" in line and "--force" in line, line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("folder", ["empty", "forced"])
def test_an_empty_folder_or_force_is_accepted(tmp_path, capsys, no_work, command, folder):
    out = tmp_path / "out"
    out.mkdir()
    extra = []
    if folder == "forced":
        (out / "results.json").write_text('{"complete": true}')
        extra = ["--force"]
    with pytest.raises(Started):
        run(capsys, *COMMANDS[command], "--out", out, *extra)
    if folder == "forced":  # a run that never finished leaves the old result as it was
        assert (out / "results.json").read_text() == '{"complete": true}'


# -- bench: a rerun replaces the whole result; an interrupted one replaces nothing ----------------

BENCH = ["bench", "--optimizers", "sgd", "--seeds", "1", "--steps", "12", "--workers", "1"]


@pytest.fixture(scope="module")
def complete_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    assert cli.main([*BENCH, "--tasks", "quad-asym", "--out", str(out)]) == 0
    assert (out / "curves_quad-asym.png").is_file()
    return out


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_bench_with_force_replaces_every_file_of_the_older_result(tmp_path, capsys, complete_bench):
    out = _copy(complete_bench, tmp_path / "out")
    (out / "notes.txt").write_text("mine")  # not a bench file: stays
    rc, _, err = run(capsys, *BENCH, "--tasks", "quad-sym", "--out", out, "--force")
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and doc["config"]["tasks"] == ["quad-sym"]
    assert (out / "curves_quad-sym.png").is_file()
    assert not (out / "curves_quad-asym.png").exists(), "a figure of the older run stayed beside the new ones"
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "partial").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".nestopt-stage-")]


def test_an_interrupted_bench_keeps_the_complete_result_and_writes_partial(tmp_path, capsys, complete_bench,
                                                                           monkeypatch):
    from nestopt.bench import runner

    out = _copy(complete_bench, tmp_path / "out")
    before = _snapshot(out)
    real, calls = runner.run_job, []

    def run_job(job):  # Ctrl-C during the third run
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(runner, "run_job", run_job)
    rc, _, err = run(capsys, *BENCH, "--tasks", "quad-sym", "--out", out, "--force")
    assert rc == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("nestopt: interrupted: ") and str(out / "partial") in last, last
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("partial")} == before
    partial = json.loads((out / "partial" / "results.json").read_text())
    assert partial["complete"] is False and len(partial["runs"]) == 2
    assert (out / "partial" / "report.md").is_file()


# -- studies and meta-train stopped by real signals -----------------------------------------------

def _start(args: list[str], ignore_sigint: bool = False) -> subprocess.Popen:
    def background():  # what a non-interactive shell does for `cmd &`
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", "nestopt.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=background if ignore_sigint else None)


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if pattern in line:
            return lines
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}: {''.join(lines)}")


@POSIX
def test_an_interrupted_study_keeps_its_finished_parts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"complete": true}')
    (out / "report.md").write_text("# the complete result")
    before = _snapshot(out)
    proc = _start(["study", "polyak", "--out", str(out), "--force"])
    lines = _wait_for(proc, "part exp1-float64 finished")
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    err = "".join(lines) + rest
    assert proc.returncode == 143, err  # 128 + SIGTERM, the shell's convention
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nestopt: interrupted: ") and str(out / "partial") in last, last
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("partial")} == before
    part = json.loads((out / "partial" / "parts" / "exp1-float64.json").read_text())
    assert part["part"] == "exp1-float64"
    assert part["record"] and all(r["experiment"] == "exp1" for r in part["record"])
    status = json.loads((out / "partial" / "status.json").read_text())
    assert status["complete"] is False and "exp1-float64" in status["parts"]


@POSIX
def test_a_background_meta_train_stops_on_sigint_and_resumes_from_its_last_step(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["meta-train", "--net", "linear", "--families", "quadratic", "--unroll", "2", "--horizon", "4"]
    proc = _start([*args, "--steps", "10000", "--out", str(out)], ignore_sigint=True)
    lines = _wait_for(proc, "meta-train 500/10000")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nestopt: interrupted: at step ") and "--resume" in last, last
    step = int(last.split("at step ")[1].split()[0])
    assert 500 <= step < 10000
    history = json.loads((out / "partial" / "history.json").read_text())
    assert history[-1]["step"] == step  # the checkpoint and partial/ hold the same last step
    assert (out / "partial" / "net.safetensors").is_file()
    rc, _, err = run(capsys, *args, "--steps", str(step + 2), "--out", out, "--resume")
    assert rc == 0, err
    assert f"resuming from step {step} of {step + 2}" in err
    assert len(json.loads((out / "history.json").read_text())) == step + 2
    assert not (out / "partial").exists()  # the complete result replaced the stale partial one


# -- meta-train --resume with a checkpoint it cannot use ------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "out"
    assert cli.main(["meta-train", "--net", "linear", "--families", "quadratic", "--steps", "2", "--unroll", "2",
                     "--horizon", "4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case, expect", [
    ("corrupt", "is damaged"),
    ("other-net", "another network"),
    ("other-settings", "other settings"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys, checkpoint, case, expect):
    out = _copy(checkpoint, tmp_path / "out")
    args = ["meta-train", "--net", "linear", "--families", "quadratic", "--steps", "4", "--unroll", "2",
            "--horizon", "4", "--resume", "--out", str(out)]
    if case == "corrupt":
        (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    elif case == "other-net":
        args[2] = "mlp"
    else:
        args[4] = "quadratic,teacher-mlp"
    rc, _, err = run(capsys, *args)
    line = one_line(err)
    assert rc == 2 and "--resume" in line and str(out / "checkpoint.pt") in line and expect in line, line


# -- overhead: checked up front, and an interrupted one keeps what it measured --------------------

def test_an_interrupted_overhead_writes_its_rows_to_partial(tmp_path, capsys, monkeypatch):
    from nestopt.bench import overhead

    def interrupt(params):
        raise KeyboardInterrupt

    monkeypatch.setitem(overhead.REFERENCES, "torch SGD(momentum=0.9, foreach=True)", interrupt)
    target = tmp_path / "o.json"
    rc, out, err = run(capsys, "overhead", "--params", "20k", "--steps", "1", "--rounds", "1", "--optimizers", "sgd",
                       "--json", target)
    assert rc == 130, err
    assert not target.exists()
    rows = json.loads((tmp_path / "partial" / "o.json").read_text())
    assert [r["name"] for r in rows] == ["torch AdamW(fused=True)", "torch SGD(foreach=True)"]
    assert "torch AdamW(fused=True)" in out
    assert str(tmp_path / "partial" / "o.json") in one_line(err)


# -- one-line errors ------------------------------------------------------------------------------

BAD = [
    (["meta-train", "--families", "", "--out", "{new}"], ["--family ''", "quadratic"]),
    (["meta-train", "--families", ",", "--out", "{new}"], ["--family ','", "quadratic"]),
    (["overhead", "--params", "inf"], ["--params", "'inf'", "finite"]),
    (["overhead", "--params", "nan"], ["--params", "'nan'"]),
    (["overhead", "--params", "1e30"], ["--params 1e+30", "at most"]),
    (["overhead", "--params", "-5"], ["--params -5"]),
    (["overhead", "--json", "{missing}/x.json"], ["--json", "does not exist"]),
    (["overhead", "--json", "{old}/results.json"], ["--json", "exists", "--force"]),
    (["overhead", "--steps", "0"], ["--steps 0"]),
    (["overhead", "--rounds", "-1"], ["--rounds -1"]),
    (["overhead", "--device", "cuda:x"], ["--device 'cuda:x'"]),
    (["overhead", "--optimizers", ","], ["--optimizers ','", "adamw"]),
    (["bench", "--tasks", ",", "--out", "{new}"], ["--tasks ','", "quad-asym"]),
    (["bench", "--optimizers", "", "--out", "{new}"], ["--optimizers ''", "adamw"]),
    (["bench", "--workers", "0", "--out", "{new}"], ["--workers 0"]),
    (["bench", "--workers", "-2", "--out", "{new}"], ["--workers -2"]),
    (["bench", "--seeds", "-1", "--out", "{new}"], ["--seeds -1"]),
    (["bench", "--seeds", "1000000000", "--out", "{new}"], ["--seeds 1000000000", "at most"]),
    (["bench", "--steps", "1.5", "--out", "{new}"], ["--steps", "'1.5'"]),
    (["bench", "--out", ""], ["--out ''"]),
    (["study", "polyak", "--peer", "prodigy", "--out", "{new}"], ["--peer 'prodigy'", "polyak", "only learned takes"]),
    (["study", "learned", "--variant", "window 16", "--out", "{new}"], ["--variant 'window 16'",
                                                                        "only controller-variants takes"]),
    (["study", "nope", "--out", "{new}"], ["unknown study 'nope'", "polyak"]),
    (["meta-train", "--steps", "0", "--out", "{new}"], ["--steps 0"]),
    (["meta-train", "--horizon", "-1", "--out", "{new}"], ["--horizon -1"]),
    (["meta-train", "--seed", "-1", "--out", "{new}"], ["--seed -1"]),
    (["meta-train", "--seed", str(2**70), "--out", "{new}"], [f"--seed {2**70}"]),
    (["meta-train", "--sigma", "nan", "--method", "es", "--out", "{new}"], ["--sigma nan"]),
    (["meta-train", "--net", "nope", "--out", "{new}"], ["--net 'nope'", "hybrid"]),
    (["meta-train", "--resume", "--out", "{old}"], ["--resume", "no checkpoint.pt", "--force"]),
    (["bench", "--bogus", "--out", "{new}"], ["--bogus"]),
]


@pytest.mark.parametrize("args, expect", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_a_bad_input_is_one_line_exit_2(tmp_path, capsys, no_work, args, expect):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text("{}")
    fill = {"{new}": str(tmp_path / "new"), "{old}": str(old), "{missing}": str(tmp_path / "missing")}
    for k, v in fill.items():
        args = [a.replace(k, v) for a in args]
    rc, _, err = run(capsys, *args)
    line = one_line(err)
    assert rc == 2, (rc, err)
    assert line.startswith("nestopt: error: ")
    for e in expect:
        assert e in line, (e, line)


# -- run_bench from a script without a main guard -------------------------------------------------

def test_run_bench_without_a_main_guard_stops_at_once_and_names_the_guard(tmp_path):
    script = tmp_path / "bench_script.py"
    script.write_text(textwrap.dedent(f"""
        from nestopt.bench import run_bench

        run_bench(tasks=["quad-asym"], optimizers=["sgd"], seeds=1, steps=5, out={str(tmp_path / "out")!r}, workers=2)
        print("finished")
    """))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert r.returncode != 0 and "finished" not in r.stdout
    assert 'if __name__ == "__main__":' in r.stderr
    assert "bootstrapping phase" not in r.stderr  # stopped by nestopt, before multiprocessing's own traceback
    assert time.monotonic() - t0 < 150


def test_an_abbreviated_option_is_refused_not_guessed(tmp_path, capsys):
    from nestopt import cli

    assert cli.main(["bench", "--suit", "quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--suit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
