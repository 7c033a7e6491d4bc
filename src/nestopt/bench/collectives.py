"""``nestopt overhead --processes N``: what keeping the ranks identical costs each optimizer.

``N`` processes (gloo on 127.0.0.1, one CPU thread each where the cores allow it) hold the same
synthetic model as ``nestopt overhead`` (replicated, as under DDP, with fixed gradients), and time
each nestopt optimizer's step twice, interleaved round by round: synced (``process_group="auto"``:
the loss averaged, replay scores and validation values too, one small collective per step or per
replay; see :mod:`nestopt.optim.distributed`) and per-rank (inside
:func:`~nestopt.optim.distributed.per_rank`: no collective). The difference is the added cost;
``collectives/step`` counts them. A bare ``all_gather`` of the same small vector is timed beside
them. Each number is rank 0's median over rounds of the mean step time in a round.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._checks import check_int

# the optimizers whose synced step differs from the per-rank one, and the others, which have
# nothing rank-local to average under DDP (they show 0 collectives)
NAMES = ("polyak", "polyak-tensor", "polyak-adam", "nested-adamw", "nested-adamw (frozen)", "adamw-hd", "sgd-hd",
         "learned", "complex-momentum", "complex-adam", "muon")


def _builders() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    from . import registry
    from .overhead import EXTRA

    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {}
    for n in NAMES:
        if n in EXTRA:
            out[n] = EXTRA[n]
        else:
            spec = registry.get(n)
            out[n] = lambda p, spec=spec: spec.make(p)
    return out


def _needs_loss(name: str) -> bool:
    from . import registry

    return name.startswith("nested") or (name in registry.names() and registry.get(name).needs_loss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, n_params: int, steps: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    from ..optim.distributed import per_rank
    from .overhead import synthetic_params

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        base = synthetic_params(n_params)  # the same seed on every rank: replicated, as under DDP
        loss = torch.tensor(1.0)
        builders = _builders()
        times: dict[str, dict[str, list[float]]] = {n: {"synced": [], "per_rank": []} for n in builders}
        calls: dict[str, float] = {}
        vec = torch.zeros(2, dtype=torch.float64)
        bare: list[float] = []
        for _ in range(rounds):
            for name, build in builders.items():
                for mode in ("synced", "per_rank"):
                    params = [p.detach().clone().requires_grad_() for p in base]
                    for p, b in zip(params, base):
                        p.grad = b.grad.clone()
                    opt = build(params)
                    closure = (lambda: loss) if _needs_loss(name) else None
                    ctx = per_rank() if mode == "per_rank" else contextlib.nullcontext()
                    with ctx:
                        for _ in range(2):  # warm-up (the first synced step also checks replication)
                            opt.step(closure) if closure else opt.step()
                        sync = opt.__dict__.get("_sync")
                        before = sync.calls if sync is not None else 0
                        dist.barrier()
                        t0 = time.perf_counter()
                        for _ in range(steps):
                            opt.step(closure) if closure else opt.step()
                        ms = 1e3 * (time.perf_counter() - t0) / steps
                    times[name][mode].append(ms)
                    if mode == "synced":
                        sync = opt.__dict__.get("_sync")
                        calls[name] = ((sync.calls if sync is not None else 0) - before) / steps
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                outs = [torch.empty_like(vec) for _ in range(world)]
                dist.all_gather(outs, vec)
            bare.append(1e3 * (time.perf_counter() - t0) / steps)
        if rank == 0:
            rows = [{"name": n, "per_rank_ms": statistics.median(t["per_rank"]), "synced_ms": statistics.median(t["synced"]),
                     "collectives_per_step": calls[n]} for n, t in times.items()]
            for r in rows:
                r["added_ms"] = r["synced_ms"] - r["per_rank_ms"]
            Path(out).write_text(json.dumps({"processes": world, "n_params": n_params, "steps": steps, "rounds": rounds,
                                             "threads_per_process": torch.get_num_threads(),
                                             "bare_all_gather_ms": statistics.median(bare), "rows": rows}))
    finally:
        dist.destroy_process_group()


def measure(processes: int = 2, n_params: int = 1_000_000, steps: int = 10, rounds: int = 3) -> dict[str, Any]:
    """Run the measurement over ``processes`` local processes; the result as a dict (module docstring)."""
    import torch.multiprocessing as mp

    check_int("processes", processes, lo=2, hi=64)
    check_int("n_params", n_params, lo=1)
    check_int("steps", steps, lo=1)
    check_int("rounds", rounds, lo=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "collectives.json")
        mp.start_processes(_worker, args=(processes, _free_port(), n_params, steps, rounds, out), nprocs=processes,
                           join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def format_table(doc: dict[str, Any]) -> str:
    out = [f"the added cost of the collectives: {doc['processes']} processes (gloo, 127.0.0.1, "
           f"{doc['threads_per_process']} thread(s) each), a {doc['n_params'] / 1e6:g}M-parameter replicated model",
           f"{'optimizer':26s} {'per-rank ms':>12s} {'synced ms':>10s} {'added ms':>9s} {'collectives/step':>17s}"]
    for r in doc["rows"]:
        out.append(f"{r['name']:26s} {r['per_rank_ms']:12.3f} {r['synced_ms']:10.3f} {r['added_ms']:9.3f} "
                   f"{r['collectives_per_step']:17.2f}")
    out.append(f"a bare all_gather of the same small vector: {doc['bare_all_gather_ms']:.3f} ms")
    return "\n".join(out)
