r"""Meta-training update networks by truncated backpropagation through unrolled training.

For a task sampled from a family (:mod:`nestopt.tasks.families`), the inner loop trains the
task's model with the network's update, written functionally (``torch.func.functional_call``),
so the *meta-loss* — the mean over the unroll of ``log(L_t / L_0)`` (the seed's "sum of losses
along the trajectory", on a log scale, normalised by the task's starting loss) — is a
differentiable function of the network's weights ``Phi``. Every ``unroll`` inner steps a
meta-gradient estimator (:mod:`.estimators`) turns the truncation into a meta-gradient, which is
clipped and applied by Adam; the inner parameters and buffers are detached and carried on, and
after ``horizon`` inner steps a new task is sampled.

``method`` names the estimator (:data:`~.estimators.ESTIMATORS`) or is one
(:class:`~.estimators.GradientEstimator`): ``"tbptt"`` (default, :class:`~.estimators.TruncatedBackprop`;
``second_order=False`` treats each inner gradient as a constant, the usual first-order truncation,
``True`` differentiates through it too), ``"surrogate"`` (the research note's per-step surrogate with
``surrogate_lr``, the baseline it describes for ``DirectUpdateMLP``), ``"es"`` (antithetic evolution
strategies, :func:`~.unrolls.es_gradient`) and ``"pes"`` (persistent ES, Vicol et al. 2021,
:class:`~.estimators.PersistentES`: unbiased over the whole inner run, where truncated ES and
truncated backpropagation only see each truncation's own effect).

``workers > 1`` spreads the ES/PES unrolls (the particles) over that many processes; every unroll
is a deterministic function of its inputs, so the result does not depend on the worker count.
Under ``torchrun`` (a process group of more than one rank initialised: :mod:`nestopt._ranks`) the
unrolls are spread over the ranks too (each over its own ``workers``) and their results gathered on
every rank, so every rank trains the same network, bit for bit what one process would; only rank 0
reads and writes the checkpoint (a resume hands its state to the other ranks).

The loop writes a checkpoint (network, outer optimizer, counters, RNG, the settings) every
``checkpoint_every`` outer steps, and when it is interrupted (``KeyboardInterrupt``, at the last
finished step), to a temporary name and renamed; it resumes from one (a resumed run starts a fresh
task). A checkpoint that cannot be read, or was written for another network or other settings, is
a :class:`CheckpointError` that says what differs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _ranks
from .. import tasks as task_registry
from .._checks import check_choice, check_int, check_number
from .._io import LoadError, atomic_path, deferred_interrupts, safe_load
from .estimators import ES, ESTIMATORS, Estimate, GradientEstimator, PersistentES, Surrogate, Task, TruncatedBackprop
from .inner import CONTROLLER_LRS, _ControllerInner, _Inner, _Loss, make_inner
from .unrolls import Unrolls, _per_rank, es_gradient

__all__ = ["CONTROLLER_LRS", "CheckpointError", "ES", "ESTIMATORS", "METHODS", "Estimate", "GradientEstimator", "MetaConfig",
           "PersistentES", "Surrogate", "TruncatedBackprop", "Unrolls", "_ControllerInner", "_Inner", "_Loss",
           "es_gradient", "make_inner", "meta_train"]

METHODS = tuple(ESTIMATORS)

# Settings a resumed run may change: how long it runs, how it spreads its work, how often it saves.
RESUMABLE_CHANGES = ("outer_steps", "workers", "checkpoint_every")
CHECKPOINT_FORMAT = 1  # a checkpoint without "format" (written before it existed) is format 1


class CheckpointError(ValueError):
    """A checkpoint ``meta_train`` cannot resume from; the message (one line) says why."""


@dataclass
class MetaConfig:
    """Meta-training settings (see the module docstring)."""

    families: tuple[str, ...] = ("quadratic", "teacher-mlp")
    unroll: int = 10
    horizon: int = 100
    outer_steps: int = 200
    outer_lr: float = 3e-3
    clip: float = 1.0
    reg: float = 1e-4
    second_order: bool = False
    method: str | GradientEstimator = "tbptt"
    surrogate_lr: float = 1e-3
    es_sigma: float = 0.01
    es_pairs: int = 8
    checkpoint_every: int = 50
    workers: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for f in self.families:
            task_registry.family(f)  # KeyError naming the valid families
        check_int("unroll", self.unroll, lo=1)
        check_int("horizon", self.horizon, lo=self.unroll)
        check_int("outer_steps", self.outer_steps, lo=1)
        check_number("outer_lr", self.outer_lr, lo=0.0, lo_open=True)
        check_number("clip", self.clip, lo=0.0, lo_open=True)
        check_number("reg", self.reg, lo=0.0)
        check_int("checkpoint_every", self.checkpoint_every, lo=1)
        if isinstance(self.method, type) and issubclass(self.method, GradientEstimator):
            raise ValueError(f"method={self.method.__name__} is invalid: pass an instance "
                             f"({self.method.__name__}(...)), not the class")
        if not isinstance(self.method, GradientEstimator):
            check_choice("method", self.method, METHODS)
        check_number("surrogate_lr", self.surrogate_lr, lo=0.0, lo_open=True)
        check_number("es_sigma", self.es_sigma, lo=0.0, lo_open=True)
        check_int("es_pairs", self.es_pairs, lo=1)
        check_int("workers", self.workers, lo=1)

    def estimator(self) -> GradientEstimator:
        """The estimator ``method`` stands for (itself when it is one), with these settings."""
        if isinstance(self.method, GradientEstimator):
            return self.method
        return ESTIMATORS[check_choice("method", self.method, METHODS)].from_config(self)


def meta_train(net: nn.Module, cfg: MetaConfig, *, checkpoint: str | Path | None = None, resume: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None,
               on_resume: Callable[[int, list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Meta-train ``net`` in place; return the history (one row per outer step). ``net`` is an
    update network, or a nested optimizer's ``Controller`` (``method`` ``"es"`` or ``"pes"``, or an
    estimator that does not backpropagate). With ``resume`` and an existing ``checkpoint``, the run
    continues from it (``on_resume(step, history)`` is told from which step); a checkpoint it
    cannot use raises :class:`CheckpointError`."""
    cfg.check()
    estimator = cfg.estimator()
    from ..nets import Controller

    if isinstance(net, Controller):
        if estimator.backprop:
            raise ValueError(f"method={cfg.method!r} is invalid for a nested controller: its training runs are "
                             "not differentiable; use 'es' or 'pes'")
        if net.features is None:
            raise ValueError("the controller needs its feature names (Controller(..., features=...)) to be meta-trained")
    outer = torch.optim.Adam(net.parameters(), lr=cfg.outer_lr)
    history: list[dict[str, Any]] = []
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    ranked = _ranks.is_distributed()
    if ranked:  # rank 0 reads the checkpoint, every rank resumes from what it read
        resumed = _resume_ranked(ckpt if resume else None, net, outer, gen, cfg, estimator)
        if resumed is not None:
            history, start = resumed
            if on_resume is not None:
                on_resume(start, history)
    elif resume and ckpt is not None and ckpt.is_file():
        history, start = _resume(ckpt, net, outer, gen, cfg, estimator)  # a resumed run starts a fresh task
        if on_resume is not None:
            on_resume(start, history)
    if not _ranks.is_main():
        ckpt = None  # only rank 0 writes
    try:
        # (under torchrun each rank runs its own share of the inner runs: their optimizers never sync)
        with Unrolls(cfg.workers if estimator.parallel else 1, ranks=ranked) as unrolls, \
                (_per_rank() if ranked else contextlib.nullcontext()):
            _loop(net, cfg, estimator, outer, history, start, gen, ckpt, progress, unrolls)
    except KeyboardInterrupt:
        # The state is whole at a step boundary (each step's update, row and checkpoint run with
        # interrupts deferred): save it, so a resume loses nothing of what finished.
        done = history[-1]["step"] if history else 0
        if ckpt is not None and done > start:
            _save(ckpt, net, outer, history, done, gen, cfg, estimator)
        raise
    return history


