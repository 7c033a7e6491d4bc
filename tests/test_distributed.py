"""Every nestopt optimizer over two processes (gloo on 127.0.0.1, launched by torchrun, bounded
steps and time): DDP keeps the ranks bitwise identical, FSDP2 equals one process on the global
batches (or raises the documented error), torch's distributed-checkpoint helpers round-trip the
state; and, in one process, copies, pickles and the steps torch's helpers make.

The two-process runs live in ``tests/_dist_worker.py``; each scenario runs once per test session.
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402

from nestopt.optim import Polyak  # noqa: E402
from nestopt.optim.distributed import check_process_group, per_rank, resolve  # noqa: E402

NAMES = list(W.MAKERS)
# what cannot run sharded, and the documented error's words
FSDP_REFUSED = {"polyak-hutchinson": "cannot run data-parallel", "learned-mlp": "does not support FSDP2",
                "complex-momentum": "does not support FSDP2", "complex-adam": "does not support FSDP2",
                "muon": "Newton-Schulz needs each whole matrix", "nested-curvature": "'curvature' feature"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(Path(W.__file__)), "all", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three two-process scenarios, in one torchrun launch (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    _launch(out)
    return out


def _load(out: Path, what: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{what}-rank{i}.pt", weights_only=False) for i in (0, 1))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def ddp(runs):
    return _load(runs, "ddp")


@pytest.fixture(scope="module")
def fsdp(runs):
    return _load(runs, "fsdp")


@pytest.fixture(scope="module")
def dcp(runs):
    return _load(runs, "dcp")


# -- DDP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_ddp_keeps_the_ranks_bitwise_identical_over_70_steps_with_different_data(ddp, name):
    r0, r1 = ddp[0][(name, "auto")], ddp[1][(name, "auto")]
    if name == "polyak-hutchinson":  # DDP refuses create_graph: the optimizer says so first
        assert "cannot run data-parallel" in r0["error"] and r0["error"].startswith("NotImplementedError")
        return
    assert "error" not in r0, r0.get("error")
    assert torch.equal(r0["params"], r1["params"])


@pytest.mark.parametrize("name", ["polyak", "nested-hindsight"])
def test_without_the_sync_the_ranks_drift_apart(ddp, name):
    # the control: what the sync prevents (each rank's own loss, or its own replay scores)
    assert not torch.equal(ddp[0][(name, None)]["params"], ddp[1][(name, None)]["params"])


def test_one_collective_per_step_and_one_per_replay(ddp):
    r = ddp[0]
    assert r[("polyak", "auto")]["calls"] == 70  # the loss (with the first step's replication check)
    assert r[("nested-frozen", "auto")]["calls"] == 70
    assert r[("nested-hindsight", "auto")]["calls"] == 70 + 70 // 6  # a replay every 6 steps
    assert r[("hypergradient-adam", "auto")]["calls"] == 0  # nothing rank-local: no collective at all


def test_an_explicit_group_syncs_and_separate_models_stay_per_rank(ddp):
    assert torch.equal(ddp[0]["explicit-group"]["params"], ddp[1]["explicit-group"]["params"])
    assert ddp[0]["explicit-group"]["calls"] == 70
    for r in ddp:
        assert r["unreplicated"]["same_as_per_rank"] and r["unreplicated"]["sync"] is None


# -- FSDP2 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_equals_one_process_on_the_global_batches_or_raises_the_documented_error(fsdp, name):
    r0, r1 = fsdp[0][name], fsdp[1][name]
    assert "error" not in r0, r0.get("error")
    if name in FSDP_REFUSED:
        assert FSDP_REFUSED[name] in r0["documented"]
        return
    assert "documented" not in r0, r0.get("documented")
    assert r0["rel"] < 1e-5 and r1["rel"] < 1e-5
    assert torch.equal(r0["params"], r1["params"])


# -- torch.distributed.checkpoint -------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if n not in W.CREATE_GRAPH])
def test_dcp_save_and_load_through_get_and_set_optimizer_state_dict_continue_bitwise(dcp, name):
    for r in dcp:
        assert "error" not in r[name], r[name].get("error")
        assert r[name]["same"]
    if name in ("polyak-adam", "hypergradient-adam", "nested-hindsight", "learned", "complex-adam"):
        assert dcp[0][name]["fresh_differs"]  # the control: the loaded state is what continues the run


@pytest.fixture(scope="module")
def fsdp_dcp(runs):
    return _load(runs, "fsdp_dcp")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in FSDP_REFUSED])
def test_dcp_of_sharded_state_continues_bitwise(fsdp_dcp, name):
    for r in fsdp_dcp:
        assert "error" not in r[name], r[name].get("error")
        assert r[name]["same"]


def test_the_worker_and_the_test_agree_on_what_fsdp2_refuses():
    assert set(W.FSDP_REFUSED) == set(FSDP_REFUSED)


# -- one process ---------------------------------------------------------------------------------
def _data(t: int):
    return W.batch(t, 0)


@pytest.mark.parametrize("name", NAMES)
def test_dcp_round_trip_in_one_process(name, tmp_path):
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    net = W.model()
    opt = W.MAKERS[name](net, None)
    W.train(name, net, opt, 9, _data)
    dcp_.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(tmp_path))
    net2 = W.model()
    net2.load_state_dict(net.state_dict())
    opt2 = W.MAKERS[name](net2, None)
    state = {"optim": get_optimizer_state_dict(net2, opt2)}  # a fresh optimizer's template
    dcp_.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(net2, opt2, state["optim"])
    W.train(name, net, opt, 5, lambda t: _data(100 + t))
    W.train(name, net2, opt2, 5, lambda t: _data(100 + t))
    assert torch.equal(W.flat(net), W.flat(net2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_as_the_original_does(name, how):
    net = W.model()
    opt = W.MAKERS[name](net, "auto")
    W.train(name, net, opt, 7, _data)
    net2, opt2 = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    W.train(name, net, opt, 8, lambda t: _data(50 + t))
    W.train(name, net2, opt2, 8, lambda t: _data(50 + t))
    assert torch.equal(W.flat(net), W.flat(net2))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_without_gradients_or_loss_does_nothing(name):
    net = W.model()
    opt = W.MAKERS[name](net, "auto")
    before = W.flat(net)
    assert opt.step() is None
    assert torch.equal(W.flat(net), before) and not opt.state


@pytest.mark.parametrize("name", ["polyak", "polyak-tensor", "polyak-rms", "polyak-adam", "nested-hindsight",
                                  "nested-proxy"])
def test_zero_gradients_without_a_loss_only_make_the_state(name):
    # what torch's get_optimizer_state_dict does to a fresh optimizer: zero gradients, lr 0, step()
    net = W.model()
    opt = W.MAKERS[name](net, "auto")
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before = W.flat(net)
    counts = dict(opt.counters) if hasattr(opt, "counters") else None
    opt.step()
    assert torch.equal(W.flat(net), before)
    if counts is not None:
        assert dict(opt.counters) == counts  # not a step: nothing counted
    if name != "polyak":  # Polyak's plain rule keeps no per-parameter state
        assert len(opt.state) == len(list(net.parameters()))


def test_polyak_still_needs_the_loss_when_gradients_are_there():
    net = W.model()
    opt = Polyak(net.parameters())
    nn.functional.mse_loss(net(_data(0)[0]), _data(0)[1]).backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


def test_process_group_is_checked():
    assert check_process_group(None) is None and check_process_group("auto") == "auto"
    with pytest.raises(ValueError, match=r"process_group=3 is invalid: expected 'auto', None, or a torch.distributed"):
        Polyak(W.model().parameters(), process_group=3)
    opt = Polyak(W.model().parameters())
    with pytest.raises(ValueError, match="process_group='world' is invalid"):
        opt.process_group = "world"


def test_without_a_process_group_nothing_syncs():
    opt = Polyak(W.model().parameters())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert resolve(opt, params) is None
    with per_rank():
        assert resolve(opt, params) is None


# -- nestopt overhead --processes ----------------------------------------------------------------
def test_overhead_processes_measures_the_collectives(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "nestopt", "overhead", "--processes", "2", "--params", "20k", "--steps",
                        "2", "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    doc = json.loads(out.read_text())
    rows = {row["name"]: row for row in doc["rows"]}
    assert doc["processes"] == 2 and doc["n_params"] == 20_000
    assert rows["polyak"]["collectives_per_step"] == 1.0 and rows["nested-adamw (frozen)"]["collectives_per_step"] == 1.0
    assert rows["adamw-hd"]["collectives_per_step"] == 0.0 and rows["learned"]["collectives_per_step"] == 0.0
    assert all(row["synced_ms"] > 0 and row["per_rank_ms"] > 0 for row in rows.values())
    assert "the added cost of the collectives" in r.stdout


@pytest.mark.parametrize("argv, words", [(["--processes", "1"], "--processes 1 is invalid: expected 2 to 64"),
                                         (["--processes", "2", "--optimizers", "polyak"], "drop --device and --optimizers")])
def test_overhead_processes_refuses_bad_input(argv, words, capsys):
    from nestopt.cli import main

    assert main(["overhead", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
