"""Running (task x optimizer x learning rate x seed) jobs, one process per core.

``run_job`` trains one model and returns its record (see :mod:`nestopt.bench.schema`).
``run_jobs`` spreads jobs over worker processes (each pinned to one thread), shows progress,
and on ``KeyboardInterrupt`` returns the records finished so far with ``interrupted=True``.

Timing: ``ms_per_step`` is the mean wall time of the training step (batch forward, backward and
optimizer step) without evaluation; ``time_s`` in the curve accumulates the same quantity, so
time-to-target counts training time only.

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

from .. import tasks as task_registry
from . import registry as opt_registry

DIVERGE_FACTOR = 100.0
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


def run_job(job: Job) -> dict[str, Any]:
    """Train one model; return its run record (curves, final losses, timing, divergence)."""
    t_start = time.perf_counter()
    task = _task(job.task)
    spec = opt_registry.get(job.optimizer)
    model = task.init(job.seed)
    opt = spec.make(model.parameters(), lr=job.lr)
    scheduler = None
    if spec.schedule is not None:
        from ..schedule import LargeLRScheduler

        scheduler = LargeLRScheduler(opt, spec.schedule(job.lr, job.steps))
    params = [p for p in model.parameters() if p.requires_grad]
    next_batch = task.sampler(job.seed)
    eval_every = max(1, job.steps // CURVE_POINTS)

    def evaluate() -> dict[str, float]:
        if spec.train_eval_modes:
            opt.eval()  # type: ignore[attr-defined]
        metrics = task.evaluate(model)
        if spec.train_eval_modes:
            opt.train()  # type: ignore[attr-defined]
        return metrics

    curve: dict[str, list[Any]] = {"step": [], "train_loss": [], "val_loss": [], "time_s": []}
    first = evaluate()
    v0 = first["val_loss"]
    curve["step"].append(0)
    curve["train_loss"].append(None)
    curve["val_loss"].append(_finite_or_none(v0))
    curve["time_s"].append(0.0)

    train_time = 0.0
    window: list[float] = []
    diverged, diverged_step, steps_done = False, None, 0
    last_metrics = first
    error = None
    try:
        for step in range(job.steps):
            batch = next_batch(step)
            t0 = time.perf_counter()

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, batch)
                loss.backward(create_graph=spec.create_graph)
                if spec.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, spec.clip_norm)
                return loss

            if spec.needs_loss:
                loss = opt.step(closure)
            else:
                loss = closure()
                opt.step()
            if scheduler is not None:
                scheduler.step()
            lv = float(loss.detach())
            train_time += time.perf_counter() - t0
            steps_done = step + 1
            window.append(lv)
            if not math.isfinite(lv):
                diverged, diverged_step = True, steps_done
                break
            if steps_done % eval_every == 0 or steps_done == job.steps:
                last_metrics = evaluate()
                v = last_metrics["val_loss"]
                if hasattr(opt, "observe_validation"):  # optimizers that learn from validation
                    t1 = time.perf_counter()
                    opt.observe_validation(v)
                    train_time += time.perf_counter() - t1  # their work counts as training time
                curve["step"].append(steps_done)
                curve["train_loss"].append(sum(window) / len(window))
                curve["val_loss"].append(_finite_or_none(v))
                curve["time_s"].append(train_time)
                window = []
                if not math.isfinite(v) or v > DIVERGE_FACTOR * max(abs(v0), 1e-12):
                    diverged, diverged_step = True, steps_done
                    break
    except (RuntimeError, ValueError, ArithmeticError) as e:  # an optimizer that gives up counts as diverged
        error = f"{type(e).__name__}: {e}"
        diverged, diverged_step = True, steps_done + 1

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
        "ms_per_step": 1e3 * train_time / max(steps_done, 1),
        "diverged": diverged,
        "diverged_step": diverged_step,
        "steps_done": steps_done,
        "wall_s": time.perf_counter() - t_start,
        "error": error,
        "nonfinite_params": not all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "metrics": extra,
        "curve": curve,
    }


def quiet_create_graph_warning() -> None:
    """torch warns that ``backward(create_graph=True)`` makes a parameter/gradient cycle; every
    closure here starts with ``zero_grad(set_to_none=True)``, which breaks it."""
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


def _worker_init(variants: Sequence[opt_registry.OptimizerSpec] = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    for spec in variants:  # a study's variants, registered in the parent (spawned workers start bare)
        opt_registry.register_variant(spec)
    torch.set_num_threads(1)
    quiet_create_graph_warning()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


ProgressFn = Callable[[dict[str, Any]], None]


def run_jobs(jobs: Sequence[Job], *, workers: int | None = None,
             on_done: ProgressFn | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Run ``jobs``; return ``(records, interrupted)``. ``workers=1`` runs in this process."""
    workers = default_workers() if workers is None else workers
    records: list[dict[str, Any]] = []
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

    # Longest first keeps both cores busy at the end.
    order = sorted(jobs, key=lambda j: -j.steps * _cost_hint(j.task))
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(opt_registry.variants(),))
    try:
        results = pool.imap_unordered(run_job, order, chunksize=1)
        for _ in range(len(order)):
            while True:
                try:
                    rec = results.next(timeout=0.5)  # a timed wait keeps Ctrl-C responsive
                    break
                except mp.TimeoutError:
                    continue
            records.append(rec)
            if on_done:
                on_done(rec)
    except KeyboardInterrupt:
        pool.terminate()
        pool.join()
        return records, True
    pool.close()
    pool.join()
    return records, False


_COST = {"charlm-transformer": 12.0, "trading-multihorizon": 4.0, "digits-cnn": 3.0}


def _cost_hint(task: str) -> float:
    return _COST.get(task, 1.0)