def _save(ckpt: Path, net: nn.Module, outer: torch.optim.Optimizer, history: list[dict[str, Any]], step: int,
          gen: torch.Generator, cfg: MetaConfig, estimator: GradientEstimator) -> None:
    with deferred_interrupts(), atomic_path(ckpt) as tmp:
        # tensors and plain values only: a resume reads it with weights_only=True (no code runs)
        torch.save({"format": CHECKPOINT_FORMAT, "net": net.state_dict(), "outer": outer.state_dict(),
                    "history": history, "step": step, "generator": gen.get_state(),
                    "config": _config_json(cfg, estimator), "net_class": type(net).__name__}, tmp)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _resume(ckpt: Path, net: nn.Module, outer: torch.optim.Optimizer, gen: torch.Generator, cfg: MetaConfig,
            estimator: GradientEstimator) -> tuple[list[dict[str, Any]], int]:
    """Load ``ckpt`` into ``net``, ``outer`` and ``gen`` after checking it fits; ``(history, step)``."""
    name = str(ckpt)
    try:
        saved = safe_load(ckpt, what="checkpoint")  # tensors and plain values only: runs no code
    except LoadError as e:
        raise CheckpointError(str(e)) from None
    fmt = saved.get("format", 1) if isinstance(saved, dict) else None
    if isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {name!r} has format {fmt}, newer than this nestopt's "
                              f"{CHECKPOINT_FORMAT}: resume it with the nestopt that wrote it, or upgrade")
    keys = ("net", "outer", "history", "step", "generator")
    if not isinstance(saved, dict) or any(k not in saved for k in keys):
        raise CheckpointError(f"checkpoint {name!r} is not a meta-train checkpoint (it lacks "
                              f"{', '.join(k for k in keys if not isinstance(saved, dict) or k not in saved)})")
    theirs, ours = saved["net"], net.state_dict()
    kind = saved.get("net_class")
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [f"{k} {tuple(theirs[k].shape)} here {tuple(v.shape)}" for k, v in ours.items()
              if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(v.shape)]
    if (kind is not None and kind != type(net).__name__) or missing or extra or shapes:
        what = [f"it holds a {kind}, this run trains a {type(net).__name__}"] if kind and kind != type(net).__name__ else []
        if missing:
            what.append(f"{len(missing)} weight(s) missing ({', '.join(missing[:3])})")
        if extra:
            what.append(f"{len(extra)} unknown weight(s) ({', '.join(extra[:3])})")
        if shapes:
            what.append(f"other shapes ({'; '.join(shapes[:2])})")
        raise CheckpointError(f"checkpoint {name!r} was written for another network: {'; '.join(what)}")
    if saved.get("config"):
        try:
            before = json.loads(saved["config"])
        except (TypeError, ValueError):
            before = {}
        now = json.loads(_config_json(cfg, estimator))
        differ = [f"{k}={before[k]!r} there, {now.get(k)!r} here" for k in before
                  if k not in RESUMABLE_CHANGES and k in now and before[k] != now[k]]
        if differ:
            raise CheckpointError(f"checkpoint {name!r} was written with other settings ({'; '.join(differ[:3])}): "
                                  "resume with the settings it was started with")
    step = saved["step"]
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {name!r} has step {step!r}; expected a step count")
    if step > cfg.outer_steps:
        raise CheckpointError(f"checkpoint {name!r} is at step {step}, past the last step of this run "
                              f"(outer_steps, --steps {cfg.outer_steps}): ask for more than {step} steps to continue it")
    try:
        net.load_state_dict(theirs)
        outer.load_state_dict(saved["outer"])
        gen.set_state(saved["generator"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {name!r} does not fit this run ({_first_line(e)})") from None
    return list(saved["history"]), step


def _resume_ranked(ckpt: Path | None, net: nn.Module, outer: torch.optim.Optimizer, gen: torch.Generator,
                   cfg: MetaConfig, estimator: GradientEstimator) -> tuple[list[dict[str, Any]], int] | None:
    """:func:`_resume` under torchrun: rank 0 reads ``ckpt`` (when it is a file) and hands the state,
    or the :class:`CheckpointError`'s message, to every rank, which all load it (or raise it)."""
    reply: tuple[str, Any] | None = None
    if _ranks.is_main() and ckpt is not None and ckpt.is_file():
        try:
            history, step = _resume(ckpt, net, outer, gen, cfg, estimator)
            reply = ("state", (net.state_dict(), outer.state_dict(), gen.get_state(), history, step))
        except CheckpointError as e:
            reply = ("error", str(e))
    reply = _ranks.broadcast(reply)
    if reply is None:
        return None
    if reply[0] == "error":
        raise CheckpointError(reply[1])
    weights, outer_state, gen_state, history, step = reply[1]
    if not _ranks.is_main():
        net.load_state_dict(weights)
        outer.load_state_dict(outer_state)
        gen.set_state(gen_state)
    return list(history), step


def _config_json(cfg: MetaConfig, estimator: GradientEstimator) -> str:
    named = cfg if isinstance(cfg.method, str) else replace(cfg, method=estimator.name)
    return json.dumps(asdict(named))


def _add_flat_grad(net: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in net.parameters():
        n = p.numel()
        g = flat[offset:offset + n].view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        offset += n


def _loop(net: nn.Module, cfg: MetaConfig, estimator: GradientEstimator, outer: torch.optim.Optimizer,
          history: list[dict[str, Any]], start: int, gen: torch.Generator, ckpt: Path | None,
          progress: Callable[[dict[str, Any]], None] | None, unrolls: Unrolls) -> None:
    task: Task | None = None
    t0 = time.perf_counter()
    for step in range(start, cfg.outer_steps):
        if task is None or task.t >= cfg.horizon:
            family = cfg.families[int(torch.randint(len(cfg.families), (1,), generator=gen))]
            seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            task = estimator.new_task(net, family, seed)
        outer.zero_grad(set_to_none=True)
        est: Estimate = estimator.estimate(net, task, cfg.unroll, gen, unrolls)
        with deferred_interrupts():  # the update, its row and the checkpoint happen whole
            task = _update(net, cfg, estimator, outer, history, step, gen, ckpt, progress, task, est, t0)


def _update(net: nn.Module, cfg: MetaConfig, estimator: GradientEstimator, outer: torch.optim.Optimizer,
            history: list[dict[str, Any]], step: int, gen: torch.Generator, ckpt: Path | None,
            progress: Callable[[dict[str, Any]], None] | None, task: Task | None, est: Estimate,
            t0: float) -> Task | None:
    """One outer step's update from its estimate ``est``; the task to go on with (``None``: a new one)."""
    assert task is not None
    meta_loss = est.meta_loss
    reg = cfg.reg * sum((p * p).sum() for p in net.parameters())
    total = meta_loss + reg
    row = {"step": step + 1, "task": task.name, "inner_t": task.t, "meta_loss": float(meta_loss.detach()),
           "last_loss": est.losses[-1], "time_s": time.perf_counter() - t0, "skipped": False}
    if torch.isfinite(total):
        if total.requires_grad:  # (with reg 0, an ES step has nothing to backpropagate)
            total.backward()
        if est.grad is not None:
            _add_flat_grad(net, est.grad)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)) if grads else 0.0
        if math.isfinite(norm):
            outer.step()
        else:
            row["skipped"] = True
        row["grad_norm"] = norm
    else:  # a diverging inner run: drop it and start a new task
        row["skipped"] = True
        task = None
    history.append(row)
    if progress is not None:
        progress(row)
    if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.outer_steps):
        _save(ckpt, net, outer, history, step + 1, gen, cfg, estimator)
    return task
