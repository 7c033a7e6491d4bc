"""The two-process runs behind ``tests/test_distributed.py`` (launched there with torchrun, gloo
on 127.0.0.1). Each rank writes what it measured to ``OUT/rank{r}.pt``; the test asserts on it.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_worker.py {all|ddp|fsdp|dcp|fsdp_dcp} OUT
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nestopt.optim import (ComplexAdam, ComplexMomentum, HypergradientAdam, HypergradientSGD, LearnedOptimizer,
                           MuonAdamW, NestedOptimizer, Polyak, PolyakAdam, muon_param_groups)
from nestopt.nets.update import HybridAdamNet


def _nested(**kw):
    return lambda m, pg: NestedOptimizer(m.parameters(), lr=1e-2, process_group=pg, **kw)


# every optimizer of nestopt.optim, with the settings that change what a step reads
MAKERS = {
    "polyak": lambda m, pg: Polyak(m.parameters(), process_group=pg),
    "polyak-tensor": lambda m, pg: Polyak(m.parameters(), scope="tensor", momentum=0.5, process_group=pg),
    "polyak-group": lambda m, pg: Polyak([{"params": list(m.parameters())[:2]}, {"params": list(m.parameters())[2:]}],
                                         scope="group", process_group=pg),
    "polyak-rms": lambda m, pg: Polyak(m.parameters(), precondition="rms", lr=0.3, process_group=pg),
    "polyak-hutchinson": lambda m, pg: Polyak(m.parameters(), precondition="hutchinson", lr=0.3, process_group=pg),
    "polyak-adam": lambda m, pg: PolyakAdam(m.parameters(), lr=0.3, process_group=pg),
    "hypergradient-adam": lambda m, pg: HypergradientAdam(m.parameters(), lr=1e-2, process_group=pg),
    "hypergradient-sgd": lambda m, pg: HypergradientSGD(m.parameters(), lr=1e-2, process_group=pg),
    "learned": lambda m, pg: LearnedOptimizer(m.parameters(), compile=False, process_group=pg),
    "learned-mlp": lambda m, pg: LearnedOptimizer(m.parameters(), net="mlp", process_group=pg),
    "learned-hybrid": lambda m, pg: LearnedOptimizer(m.parameters(), net=HybridAdamNet(), process_group=pg),
    "nested-hindsight": _nested(window=2, period=6),
    "nested-proxy": _nested(signal="proxy"),
    "nested-validation": _nested(signal="validation"),
    "nested-frozen": _nested(signal="frozen"),
    "nested-curvature": _nested(signal="frozen", features=("grad_norm", "curvature", "loss")),
    "complex-momentum": lambda m, pg: ComplexMomentum(m.parameters(), lr=1e-2, process_group=pg),
    "complex-adam": lambda m, pg: ComplexAdam(m.parameters(), lr=1e-2, process_group=pg),
    "muon": lambda m, pg: MuonAdamW(muon_param_groups(m), lr=1e-2, process_group=pg),
}
CREATE_GRAPH = {"polyak-hutchinson"}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(step: int, rank: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x[:, :2] * 2) + 0.1 * torch.randn(n, 2, generator=g)


def flat(m: nn.Module) -> torch.Tensor:
    out = []
    for p in m.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(p.detach().reshape(-1).clone())
    return torch.cat(out)


def train(name: str, net: nn.Module, opt: torch.optim.Optimizer, steps: int, data) -> None:
    """``steps`` steps with a closure on ``data(step)``; the nested validation signal also gets a
    validation loss from each rank's own batch every 5 steps."""
    for t in range(steps):
        x, y = data(t)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward(create_graph=name in CREATE_GRAPH)
            return loss

        opt.step(closure)
        if name in CREATE_GRAPH:
            for p in net.parameters():
                p.grad = None
        if name == "nested-validation" and t % 5 == 4:
            vx, vy = data(10_000 + t)
            with torch.no_grad():
                opt.observe_validation(nn.functional.mse_loss(net(vx), vy))


