"""``nestopt meta-train`` and ``nestopt bench`` under torchrun (gloo on 127.0.0.1): two ranks give
what one process gives, only rank 0 writes, and the rank helpers of :mod:`nestopt._ranks` fall back
to the one-process behaviour without a process group.

Every launch here is bounded by a subprocess timeout (pytest-timeout is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nestopt import _ranks

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 120  # seconds for one launch; each takes a few seconds on two cores
# the smallest meta-training that still moves its particles between ranks: PES, 2 pairs (4 particles)
META = ["meta-train", "--net", "linear", "--families", "quadratic", "--method", "pes", "--pairs", "2",
        "--unroll", "2", "--horizon", "4", "--seed", "3"]
# the smallest bench: one task, one optimizer (and AdamW, always there), one seed, 20 steps
BENCH = ["bench", "--tasks", "quad-scalar", "--optimizers", "sgd", "--seeds", "1", "--steps", "20", "--workers", "1"]
TIMING_FIELDS = ("ms_per_step", "wall_s", "time_to_target_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*_ranks.LAUNCH_VARIABLES, "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nestopt", *args], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT, env=_env())


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "nestopt", *args],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT, env=_env())


def _weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    meta.pop("seconds")  # the only thing that differs: how long it took
    return load_file(str(path)), meta


def _history(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in json.loads(path.read_text())]


def _same_meta_training(a: Path, b: Path) -> None:
    wa, ma = _weights(a / "net.safetensors")
    wb, mb = _weights(b / "net.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs"  # bit for bit
    assert ma == mb
    assert _history(a / "history.json") == _history(b / "history.json")


# -- the helpers in one process ----------------------------------------------------------------------


def test_rank_helpers_fall_back_to_one_process(monkeypatch):
    for v in (*_ranks.LAUNCH_VARIABLES, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert not torch.distributed.is_initialized()
    assert (_ranks.is_distributed(), _ranks.rank(), _ranks.world_size(), _ranks.is_main()) == (False, 0, 1, True)
    obj = {"a": torch.arange(3), "b": [1.5, None]}
    assert _ranks.all_gather(obj) == [obj] and _ranks.gather(obj) == [obj]
    assert _ranks.broadcast(obj) is obj
    _ranks.barrier()
    _ranks.shutdown()  # nothing to shut down: no error
    assert not _ranks.launched() and _ranks.env_rank() == 0 and _ranks.local_world_size() == 1
    assert not _ranks.init_from_env()
    with _ranks.process_group() as ranked:
        assert ranked is False and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not _ranks.launched()  # torchrun --nproc_per_node 1: one process, no group
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is invalid"):
        _ranks.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _ranks.launched() and _ranks.env_rank() == 1 and _ranks.local_world_size() == 2
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT are not"):
        _ranks.init_from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 is invalid with WORLD_SIZE=2"):
        _ranks.init_from_env()
    assert not torch.distributed.is_initialized()


def test_rank_shares_split_every_job_once_by_cost():
    from nestopt.bench import plan
    from nestopt.bench.runner import _cost_hint, rank_shares

    jobs = plan(["quad-scalar", "digits-logreg"], ["sgd"], 2, 20, 2)
    for world in (1, 2, 3, len(jobs) + 2):
        shares = rank_shares(jobs, world)
        assert len(shares) == world
        assert sorted(j.key for s in shares for j in s) == sorted(j.key for j in jobs)
        assert shares == rank_shares(jobs, world)  # every rank computes the same split
    cost = [sum(j.steps * _cost_hint(j.task, j.optimizer) for j in s) for s in rank_shares(jobs, 2)]
    assert max(cost) - min(cost) <= max(j.steps * _cost_hint(j.task, j.optimizer) for j in jobs)


def test_cli_under_a_launch_environment_says_what_is_wrong(monkeypatch, capsys, tmp_path):
    from nestopt import cli

    for v in _ranks.LAUNCH_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["tasks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nestopt: error: tasks does not run under torchrun (WORLD_SIZE=2): only meta-train and bench "
                   "spread over ranks; run it in one process"]
    assert cli.main([*META, "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR, MASTER_PORT are not" in err[0] and "torchrun" in err[0]
    monkeypatch.setenv("RANK", "1")  # every rank meets the error: only rank 0 prints it
    assert cli.main(["tasks"]) == 2
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "o").exists() and not torch.distributed.is_initialized()


# -- two ranks in a process group of this test's own ------------------------------------------------


def _two_rank_unrolls(rank: int, world: int, port: int, out: str) -> None:
    """One rank: the helpers over a real group, and ``Unrolls`` against a one-process run."""
    import torch.distributed as dist

    from nestopt.meta import unrolls as U
    from nestopt.meta.inner import make_inner
    from nestopt.nets import KINDS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report: dict = {}
    try:
        report["helpers"] = (_ranks.is_distributed(), _ranks.rank(), _ranks.world_size(), _ranks.is_main())
        report["all_gather"] = _ranks.all_gather(rank * 10)
        report["gather"] = _ranks.gather(rank + 1)
        report["broadcast"] = _ranks.broadcast("from 0" if rank == 0 else "ignored")
        torch.manual_seed(0)
        net = KINDS["linear"]()
        inner = make_inner(net, "quadratic", 3)
        flat = torch.nn.utils.parameters_to_vector(list(net.parameters())).detach()
        gen = torch.Generator().manual_seed(1)
        snap = inner.snapshot()
        specs = [(flat + 0.01 * torch.randn(flat.shape, generator=gen), snap) for _ in range(5)]
        batches = inner.draw(2)
        ran = []
        one_unroll = U._unroll_one

        def counted(*a, **k):
            ran.append(1)
            return one_unroll(*a, **k)

        U._unroll_one = counted
        with U.Unrolls() as spread:
            got = spread.run(net, inner, specs, 2, batches)
        report["ran_here"] = len(ran)
        U._unroll_one = one_unroll
        inner.restore(snap)
        want = U.Unrolls(ranks=False).run(net, inner, specs, 2, batches)
        same = len(got) == len(want)
        for (lg, losses_g, end_g), (lw, losses_w, end_w) in zip(got, want):
            same &= lg == lw and losses_g == losses_w
            same &= all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(end_g),
                                                          torch.utils._pytree.tree_leaves(end_w))
                        if isinstance(a, torch.Tensor))
        report["same"] = bool(same)
        inner.restore(snap)
        try:  # rank 1 runs a batch of another size: both ranks say so
            U.Unrolls().run(net, inner, specs[:4] if rank else specs, 2, batches)
            report["mismatch"] = None
        except RuntimeError as e:
            report["mismatch"] = str(e)
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def test_unrolls_spread_over_two_ranks_give_the_one_process_results(tmp_path):
    import torch.multiprocessing as tmp

    ctx = tmp.start_processes(_two_rank_unrolls, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                              start_method="spawn")
    while not ctx.join(timeout=LAUNCH_TIMEOUT):
        pass
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["helpers"] == [True, r, 2, r == 0]
        assert rep["all_gather"] == [0, 10]
        assert rep["gather"] == ([1, 2] if r == 0 else None)
        assert rep["broadcast"] == "from 0"
        assert rep["same"], f"rank {r}: the spread unrolls differ from one process's"
        assert "ran another batch of unrolls" in rep["mismatch"]
    assert [rep["ran_here"] for rep in reports] == [3, 2]  # unroll i on rank i % 2


# -- torchrun launches of the command line -----------------------------------------------------------


def test_torchrun_meta_train_writes_the_one_process_weights(tmp_path):
    r1 = one_process(*META, "--steps", "4", "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(*META, "--steps", "4", "--out", str(tmp_path / "two"))
    assert r2.returncode == 0, r2.stderr + r2.stdout
    _same_meta_training(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert r2.stderr.count("meta-train 4/4") == 1, r2.stderr  # rank 0 alone reports
    assert r2.stdout.count("wrote") == 1, r2.stdout
    assert "Traceback" not in r2.stderr


def test_torchrun_meta_train_resumes_like_one_process(tmp_path):
    first = one_process(*META, "--steps", "2", "--out", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    r1 = one_process(*META, "--steps", "4", "--resume", "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(*META, "--steps", "4", "--resume", "--out", str(tmp_path / "two"))
    assert r2.returncode == 0, r2.stderr + r2.stdout
    assert r2.stderr.count("resuming from step 2 of 4") == 1, r2.stderr
    _same_meta_training(tmp_path / "one", tmp_path / "two")


def test_torchrun_meta_train_refuses_what_does_not_spread(tmp_path):
    r = torchrun("meta-train", "--net", "linear", "--families", "quadratic", "--steps", "1", "--unroll", "2",
                 "--horizon", "4", "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    line = "nestopt: error: --method tbptt is invalid under torchrun (2 ranks): only es and pes spread"
    assert r.stderr.count(line) == 1, r.stderr  # one line, from rank 0
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _records(doc: dict) -> list[dict]:
    out = []
    for run in doc["runs"]:
        run = {k: v for k, v in run.items() if k not in TIMING_FIELDS}
        run["curve"] = {k: v for k, v in run["curve"].items() if k != "time_s"}
        out.append(run)
    return out


def test_torchrun_bench_writes_one_result_like_one_process(tmp_path):
    r1 = one_process(*BENCH, "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(*BENCH, "--out", str(tmp_path / "two"))
    assert r2.returncode == 0, r2.stderr + r2.stdout
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["complete"] and len(two["runs"]) == len(one["runs"]) > 1
    assert _records(two) == _records(one)  # the same runs, in the same order, but for their timings
    for key in ("targets", "chosen_lr"):
        assert two["summary"][key] == one["summary"][key]
    assert two["summary"]["ratios"]["steps"] == one["summary"]["ratios"]["steps"]
    assert two["summary"]["scores"]["steps"] == one["summary"]["scores"]["steps"]
    assert {k: v for k, v in two["config"].items() if k != "command"} == \
        {k: v for k, v in one["config"].items() if k != "command"}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(list(tmp_path.rglob("results.json"))) == 2  # one each: rank 1 wrote none
    assert (r2.stdout + r2.stderr).count("; wrote") == 1, r2.stderr  # rank 0 alone reports (the path may wrap)
