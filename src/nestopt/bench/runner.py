"""Running (task x optimizer x learning rate x seed) jobs, one process per core.

``run_job`` trains one model and returns its record (see :mod:`nestopt.bench.schema`).
``run_jobs`` spreads jobs over worker processes (each pinned to one thread), shows progress,
and on ``KeyboardInterrupt`` returns the records finished so far with ``interrupted=True``.

The loop is :func:`nestopt.train.train_loop`; this module records its curve from its callbacks.

Under ``torchrun`` (a process group of more than one rank initialised: :mod:`nestopt._ranks`)
``run_jobs`` splits the jobs over the ranks by their cost (each rank over its own workers) and
gathers every record on every rank: the records are those one process makes (a run depends on its
job alone), so the caller writes them from rank 0 (``nestopt bench`` does).

Timing: ``ms_per_step`` is the mean wall time of the training step (batch forward, backward and
optimizer step) without evaluation; ``time_s`` in the curve accumulates the same quantity, so
time-to-target counts training time only.

Randomness: a run's model, batches and any draw its optimizer makes from the global generators
(seeded per job) depend on the job alone, not on what ran before it in the worker.

Divergence: a run stops and is marked ``diverged`` when a training or validation loss is not
finite, the validation loss exceeds ``DIVERGE_FACTOR`` times its initial value, or the optimizer
raises (the message is kept in ``error``); the benchmark goes on with the next job.
``nonfinite_params`` records whether any parameter ended NaN or infinite.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import _ranks
from .. import tasks as task_registry
from .._io import signals_seen
from ..train import DIVERGE_FACTOR, Divergence, LoopResult, train_loop
from . import registry as opt_registry
CURVE_POINTS = 50


@dataclass(frozen=True)
class Job:
    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int

    @property
    def key(self) -> tuple[str, str, float, int]:
        return (self.task, self.optimizer, self.lr, self.seed)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


_TASK_CACHE: dict[str, Any] = {}


def _task(name: str) -> Any:
    if name not in _TASK_CACHE:
        _TASK_CACHE[name] = task_registry.get(name)
    return _TASK_CACHE[name]


def _seed_global_generators(job: Job) -> None:
    """torch's and NumPy's global generators, seeded from the job: an optimizer that draws from them
    (PSGD-Kron's probes) gives the same run whatever ran before it in the worker."""
    import zlib

    import numpy as np

    seed = zlib.crc32(f"{job.task}|{job.optimizer}|{job.lr!r}|{job.seed}".encode())
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_job(job: Job) -> dict[str, Any]:
    """Train one model; return its run record (curves, final losses, timing, divergence)."""
    t_start = time.perf_counter()
    task = _task(job.task)
    spec = opt_registry.get(job.optimizer)
    model = task.init(job.seed)
    _seed_global_generators(job)
    opt = spec.make_for(model, lr=job.lr)
    scheduler = None
    if spec.schedule is not None:
        from ..schedule import LargeLRScheduler

        scheduler = LargeLRScheduler(opt, spec.schedule(job.lr, job.steps))
    params = [p for p in model.parameters() if p.requires_grad]
    next_batch = task.sampler(job.seed)

    def evaluate() -> dict[str, float]:
        if spec.train_eval_modes:
            opt.eval()  # type: ignore[attr-defined]
        metrics = task.evaluate(model)
        if spec.train_eval_modes:
            opt.train()  # type: ignore[attr-defined]
        return metrics

    curve: dict[str, list[Any]] = {"step": [], "train_loss": [], "val_loss": [], "time_s": []}
    window: list[float] = []

    def on_step(step: int, loss: float, res: LoopResult) -> None:
        window.append(loss)

    def on_eval(step: int, metrics: dict[str, float], res: LoopResult) -> None:
        v = metrics["val_loss"]
        if step and hasattr(opt, "observe_validation"):  # optimizers that learn from validation
            with res.timed():  # their work counts as training time
                opt.observe_validation(v)
        curve["step"].append(step)
        curve["train_loss"].append(sum(window) / len(window) if window else None)
        curve["val_loss"].append(_finite_or_none(v))
        curve["time_s"].append(res.train_time)
        window.clear()

    res = train_loop(opt, job.steps, lambda batch: task.loss(model, batch), batch=next_batch,
                     closure=spec.needs_loss, create_graph=spec.create_graph, clip_norm=spec.clip_norm,
                     clip_params=params, scheduler=scheduler, evaluate=evaluate,
                     eval_every=max(1, job.steps // CURVE_POINTS), on_step=on_step, on_eval=on_eval,
                     divergence=Divergence(DIVERGE_FACTOR))
    diverged, diverged_step, steps_done = res.diverged, res.diverged_step, res.steps_done
    last_metrics = res.metrics

    vals = [v for v in curve["val_loss"] if v is not None]
    final_val = None if diverged else curve["val_loss"][-1]
    final_train = None if diverged else curve["train_loss"][-1]
    extra = {k: _finite_or_none(float(v)) for k, v in last_metrics.items() if k != "val_loss"} if not diverged else {}
    return {
        **asdict(job),
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_val_loss": min(vals) if vals else None,
        "final_val_accuracy": extra.get("val_accuracy"),
        "steps_to_target": None,
        "time_to_target_s": None,
        "ms_per_step": res.ms_per_step,
        "diverged": diverged,
        "diverged_step": diverged_step,
        "steps_done": steps_done,
        "wall_s": time.perf_counter() - t_start,
        "error": res.error,
        "nonfinite_params": not all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "metrics": extra,
        "curve": curve,
    }


def quiet_create_graph_warning() -> None:
    """torch warns that ``backward(create_graph=True)`` makes a parameter/gradient cycle; every
    closure here starts with ``zero_grad(set_to_none=True)``, which breaks it."""
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


_INIT_ERROR: list[BaseException] = []  # a worker's failed start, raised by its first job


def _worker_init(variants: Sequence[opt_registry.OptimizerSpec] = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)
    quiet_create_graph_warning()
    # A study's variants, registered in the parent: spawned workers start bare. Unpickling a spec
    # imports the module that defines it, which may register its own copy first: that one stays.
    try:
        known = {s.name for s in opt_registry.variants()}
        for spec in variants:
            if spec.name not in known:
                opt_registry.register_variant(spec)
    except Exception as e:  # an initializer that raises makes the pool restart workers for ever
        _INIT_ERROR.append(e)


def _worker_job(job: Job) -> dict[str, Any]:
    if _INIT_ERROR:
        raise RuntimeError(f"a bench worker failed to start: {_INIT_ERROR[0]}") from _INIT_ERROR[0]
    return run_job(job)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


ProgressFn = Callable[[dict[str, Any]], None]


class WorkerError(RuntimeError):
    """A worker process died before finishing its job (the message says what to check)."""


MAIN_GUARD_HINT = ("put the call under `if __name__ == \"__main__\":` in the script: worker processes are started "
                   "with 'spawn', which runs the main module again in each of them")


def _check_not_a_worker_importing_main() -> None:
    """Called where a bench starts: in a spawned worker that is still importing the main module
    (a script that calls ``run_bench`` without a main guard runs the call again there), stop the
    worker at once with one line, instead of starting workers of its own (which multiprocessing
    refuses with a traceback, and a pool restarts for ever)."""
    import multiprocessing as mp

    # (spawn sets ``_inheriting`` while a new process imports the main module, before it has a parent)
    if getattr(mp.current_process(), "_inheriting", False):
        import sys

        print(f"nestopt: a bench worker process re-ran the script's bench call while importing it; {MAIN_GUARD_HINT}",
              file=sys.stderr, flush=True)
        raise SystemExit(3)


def run_jobs(jobs: Sequence[Job], *, workers: int | None = None,
             on_done: ProgressFn | None = None, ranks: bool | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Run ``jobs``; return ``(records, interrupted)``. ``workers=1`` runs in this process.

    On ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM inside :func:`nestopt._io.interruptible`) the
    worker processes are stopped (terminated, then killed) before this returns the records
    finished so far with ``interrupted=True``. A worker that dies (killed, out of memory, or a
    script without a main guard: see :data:`MAIN_GUARD_HINT`) is a ``RuntimeError`` that says so,
    never a hang.

    ``ranks`` (default: whether a process group of more than one rank is initialised) splits the
    jobs over the group's ranks (:func:`rank_shares`), each running its share over its own
    ``workers``, and returns every rank's records on every rank (``on_done`` is told of this rank's
    as they finish, then of the others'); interrupted when any rank was. Every rank must pass the
    same jobs (a rank whose jobs differ is a ``RuntimeError`` that says so)."""
    _check_not_a_worker_importing_main()
    if ranks is not None and not isinstance(ranks, bool):
        raise TypeError(f"ranks={ranks!r} is invalid: expected True, False or None (split over the ranks when a "
                        "process group is initialised)")
    if _ranks.is_distributed() if ranks is None else ranks and _ranks.is_distributed():
        return _run_ranked(jobs, workers=workers, on_done=on_done)
    return _run_here(jobs, workers=workers, on_done=on_done)


def rank_shares(jobs: Sequence[Job], world: int) -> list[list[Job]]:
    """``jobs`` split into ``world`` shares of about equal cost (longest first, each to the share
    with the least so far; ties to the lowest rank): the same split on every rank."""
    shares: list[list[Job]] = [[] for _ in range(world)]
    load = [0.0] * world
    for job in sorted(jobs, key=lambda j: -j.steps * _cost_hint(j.task, j.optimizer)):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(job)
        load[r] += job.steps * _cost_hint(job.task, job.optimizer)
    return shares


def _per_rank() -> Any:
    """Optimizers with ``process_group="auto"`` kept from syncing over the ranks for a block (each
    rank runs its own jobs): :func:`nestopt.optim.distributed.per_rank`."""
    from ..optim.distributed import per_rank

    return per_rank()


def _jobs_checksum(jobs: Sequence[Job]) -> int:
    import zlib

    return zlib.crc32(repr([(j.task, j.optimizer, j.lr, j.seed, j.steps) for j in jobs]).encode())


def _run_ranked(jobs: Sequence[Job], *, workers: int | None, on_done: ProgressFn | None) -> tuple[list[dict[str, Any]], bool]:
    world, me = _ranks.world_size(), _ranks.rank()
    mine = rank_shares(jobs, world)[me]
    records: list[dict[str, Any]] = []
    interrupted = False
    if workers is None:  # the cores this rank's machine has, shared by its ranks
        workers = max(1, default_workers() // _ranks.local_world_size())
    if mine:
        with _per_rank():  # other jobs run on the other ranks: nothing to sync with them
            records, interrupted = _run_here(mine, workers=min(workers, len(mine)), on_done=on_done)
    check = _jobs_checksum(jobs)
    gathered = _ranks.all_gather((check, records, interrupted))
    differ = [r for r, (c, _, _) in enumerate(gathered) if c != check]
    if differ:
        raise RuntimeError(f"rank(s) {differ} were given other jobs than rank {me}: every rank of a torchrun bench "
                           "must plan the same runs (the same tasks, optimizers, seeds and steps)")
    out: list[dict[str, Any]] = []
    for r, (_, recs, _) in enumerate(gathered):
        out += recs
        if r != me and on_done:
            for rec in recs:
                on_done(rec)
    return out, any(stopped for _, _, stopped in gathered)


def _run_here(jobs: Sequence[Job], *, workers: int | None = None,
              on_done: ProgressFn | None = None) -> tuple[list[dict[str, Any]], bool]:
    workers = default_workers() if workers is None else workers
    records: list[dict[str, Any]] = []
    signals_before = signals_seen()
    if workers <= 1:
        quiet_create_graph_warning()
        try:
            for job in jobs:
                rec = run_job(job)
                records.append(rec)
                if on_done:
                    on_done(rec)
        except KeyboardInterrupt:
            return records, True
        return records, False

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # Longest first keeps both cores busy at the end (the pool hands jobs out in this order).
    order = sorted(jobs, key=lambda j: -j.steps * _cost_hint(j.task, j.optimizer))
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(opt_registry.variants(),))
    try:
        pending = {pool.submit(_worker_job, job) for job in order}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)  # a timed wait keeps Ctrl-C responsive
            for fut in done:
                rec = fut.result()
                records.append(rec)
                if on_done:
                    on_done(rec)
    except KeyboardInterrupt:
        _stop(pool)
        return records, True
    except BrokenProcessPool:
        _stop(pool)
        if signals_seen() != signals_before:  # a signal to the process group stopped the workers too
            return records, True
        raise WorkerError(f"a bench worker process exited before finishing its job ({len(records)} of {len(order)} "
                           f"done): it was killed, ran out of memory, or, when the bench runs from a script, "
                           f"{MAIN_GUARD_HINT}") from None
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return records, False


def _stop(pool: Any) -> None:
    """Stop every worker of ``pool`` now: the queued jobs are cancelled, the running ones
    terminated (SIGTERM), and a worker still alive a few seconds later killed."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        with _suppress():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 5.0
    for p in procs:
        with _suppress():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)


def _suppress() -> Any:
    from contextlib import suppress

    return suppress(Exception)


# Relative cost of a step (one thread, AdamW), for the order only; the matrix peers' steps cost
# several times AdamW's on the larger tasks (wide-mlp: Muon 124 ms, SOAP 223 ms against AdamW's 9).
_COST = {"charlm-transformer": 12.0, "trading-multihorizon": 4.0, "digits-cnn": 3.0, "gru-seq": 3.0,
         "wide-mlp": 8.0}
_COSTLY_STEP = 4.0


def _cost_hint(task: str, optimizer: str = "adamw") -> float:
    spec = opt_registry.get(optimizer) if optimizer in opt_registry.names(available_only=False) else None
    return _COST.get(task, 1.0) * (_COSTLY_STEP if spec is not None and spec.full_only else 1.0)
