"""The five experiments of the Polyak research note, the variants run on them, and the metrics.

Each experiment is a loss over a list of parameter tensors, a start point, and (where known) the
solution and the exact Hessian diagonal. Every variant sees each parameter tensor as its own
piece; experiment 5 also has per-layer param groups, which is where ``scope="group"`` differs.

Metrics of a run (all from the recorded trajectory):

- ``steps_to_1e-6``: the first step with loss below 1e-6;
- ``zigzags``: steps where the loss rose by more than a relative 1e-9 while above the precision
  floor (1e-20 in float64, 1e-10 in float32);
- per-parameter contraction: the fitted rate ``exp(slope)`` of ``log |p - p*|`` against step,
  over the y-dominated phase and over the rest (two-parameter quadratics), or over the whole run;
- ``grad_ratio``: ``|g_x| / |g_y|`` at each step;
- the kink: the first step at which the y term's share of the loss falls below one half.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..optim.polyak import Polyak, PolyakAdam
from ..train import LoopResult, train_loop

Loss = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class Experiment:
    key: str
    title: str
    names: list[str]
    start: list[list[float]]
    loss: Loss
    steps: int
    solution: list[float] | None = None
    hessian_diag: list[float] | None = None  # exact, constant (quadratics)
    groups: list[list[int]] | None = None  # param-group layout for scope="group" (default: one per tensor)
    y_weight: float | None = None  # c in (x-a)^2 + c (y-b)^2, for the kink


def _linear_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(1.0, 5.0, 16, dtype=dtype)
    return x, 2.0 * x - 3.0


def _mlp_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.linspace(-1.0, 1.0, 32, dtype=torch.float64)
    teacher = [torch.randn(4, 1, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64) * 0.5,
               torch.randn(1, 4, generator=g, dtype=torch.float64) * 0.5, torch.randn(1, generator=g, dtype=torch.float64) * 0.1]
    y = _mlp(teacher, x)
    student = [torch.randn(4, 1, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64) * 0.5,
               torch.randn(1, 4, generator=g, dtype=torch.float64) * 0.5, torch.zeros(1, dtype=torch.float64)]
    return x.to(dtype), y.to(dtype), student


def _mlp(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = (x[:, None] @ p[0].T + p[1]) ** 2
    return (h @ p[2].T + p[3]).squeeze(-1)


def experiments(dtype: torch.dtype) -> list[Experiment]:
    lx, ly = _linear_data(dtype)
    mx, my, student = _mlp_data(dtype)
    m2 = float((lx.double() ** 2).mean())
    return [
        Experiment("exp1", "f(x) = (x-3)^2, scalar", ["x"], [[10.0]], lambda p: ((p[0] - 3) ** 2).sum(), 60,
                   solution=[3.0], hessian_diag=[2.0]),
        Experiment("exp2", "f(x,y) = (x-1)^2 + (y-2)^2, symmetric", ["x", "y"], [[10.0], [10.0]],
                   lambda p: ((p[0] - 1) ** 2 + (p[1] - 2) ** 2).sum(), 60, solution=[1.0, 2.0],
                   hessian_diag=[2.0, 2.0], y_weight=1.0),
        Experiment("exp3", "f(x,y) = (x-1)^2 + 100 (y-2)^2, asymmetric (c = 100)", ["x", "y"], [[10.0], [10.0]],
                   lambda p: ((p[0] - 1) ** 2 + 100 * (p[1] - 2) ** 2).sum(), 400, solution=[1.0, 2.0],
                   hessian_diag=[2.0, 200.0], y_weight=100.0),
        Experiment("exp4", "linear network y = w x + b, MSE on x = linspace(1, 5, 16), target 2x - 3",
                   ["w", "b"], [[0.0], [0.0]], lambda p: ((p[0] * lx + p[1] - ly) ** 2).mean(), 1000,
                   solution=[2.0, -3.0], hessian_diag=[2 * m2, 2.0]),
        Experiment("exp5", "MLP 1-4-1 with x^2 activation, fit to a teacher of the same shape (32 points)",
                   ["W1", "b1", "W2", "b2"], [t.flatten().tolist() for t in student],
                   lambda p: ((_mlp([p[0].view(4, 1), p[1], p[2].view(1, 4), p[3]], mx) - my) ** 2).mean(), 1000,
                   groups=[[0, 1], [2, 3]]),
    ]


# -- variants -----------------------------------------------------------------------------------

@dataclass
class Variant:
    key: str
    label: str
    make: Callable[[Experiment, list[torch.Tensor]], torch.optim.Optimizer]
    create_graph: bool = False
    needs: str | None = None  # "hessian" when it needs the exact Hessian diagonal
    lr_grid: tuple[float, ...] = ()


def _groups(exp: Experiment, params: list[torch.Tensor]) -> list[dict[str, Any]]:
    layout = exp.groups or [[i] for i in range(len(params))]
    return [{"params": [params[i] for i in idx]} for idx in layout]


def _per_tensor(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": [p]} for p in params]


def _exact(exp: Experiment, params: list[torch.Tensor]) -> Polyak:
    diag = {id(p): d for p, d in zip(params, exp.hessian_diag or [])}
    return Polyak(_per_tensor(params), precondition=lambda p: torch.full_like(p, diag[id(p)]), precond_eps=0.0)


VARIANTS = [
    Variant("global", "Polyak, one global step (the note's rule)", lambda e, p: Polyak(_per_tensor(p))),
    Variant("tensor-whole", "per tensor, whole loss each (the note's fix 1 as written)",
            lambda e, p: Polyak(_per_tensor(p), scope="tensor", share="whole")),
    Variant("tensor-equal", "per tensor, gap shared equally", lambda e, p: Polyak(_per_tensor(p), scope="tensor", share="equal")),
    Variant("tensor-norm", "per tensor, gap shared by ||g_i|| (default)", lambda e, p: Polyak(_per_tensor(p), scope="tensor")),
    Variant("group-norm", "per layer (param group), gap shared by ||g_i||", lambda e, p: Polyak(_groups(e, p), scope="group")),
    Variant("diag-exact", "D^-1 g with the exact Hessian diagonal", _exact, needs="hessian"),
    Variant("diag-hutchinson", "D^-1 g with a Hutchinson diagonal", lambda e, p: Polyak(_per_tensor(p), precondition="hutchinson"),
            create_graph=True),
    Variant("diag-rms", "D^-1 g with D = sqrt(squared-gradient average)", lambda e, p: Polyak(_per_tensor(p), precondition="rms")),
    Variant("hybrid", "Polyak magnitude, Adam direction", lambda e, p: PolyakAdam(_per_tensor(p))),
    Variant("adamw", "AdamW (weight decay 0), best rate of a grid", lambda e, p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0),
            lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)),
]


# -- running and measuring ------------------------------------------------------------------------

@dataclass
class Run:
    experiment: str
    variant: str
    dtype: str
    loss: list[float]
    params: list[list[float]]  # flattened parameters per step (steps + 1 rows)
    grad_norms: list[list[float]]  # per tensor, per step
    lr: float | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def run(exp: Experiment, variant: Variant, dtype: torch.dtype, lr: float | None = None) -> Run:
    params = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in exp.start]
    opt = variant.make(exp, params)
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    losses: list[float] = []
    gnorms: list[list[float]] = []
    traj = [torch.cat([p.detach().flatten() for p in params]).double().tolist()]

    def record(step: int, loss: float, res: LoopResult) -> None:  # every iterate, gradient norm and loss
        losses.append(loss)
        gnorms.append([float(p.grad.detach().norm()) for p in params])
        traj.append(torch.cat([p.detach().flatten() for p in params]).double().tolist())

    # No divergence rule: a run's whole trajectory is the measurement (a NaN is a result, see measure).
    res = train_loop(opt, exp.steps, lambda _: exp.loss(params), closure=True, create_graph=variant.create_graph,
                     on_step=record, divergence=None)
    with torch.no_grad():
        losses.append(float(exp.loss(params)))
    if res.error is not None:  # the parameters as the failed step left them
        traj.append(torch.cat([p.detach().flatten() for p in params]).double().tolist())
    error = res.error
    return Run(exp.key, variant.key, str(dtype).replace("torch.", ""), losses, traj, gnorms, lr, error)


def _fit_rate(errors: list[float]) -> float | None:
    e = np.asarray(errors, dtype=float)
    ok = e > 0
    if ok.sum() < 3:
        return None
    t = np.arange(len(e))[ok]
    slope = np.polyfit(t, np.log(e[ok]), 1)[0]
    return float(math.exp(slope))


def measure(exp: Experiment, r: Run) -> dict[str, Any]:
    floor = 1e-20 if r.dtype == "float64" else 1e-10
    loss = np.asarray(r.loss, dtype=float)
    finite = np.isfinite(loss)
    m: dict[str, Any] = {"final_loss": float(loss[-1]) if finite[-1] else None, "nan": bool((~finite).any())}
    below = np.nonzero(loss < 1e-6)[0]
    m["steps_to_1e-6"] = int(below[0]) if len(below) else None
    zig = [(a, b) for a, b in zip(loss[:-1], loss[1:]) if a > floor and b > a * (1 + 1e-9)]
    m["zigzags"] = len(zig)
    m["max_rise"] = float(max((b / a for a, b in zig), default=1.0))
    if exp.solution is None:
        gn = np.asarray(r.grad_norms)
        if len(gn):
            layer1 = np.sqrt((gn[:, :2] ** 2).sum(1))
            layer2 = np.sqrt((gn[:, 2:] ** 2).sum(1))
            m["grad_ratio_start"] = float(layer1[0] / layer2[0])
        return m
    p = np.asarray(r.params, dtype=float)
    sol = np.asarray(exp.solution)
    err = np.abs(p - sol)
    # Fit only while the error is well above the float precision of the parameter.
    tiny = (1e-14 if r.dtype == "float64" else 1e-6) * (np.abs(sol) + 1)
    stop = len(err)
    for t in range(len(err)):
        if (err[t] < tiny).all():
            stop = t
            break
    m["rates"] = {n: _fit_rate([e for e in err[:stop, i] if e > tiny[i]]) for i, n in enumerate(exp.names)}
    m["first_step_rates"] = {n: float(err[1, i] / err[0, i]) if err[0, i] > 0 else None for i, n in enumerate(exp.names)}
    if len(exp.names) == 2:
        g = np.asarray(r.grad_norms)
        ratio = g[:, 0] / np.maximum(g[:, 1], 1e-300)
        m["grad_ratio"] = ratio.tolist()
        m["grad_ratio_start"] = float(ratio[0])
        cross = np.nonzero(ratio >= 1.0)[0]
        m["grad_ratio_reaches_1"] = int(cross[0]) if len(cross) else None
    if exp.y_weight is not None and len(exp.names) == 2:
        yterm = exp.y_weight * (p[:, 1] - sol[1]) ** 2
        xterm = (p[:, 0] - sol[0]) ** 2
        kink = next((t for t in range(len(p)) if yterm[t] < xterm[t]), None)
        m["kink_step"] = kink
        if kink is not None and kink > 1:
            m["rates_before_kink"] = {n: _fit_rate([e for e in err[:kink, i] if e > tiny[i]]) for i, n in enumerate(exp.names)}
            m["rates_after_kink"] = {n: _fit_rate([e for e in err[kink:stop, i] if e > tiny[i]]) for i, n in enumerate(exp.names)}
            # y crossing its target (sign changes of y - y*): oscillation in y
            d = np.sign(p[kink:stop, 1] - sol[1])
            m["y_sign_changes_after_kink"] = int((d[1:] * d[:-1] < 0).sum())
    return m


def run_all(dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
            variants: list[str] | None = None,
            on_part: Callable[[str, list[Run]], None] | None = None) -> list[Run]:
    """Every experiment x variant x dtype; AdamW at the best rate of its grid (lowest final loss,
    ties broken by fewer steps to 1e-6). ``variants`` restricts the variants (by key).
    ``on_part(name, runs)`` is called as each experiment finishes in each dtype (``"exp1-float64"``)."""
    out: list[Run] = []
    chosen = [v for v in VARIANTS if variants is None or v.key in variants]
    for dtype in dtypes:
        for exp in experiments(dtype):
            first = len(out)
            for v in chosen:
                if v.needs == "hessian" and exp.hessian_diag is None:
                    continue
                if v.lr_grid:
                    trials = [run(exp, v, dtype, lr) for lr in v.lr_grid]
                    for t in trials:
                        t.metrics = measure(exp, t)
                    best = min(trials, key=lambda t: (t.metrics["final_loss"] if t.metrics["final_loss"] is not None
                                                      else math.inf, t.metrics["steps_to_1e-6"] or math.inf))
                    out.append(best)
                    continue
                r = run(exp, v, dtype)
                r.metrics = measure(exp, r)
                out.append(r)
            if on_part is not None:
                on_part(f"{exp.key}-{str(dtype).removeprefix('torch.')}", out[first:])
    return out
