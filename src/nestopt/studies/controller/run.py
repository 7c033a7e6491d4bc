"""The controller study's own training runs, outside the bench's runner: the multi-horizon model with
per-head feedback (part 3), the multiplier traces, and a frozen controller against AdamW."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ..._threads import one_thread
from ...optim.nested import NestedOptimizer
from ...train import Divergence, LoopResult, train_loop
from .plan import CONFIGS, HEAD_CONFIGS, _nested, head_options


def one_thread_worker() -> None:
    """Initializer of the processes that run :func:`train_heads` (each starts bare). Ctrl-C is
    the parent's to handle (it stops the pool); a worker ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def train_heads(config: str, seed: int, lr: float = 1e-3, steps: int | None = None,
                eval_every: int = 20) -> dict[str, Any]:
    """Train the multi-horizon model with trunk + per-head groups; return curves, final per-head
    validation AUCs and the multiplier trace. The study runs it on one torch thread
    (:func:`one_thread`, :func:`one_thread_worker`)."""
    from ... import tasks as task_registry

    task = task_registry.get("trading-multihorizon")
    steps = steps or task.default_steps
    model = task.init(seed)
    groups = [{"params": list(model.trunk.parameters()), "depth": 0.0}]
    groups += [{"params": list(h.parameters()), "depth": 1.0, "head": i} for i, h in enumerate(model.heads)]
    cfg = head_options(config)
    if cfg is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, fused=True)
    else:
        opt = NestedOptimizer(groups, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True, seed=seed, **cfg)
    trace: dict[str, list[Any]] = {"step": [], "mult": [], "val_loss": [], "aucs": []}
    box: dict[str, Any] = {}  # this step's per-head losses, and the latest validation AUCs

    def loss(batch: Any) -> torch.Tensor:
        per_head = task.head_losses(model, batch)
        box["heads"] = per_head.detach()
        return per_head.mean()

    def on_eval(step: int, metrics: dict[str, float], res: LoopResult) -> None:
        box["aucs"] = [metrics[f"val_auc_{h}"] for h in task.horizons]
        if step == 0:  # the evaluation before the first step: the AUCs the first steps see
            return
        if isinstance(opt, NestedOptimizer):
            opt.observe_validation(metrics["val_loss"])
        trace["step"].append(step)
        trace["mult"].append(opt.multipliers() if isinstance(opt, NestedOptimizer) else [1.0] * len(groups))
        trace["val_loss"].append(metrics["val_loss"])
        trace["aucs"].append(box["aucs"])

    # the per-head features read the heads' losses, which come out of this step's closure: a callable
    # is read after it ran
    step_fn = None
    if isinstance(opt, NestedOptimizer):
        step_fn = (lambda c: opt.step(c, head_stats=lambda: {"loss": box["heads"].tolist(), "auc": box["aucs"]})) \
            if (HEAD_CONFIGS[config] or {}).get("heads") else opt.step
    # stops at a non-finite training loss, nothing else (no rule on the validation loss, no exception caught)
    res = train_loop(opt, steps, loss, batch=task.sampler(seed), step_fn=step_fn, evaluate=lambda: task.evaluate(model),
                     eval_every=eval_every, on_eval=on_eval, monitor=None, divergence=Divergence(math.inf), catch=())
    metrics, aucs, train_time = res.metrics, box["aucs"], res.train_time
    return {"config": config, "seed": seed, "lr": lr, "final_val_loss": metrics["val_loss"],
            "aucs": dict(zip(task.horizons, aucs)), "train_s": train_time, "trace": trace}


def _train_heads_job(config: str, seed: int, lr: float = 1e-3, steps: int | None = None) -> dict[str, Any]:
    return train_heads(config, seed, lr=lr, steps=steps)


def trace_multipliers(task_name: str, lr: float, seed: int = 0, config: str = "hindsight") -> dict[str, Any]:
    """One bench-style run that records each tensor's multiplier at every evaluation (every 40th of
    the run; it goes on through non-finite losses)."""
    from ... import tasks as task_registry

    task = task_registry.get(task_name)
    model = task.init(seed)
    opt = _nested(model.parameters(), lr, **CONFIGS[config][0])
    assert isinstance(opt, NestedOptimizer)
    names = [n for n, _ in model.named_parameters()]
    steps, out = task.default_steps, {"step": [], "mult": []}

    def record(step: int, loss: float, res: LoopResult) -> None:
        if step % max(1, steps // 40) == 0:
            out["step"].append(step)
            out["mult"].append(opt.multipliers())

    train_loop(opt, steps, lambda batch: task.loss(model, batch), batch=task.sampler(seed), closure=True, on_step=record,
               divergence=None, catch=())
    return {"task": task_name, "lr": lr, "names": names, **out}


def _step_with_loss(opt: torch.optim.Optimizer) -> Any:
    """A ``train_loop`` step that runs the closure, then ``opt.step(loss=loss)``."""

    def step(closure: Any) -> torch.Tensor:
        loss = closure()
        opt.step(loss=loss)
        return loss

    return step


def frozen_sweep(controller: str, tasks: tuple[str, ...] = ("digits-mlp", "diabetes-mlp", "quad-asym"),
                 lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1), seeds: int = 3) -> list[dict[str, Any]]:
    """A frozen controller (a file from ``nestopt meta-train --net controller``) against AdamW at
    the same base rates: median final validation loss over seeds, and the controller's median
    multiplier at the end of the run. Run with ``python -c "from nestopt.studies.controller import
    frozen_sweep; print(frozen_sweep('net.safetensors'))"``."""
    from ... import tasks as task_registry

    rows = []
    for name in tasks:
        task = task_registry.get(name)
        for lr in lrs:
            row: dict[str, Any] = {"task": name, "lr": lr}
            for label in ("adamw", "frozen"):
                finals, mults = [], []
                for seed in range(seeds):
                    model = task.init(seed)
                    opt = (_nested(model.parameters(), lr, signal="frozen", controller=controller) if label == "frozen"
                           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01))
                    train_loop(opt, task.default_steps, lambda batch: task.loss(model, batch), batch=task.sampler(seed),
                               step_fn=_step_with_loss(opt) if label == "frozen" else None, divergence=None, catch=())
                    finals.append(task.evaluate(model)["val_loss"])
                    if isinstance(opt, NestedOptimizer):
                        mults.append(statistics.median(opt.multipliers()))
                row[label] = statistics.median(finals)
                if mults:
                    row["multiplier"] = statistics.median(mults)
            rows.append(row)
    return rows