def ddp(out: Path, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    for name, make in MAKERS.items():
        for pg in ("auto", None):
            if pg is None and name not in ("polyak", "nested-hindsight"):
                continue  # the controls: the drift the sync prevents
            net = DDP(model())
            opt = make(net.module, pg)
            t0 = time.perf_counter()
            try:
                train(name, net, opt, 70, lambda t: batch(t, rank))
                res[(name, pg)] = {"params": flat(net.module), "s": time.perf_counter() - t0,
                                   "calls": getattr(opt.__dict__.get("_sync"), "calls", 0)}
            except Exception as e:  # recorded: the test names it
                res[(name, pg)] = {"error": f"{type(e).__name__}: {e}"}
    # an explicit group syncs as "auto" does
    net = DDP(model())
    opt = Polyak(net.module.parameters(), process_group=dist.new_group(list(range(dist.get_world_size()))))
    train("polyak", net, opt, 70, lambda t: batch(t, rank))
    res["explicit-group"] = {"params": flat(net.module), "s": 0.0, "calls": opt.__dict__["_sync"].calls}
    # separate models on each rank (no DDP, other weights): "auto" sees it and stays per-rank,
    # so the run equals one with process_group=None
    runs = []
    for pg in ("auto", None):
        net = model(seed=rank)
        opt = Polyak(net.parameters(), process_group=pg)
        train("polyak", net, opt, 10, lambda t: batch(t, rank))
        runs.append(flat(net))
    res["unreplicated"] = {"same_as_per_rank": torch.equal(runs[0], runs[1]), "sync": opt.__dict__.get("_sync")}
    return res


def fsdp(out: Path, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nestopt.optim.distributed import per_rank

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    world = dist.get_world_size()

    def global_batch(t: int):  # both ranks' batches: what the single-process reference trains on
        xs, ys = zip(*(batch(t, r) for r in range(world)))
        return torch.cat(xs), torch.cat(ys)

    res: dict = {}
    for name, make in MAKERS.items():
        ref = model()
        with per_rank():  # the one-process reference, on the global batches
            train(name, ref, make(ref, None), 20, global_batch)
        net = model()
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        try:
            opt = make(net, "auto")
            train(name, net, opt, 20, lambda t: batch(t, rank))
            a, b = flat(net), flat(ref)
            res[name] = {"rel": float((a - b).abs().max() / b.abs().max()), "params": a}
        except NotImplementedError as e:
            res[name] = {"documented": str(e)}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


def dcp(out: Path, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    for name, make in MAKERS.items():
        if name in CREATE_GRAPH:
            continue  # it cannot run data-parallel (and DCP takes plain tensors as replicated): one process tests it
        wrap, pg = DDP, "auto"
        try:
            net = wrap(model())
            opt = make(getattr(net, "module", net), pg)
            train(name, net, opt, 9, lambda t: batch(t, rank))
            where = out / f"ckpt-{name}"
            m1 = getattr(net, "module", net)
            dcp_.save({"model": m1.state_dict(), "optim": get_optimizer_state_dict(m1, opt)},
                      checkpoint_id=str(where))
            net2 = wrap(model(seed=5))  # other weights: the load must bring them back
            m2 = getattr(net2, "module", net2)
            opt2 = make(m2, pg)
            state = {"model": m2.state_dict(), "optim": get_optimizer_state_dict(m2, opt2)}
            dcp_.load(state, checkpoint_id=str(where))
            m2.load_state_dict(state["model"])
            set_optimizer_state_dict(m2, opt2, state["optim"])
            # the control: the same weights with a fresh optimizer (what a lost optimizer state gives)
            net3 = wrap(model(seed=5))
            m3 = getattr(net3, "module", net3)
            m3.load_state_dict(state["model"])
            opt3 = make(m3, pg)
            for n_, o_ in ((net, opt), (net2, opt2), (net3, opt3)):
                train(name, n_, o_, 9, lambda t: batch(100 + t, rank))
            a, b, c = (flat(getattr(n_, "module", n_)) for n_ in (net, net2, net3))
            res[name] = {"same": torch.equal(a, b), "fresh_differs": not torch.equal(a, c)}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


def fsdp_dcp(out: Path, rank: int, refused: tuple[str, ...] = ()) -> dict:
    """DCP of sharded state: FSDP2 models, ``get/set_model_state_dict`` and ``get/set_optimizer_state_dict``
    (the optimizer state is DTensors, the nested optimizer's hindsight window open when saved)."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sharded(seed: int) -> nn.Module:
        net = model(seed)
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(net, mesh=mesh)

    res: dict = {}
    for name, make in MAKERS.items():
        if name in FSDP_REFUSED:
            continue
        try:
            net, opt = (lambda n: (n, make(n, "auto")))(sharded(0))
            train(name, net, opt, 5, lambda t: batch(t, rank))
            where = str(out / f"fsdp-ckpt-{name}")
            dcp_.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=where)
            net2 = sharded(5)
            opt2 = make(net2, "auto")
            state = {"model": get_model_state_dict(net2), "optim": get_optimizer_state_dict(net2, opt2)}
            dcp_.load(state, checkpoint_id=where)
            set_model_state_dict(net2, state["model"])
            set_optimizer_state_dict(net2, opt2, state["optim"])
            for n_, o_ in ((net, opt), (net2, opt2)):
                train(name, n_, o_, 7, lambda t: batch(100 + t, rank))
            res[name] = {"same": torch.equal(flat(net), flat(net2))}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


# what cannot run sharded (the documented errors; tests/test_distributed.py checks their words)
FSDP_REFUSED = ("polyak-hutchinson", "learned-mlp", "complex-momentum", "complex-adam", "muon", "nested-curvature")


def main() -> None:
    what, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for name in (("ddp", "fsdp", "dcp", "fsdp_dcp") if what == "all" else (what,)):
            res = {"ddp": ddp, "fsdp": fsdp, "dcp": dcp, "fsdp_dcp": fsdp_dcp}[name](out, rank)
            torch.save(res, out / f"{name}-rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
