"""``nestopt study controller --out DIR``: which of the research note's ideas for the nested
optimizer's controller pay off (``000_94d276edca61e15a.txt``)?

Four parts, all on the bench's quick-suite tasks through the bench's own runner (same budgets,
batches, evaluation and timing rules; time is training time, the controller's work included):

1. **Robustness to the base learning rate.** The default ``NestedOptimizer`` (AdamW inside, the
   hindsight signal), AdamW and hypergradient descent (``adamw-hd``) at five base rates spanning
   100x around each task's tuned AdamW rate ``lr*`` (``lr* x`` 0.1, 0.316, 1, 3.16, 10), 3 seeds.
   ``lr*`` and the target come from AdamW over its 9-point grid (1e-4 to 1): the target is the
   final validation loss AdamW reaches at ``lr*`` on its worst seed. For each task and method, a
   rate counts as *robust* when its median time-to-target is within 2x of that method's best rate.
   The difference from AdamW's count carries a 90% interval from a paired bootstrap over seeds.
2. **Ablations of signals and features** at base rates ``lr* x`` 0.1, 1 and 10, 2 seeds: each signal
   against ``frozen`` (the untrained controller, i.e. AdamW with the controller's bookkeeping),
   and each feature removed from (or added to) the default. Verdicts come from paired
   comparisons of the final validation loss (same task, rate and seed).
3. **Per-head feedback on the multi-horizon task**: trunk and each of the 7 horizon heads as its
   own param group, ``step(head_stats=...)`` fed with each head's training loss and latest
   validation AUC. Does it lift the long horizons that sit at chance AUC?
4. **Cost**: the hindsight signal's amortised step time as a multiple of AdamW's and of the frozen
   controller's on the same task; parameter-free peers (Prodigy, schedule-free AdamW) at their
   defaults for reference.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..bench.runner import Job, run_jobs
from ..bench.scoring import _median, attach_targets, choose_rates, targets
from ..bench import registry as opt_registry
from ..optim.nested import DEFAULT_FEATURES, NestedOptimizer
from ..bench.registry import LR_GRID_ADAM, OptimizerSpec
from ._common import finite

# the prefix of the variants' optimizer names (as in earlier studies' records, so they still match)
MODULE = "nestopt.studies.controller"
TASKS = ("quad-asym", "quad-cond1e2", "rosenbrock", "digits-logreg", "digits-mlp", "diabetes-mlp",
         "trading-multihorizon")
# Base rates, as multiples of each task's tuned AdamW rate lr*: a 100x range centred on it.
ROBUST = (0.1, 0.316, 1.0, 3.16, 10.0)
ABLATION = (0.1, 1.0, 10.0)


def _nested(params: Any, lr: float, **cfg: Any) -> torch.optim.Optimizer:
    return NestedOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True,
                           per_tensor_groups=True, **cfg)


def _minus(name: str) -> tuple[str, ...]:
    return tuple(f for f in DEFAULT_FEATURES if f != name)


# name -> (NestedOptimizer options, what it is compared with)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "frozen": ({"signal": "frozen"}, ""),
    "hindsight": ({}, "frozen"),
    "proxy": ({"signal": "proxy"}, "frozen"),
    "validation": ({"signal": "validation"}, "frozen"),
    **{f"no-{f}": ({"features": _minus(f)}, "hindsight") for f in DEFAULT_FEATURES},
    "plus-curvature": ({"features": (*DEFAULT_FEATURES, "curvature")}, "hindsight"),
    "plus-scratchpad": ({"scratchpad": 8}, "hindsight"),
}

# Hindsight configurations compared by ``nestopt study controller-variants``, each with its
# ``label_shift`` spelled out so that a row means the same whatever the default: label shift 1
# labels the best replay's multiplier itself (the default until 2026-11-23), label shift 2 the
# grid point nearest twice it (the default since, against the greedy label's short-horizon bias);
# the ``mult`` feature lets the controller see where its multiplier is; a 16-step window replays a
# longer horizon; a 16-step period labels twice as often; the wider grid lets one label move the
# multiplier 4x; ``follow=1`` takes the labels directly (a line search over time, the controller
# untrained): is the signal or the controller's learning of it what limits robustness?
VARIANTS: dict[str, dict[str, Any]] = {
    "label shift 1": {"label_shift": 1.0},
    "label shift 2 (default)": {"label_shift": 2.0},
    "mult feature": {"features": (*DEFAULT_FEATURES, "mult"), "label_shift": 1.0},
    "mult feature, label shift 2": {"features": (*DEFAULT_FEATURES, "mult"), "label_shift": 2.0},
    "window 16": {"window": 16, "label_shift": 1.0},
    "label shift 2, period 16": {"label_shift": 2.0, "period": 16},
    "label shift 2, grid 0.25-4": {"label_shift": 2.0, "grid": (0.25, 0.5, 1.0, 2.0, 4.0)},
    "labels followed directly": {"label_shift": 2.0, "follow": 1.0},
    "labels followed directly, period 16": {"label_shift": 2.0, "follow": 1.0, "period": 16},
}


def _slug(label: str) -> str:
    return "variant-" + "".join(c if c.isalnum() else "-" for c in label)


_BASE = {"default_lr": 1e-3, "needs_loss": True, "nonfinite": "skip", "group_independent": False}
STUDY_SPECS: dict[str, OptimizerSpec] = {
    **{f"nested-{k}": OptimizerSpec(f"{MODULE}:nested-{k}", partial(_nested, **cfg), description=f"nested, {k}", **_BASE)
       for k, (cfg, _) in CONFIGS.items()},
    **{_slug(k): OptimizerSpec(f"{MODULE}:{_slug(k)}", partial(_nested, **cfg), description=f"nested, {k}", **_BASE)
       for k, cfg in VARIANTS.items()},
}
for _spec in STUDY_SPECS.values():  # the bench's runner finds them by name, in its workers too
    opt_registry.register_variant(_spec)


def _name(config: str) -> str:
    return f"{MODULE}:nested-{config}"


def _steps(t: str) -> int:
    from .. import tasks as task_registry

    return task_registry.get(t).default_steps


def _around(lr: float, factors: tuple[float, ...]) -> list[float]:
    return [float(f"{lr * f:.3g}") for f in factors]


def plan_tuning(seeds: int, tasks: tuple[str, ...]) -> list[Job]:
    """Phase 1: AdamW over its grid (sets each task's target and tuned rate ``lr*``)."""
    return [Job(t, "adamw", lr, s, _steps(t)) for t in tasks for lr in LR_GRID_ADAM for s in range(seeds)]


def plan_main(best: dict[str, float], seeds: int, ablation_seeds: int, tasks: tuple[str, ...],
              done: set[tuple[str, str, float, int]]) -> list[Job]:
    """Phase 2, around each task's tuned AdamW rate ``lr*``: the 100x range ``lr* x ROBUST``
    for AdamW (the grid runs are reused), hypergradient descent and the default nested optimizer;
    the ablations at ``lr* x ABLATION``; the peers at their defaults."""
    jobs: list[Job] = []
    for t in tasks:
        n, lrs = _steps(t), _around(best[t], ROBUST)
        for opt in ("adamw", "adamw-hd", _name("hindsight")):
            jobs += [Job(t, opt, lr, s, n) for lr in lrs for s in range(seeds) if (t, opt, lr, s) not in done]
        for c in CONFIGS:
            if c != "hindsight":
                jobs += [Job(t, _name(c), lr, s, n) for lr in _around(best[t], ABLATION) for s in range(ablation_seeds)]
        for peer in ("prodigy", "schedulefree-adamw"):
            spec = opt_registry.get(peer)
            if spec.available():
                jobs += [Job(t, peer, spec.default_lr, s, n) for s in range(seeds)]
    return jobs


# -- part 3: per-head feedback on the multi-horizon task ------------------------------------------

HEAD_CONFIGS = {
    "adamw": None,
    "nested-hindsight": {},
    "nested-hindsight+heads": {"features": (*DEFAULT_FEATURES, "heads")},
    "nested-proxy+heads": {"signal": "proxy", "features": (*DEFAULT_FEATURES, "heads")},
}


def train_heads(config: str, seed: int, lr: float = 1e-3, steps: int | None = None,
                eval_every: int = 20) -> dict[str, Any]:
    """Train the multi-horizon model with trunk + per-head groups; return curves, final per-head
    validation AUCs and the multiplier trace."""
    from .. import tasks as task_registry

    torch.set_num_threads(1)
    task = task_registry.get("trading-multihorizon")
    steps = steps or task.default_steps
    model = task.init(seed)
    groups = [{"params": list(model.trunk.parameters()), "depth": 0.0}]
    groups += [{"params": list(h.parameters()), "depth": 1.0, "head": i} for i, h in enumerate(model.heads)]
    cfg = HEAD_CONFIGS[config]
    if cfg is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, fused=True)
    else:
        opt = NestedOptimizer(groups, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True, seed=seed, **cfg)
    next_batch = task.sampler(seed)
    metrics = task.evaluate(model)
    aucs = [metrics[f"val_auc_{h}"] for h in task.horizons]
    trace: dict[str, list[Any]] = {"step": [], "mult": [], "val_loss": [], "aucs": []}
    train_time = 0.0
    for step in range(steps):
        batch = next_batch(step)
        t0 = time.perf_counter()
        box: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            per_head = task.head_losses(model, batch)
            box["heads"] = per_head.detach()
            loss = per_head.mean()
            loss.backward()
            return loss

        if isinstance(opt, NestedOptimizer):
            # head losses come out of this step's closure: a callable is read after it ran
            loss = opt.step(closure, head_stats=lambda: {"loss": box["heads"].tolist(), "auc": aucs})
        else:
            loss = closure()
            opt.step()
        train_time += time.perf_counter() - t0
        if not math.isfinite(float(loss.detach())):
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            metrics = task.evaluate(model)
            aucs = [metrics[f"val_auc_{h}"] for h in task.horizons]
            if isinstance(opt, NestedOptimizer):
                opt.observe_validation(metrics["val_loss"])
            trace["step"].append(step + 1)
            trace["mult"].append(opt.multipliers() if isinstance(opt, NestedOptimizer) else [1.0] * len(groups))
            trace["val_loss"].append(metrics["val_loss"])
            trace["aucs"].append(aucs)
    return {"config": config, "seed": seed, "lr": lr, "final_val_loss": metrics["val_loss"],
            "aucs": dict(zip(task.horizons, aucs)), "train_s": train_time, "trace": trace}


def trace_multipliers(task_name: str, lr: float, seed: int = 0, config: str = "hindsight") -> dict[str, Any]:
    """One bench-style run that records each tensor's multiplier at every evaluation."""
    from .. import tasks as task_registry

    task = task_registry.get(task_name)
    model = task.init(seed)
    opt = _nested(model.parameters(), lr, **CONFIGS[config][0])
    assert isinstance(opt, NestedOptimizer)
    names = [n for n, _ in model.named_parameters()]
    next_batch = task.sampler(seed)
    steps, out = task.default_steps, {"step": [], "mult": []}
    for step in range(steps):
        batch = next_batch(step)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
        if (step + 1) % max(1, steps // 40) == 0:
            out["step"].append(step + 1)
            out["mult"].append(opt.multipliers())
    return {"task": task_name, "lr": lr, "names": names, **out}


def frozen_sweep(controller: str, tasks: tuple[str, ...] = ("digits-mlp", "diabetes-mlp", "quad-asym"),
                 lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1), seeds: int = 3) -> list[dict[str, Any]]:
    """A frozen controller (a file from ``nestopt meta-train --net controller``) against AdamW at
    the same base rates: median final validation loss over seeds, and the controller's median
    multiplier at the end of the run. Run with ``python -c "from nestopt.studies.controller import
    frozen_sweep; print(frozen_sweep('net.safetensors'))"``."""
    from .. import tasks as task_registry

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
                    next_batch = task.sampler(seed)
                    for step in range(task.default_steps):
                        opt.zero_grad(set_to_none=True)
                        loss = task.loss(model, next_batch(step))
                        loss.backward()
                        opt.step(loss=loss) if label == "frozen" else opt.step()
                    finals.append(task.evaluate(model)["val_loss"])
                    if isinstance(opt, NestedOptimizer):
                        mults.append(statistics.median(opt.multipliers()))
                row[label] = statistics.median(finals)
                if mults:
                    row["multiplier"] = statistics.median(mults)
            rows.append(row)
    return rows


# -- analysis -----------------------------------------------------------------------------------

INF = float("inf")


def _ttt(r: dict[str, Any]) -> float:
    v = r.get("time_to_target_s")
    return INF if v is None else float(v)


def _final(r: dict[str, Any]) -> float:
    v = r["final_val_loss"]
    return INF if (r["diverged"] or v is None) else float(v)


def _within_2x(ttt: dict[float, float]) -> list[float]:
    """The base-rate factors whose time to target is within 2x of the best one (a target never
    reached is not within)."""
    best = min(ttt.values())
    return [f for f, v in ttt.items() if math.isfinite(v) and v <= 2 * best]


def robustness(records: list[dict[str, Any]], tasks: tuple[str, ...], best_lr: dict[str, float],
               methods: dict[str, str] | None = None) -> dict[str, Any]:
    """Per method (label -> optimizer name) and task: median time-to-target per base rate, and how
    many rates are within 2x of the method's best rate."""
    if methods is None:
        methods = {"adamw": "adamw", "adamw-hd": "adamw-hd", "nested (default)": _name("hindsight")}
    out: dict[str, Any] = {}
    for label, opt in methods.items():
        per_task, robust, cells = {}, 0, 0
        for t in tasks:
            ttt = {f: _median([_ttt(r) for r in records if r["task"] == t and r["optimizer"] == opt and r["lr"] == lr])
                   for f, lr in zip(ROBUST, _around(best_lr[t], ROBUST))}
            ok = _within_2x(ttt)
            per_task[t] = {"ttt": {str(k): v for k, v in ttt.items()}, "best": min(ttt.values()), "robust_lrs": ok}
            robust += len(ok)
            cells += len(ROBUST)
        out[label] = {"tasks": per_task, "robust": robust, "cells": cells, "fraction": robust / max(cells, 1)}
    return out


def robust_difference(records: list[dict[str, Any]], tasks: tuple[str, ...], best_lr: dict[str, float], a: str,
                      b: str, draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How sure is "``a`` has more robust rates than ``b``"? A paired bootstrap over seeds: each
    draw resamples, in every (task, rate) cell, the seeds with replacement (the same seeds for both
    methods, since a seed fixes the data and the initial weights), recounts both methods' robust
    rates as :func:`robustness` does, and records ``count(a) - count(b)``. Returns the observed
    difference, its 90% interval, and the share of draws in which ``a`` is ahead and behind."""
    cells: dict[tuple[str, float], dict[str, dict[int, float]]] = {}
    for t in tasks:
        for f, lr in zip(ROBUST, _around(best_lr[t], ROBUST)):
            cells[(t, f)] = {opt: {r["seed"]: _ttt(r) for r in records
                                   if r["task"] == t and r["optimizer"] == opt and r["lr"] == lr} for opt in (a, b)}

    def count(opt: str, picks: dict[tuple[str, float], list[int]] | None) -> int:
        n = 0
        for t in tasks:
            ttt = {}
            for f in ROBUST:
                runs = cells[(t, f)][opt]
                chosen = picks[(t, f)] if picks is not None else sorted(runs)
                ttt[f] = _median([runs[s] for s in chosen if s in runs])
            n += len(_within_2x(ttt))
        return n

    observed = count(a, None) - count(b, None)
    rng = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(draws):
        picks = {}
        for key, runs in cells.items():
            seeds = sorted(set(runs[a]) | set(runs[b]))
            idx = torch.randint(0, len(seeds), (len(seeds),), generator=rng).tolist() if seeds else []
            picks[key] = [seeds[i] for i in idx]
        diffs.append(count(a, picks) - count(b, picks))
    diffs.sort()
    lo, hi = diffs[int(0.05 * (draws - 1))], diffs[int(math.ceil(0.95 * (draws - 1)))]
    return {"a": a, "b": b, "observed": observed, "interval90": [lo, hi], "draws": draws,
            "ahead": sum(d > 0 for d in diffs) / draws, "behind": sum(d < 0 for d in diffs) / draws}


def robust_verdict(diff: dict[str, Any]) -> str:
    """"more" / "less" when the 90% interval of the difference excludes 0, else "no clear difference"."""
    lo, hi = diff["interval90"]
    return "more" if lo > 0 else "less" if hi < 0 else "no clear difference"


def paired(records: list[dict[str, Any]], a: str, b: str, factors: tuple[float, ...], seeds: int,
           best_lr: dict[str, float], tol: float = 0.01) -> dict[str, Any]:
    """Final validation loss of ``a`` against ``b`` on the same (task, rate, seed), at the rates
    ``lr* x factors``."""
    index = {(r["task"], r["optimizer"], r["lr"], r["seed"]): r for r in records}
    wins = losses = ties = 0
    logs: list[float] = []
    reach = {a: 0, b: 0}
    n = 0
    for (t, o, lr, s), r in index.items():
        if o != a or s >= seeds or t not in best_lr or lr not in _around(best_lr[t], factors):
            continue
        q = index.get((t, b, lr, s))
        if q is None:
            continue
        n += 1
        fa, fb = _final(r), _final(q)
        reach[a] += r.get("time_to_target_s") is not None
        reach[b] += q.get("time_to_target_s") is not None
        if fa < fb * (1 - tol):
            wins += 1
        elif fa > fb * (1 + tol):
            losses += 1
        else:
            ties += 1
        if math.isfinite(fa) and math.isfinite(fb) and fa > 0 and fb > 0:
            logs.append(math.log(fa / fb))
    margin = max(3, math.ceil(0.25 * n))
    verdict = "better" if wins - losses >= margin else "worse" if losses - wins >= margin else "no clear effect"
    return {"pairs": n, "wins": wins, "losses": losses, "ties": ties,
            "geo_ratio": math.exp(statistics.fmean(logs)) if logs else None, "verdict": verdict,
            "reached_target": reach}


def ablations(records: list[dict[str, Any]], seeds: int, best_lr: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for c, (_, ref) in CONFIGS.items():
        if not ref:
            continue
        p = paired(records, _name(c), _name(ref), ABLATION, seeds, best_lr)
        if c.startswith("no-"):
            what = f"feature `{c[3:]}`"
            helped = {"worse": "helped", "better": "hurt", "no clear effect": "no clear effect"}[p["verdict"]]
        elif c.startswith("plus-"):
            what = f"adding `{c[5:]}`"
            helped = {"better": "helped", "worse": "hurt", "no clear effect": "no clear effect"}[p["verdict"]]
        else:
            what = f"signal `{c}`"
            helped = {"better": "helped", "worse": "hurt", "no clear effect": "no clear effect"}[p["verdict"]]
        per_lr = {str(f): paired(records, _name(c), _name(ref), (f,), seeds, best_lr) for f in ABLATION}
        rows.append({**p, "config": c, "reference": ref, "what": what, "verdict": helped, "comparison": p["verdict"],
                     "per_lr": {k: {"wins": v["wins"], "losses": v["losses"], "geo_ratio": v["geo_ratio"]}
                                for k, v in per_lr.items()}})
    return rows


def costs(records: list[dict[str, Any]], tasks: tuple[str, ...], best_lr: dict[str, float]) -> dict[str, dict[str, float]]:
    """Median ms per training step at ``lr*`` (all seeds), and the ratios the issue asks for."""
    out = {}
    for t in tasks:
        ms = {}
        for label, opt in (("adamw", "adamw"), ("frozen", _name("frozen")), ("hindsight", _name("hindsight")),
                           ("proxy", _name("proxy")), ("adamw-hd", "adamw-hd")):
            ms[label] = _median([r["ms_per_step"] for r in records if r["task"] == t and r["optimizer"] == opt
                                 and r["lr"] == best_lr[t] and not r["error"]])
        out[t] = {**{f"ms_{k}": v for k, v in ms.items()},
                  "hindsight_x_adamw": ms["hindsight"] / ms["adamw"], "hindsight_x_frozen": ms["hindsight"] / ms["frozen"],
                  "frozen_x_adamw": ms["frozen"] / ms["adamw"], "proxy_x_adamw": ms["proxy"] / ms["adamw"]}
    return out


def peers(records: list[dict[str, Any]], chosen: dict[tuple[str, str], dict[str, Any]],
          tasks: tuple[str, ...], best_lr: dict[str, float]) -> dict[str, dict[str, float]]:
    """Median time-to-target per task for the entries a user would compare."""
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        tuned = chosen.get((t, "adamw"), {}).get("lr")
        rows = {
            "adamw-tuned": [r for r in records if r["task"] == t and r["optimizer"] == "adamw" and r["lr"] == tuned],
            **{f"{label}@lr*x{f:g}": [r for r in records if r["task"] == t and r["optimizer"] == opt and r["lr"] == lr]
               for label, opt in (("adamw", "adamw"), ("nested", _name("hindsight")), ("adamw-hd", "adamw-hd"))
               for f, lr in zip(ABLATION, _around(best_lr[t], ABLATION))},
            "prodigy": [r for r in records if r["task"] == t and r["optimizer"] == "prodigy"],
            "schedulefree-adamw": [r for r in records if r["task"] == t and r["optimizer"] == "schedulefree-adamw"],
        }
        out[t] = {k: _median([_ttt(r) for r in v]) for k, v in rows.items() if v}
    return out


def heads_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from ..tasks.trading import HORIZON_NAMES

    out: dict[str, Any] = {}
    for c in HEAD_CONFIGS:
        rs = [r for r in runs if r["config"] == c]
        if not rs:
            continue
        out[c] = {h: {"mean": statistics.fmean(r["aucs"][h] for r in rs),
                      "sd": statistics.stdev([r["aucs"][h] for r in rs]) if len(rs) > 1 else 0.0} for h in HORIZON_NAMES}
        out[c]["val_loss"] = statistics.fmean(r["final_val_loss"] for r in rs)
        out[c]["train_s"] = statistics.fmean(r["train_s"] for r in rs)
    return out


# -- figures ------------------------------------------------------------------------------------

def _save(fig: Any, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _log_y(ax: Any) -> None:
    """Log y axis when the axes hold positive data (an empty panel stays linear)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys:
        ax.set_yscale("log")


def _figures(rob: dict[str, Any], abl: list[dict[str, Any]], heads: dict[str, Any], head_runs: list[dict[str, Any]],
             traces: list[dict[str, Any]], tasks: tuple[str, ...], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    n = len(tasks)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(16, 3.6 * math.ceil(n / cols)), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for label, m in rob.items():
            ys = [m["tasks"][t]["ttt"][str(f)] for f in ROBUST]
            ax.plot(ROBUST, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlim(0.07, 14)
        _log_y(ax)
        ax.set_title(t)
        ax.set_xlabel("base learning rate / tuned AdamW's")
        ax.set_ylabel("time to target (s)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("time to tuned AdamW's target against the base rate (median over seeds; gaps: target not reached)")
    files.append(_save(fig, out, "robustness.png"))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['config']} vs {r['reference']}" for r in abl]
    vals = [r["geo_ratio"] if r["geo_ratio"] else float("nan") for r in abl]
    ax.barh(labels, vals, color=["tab:green" if v < 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="k", lw=0.8)
    if any(math.isfinite(v) and v > 0 for v in vals):
        ax.set_xscale("log")
    ax.set_xlabel("geometric mean of final val loss ratio (config / reference); < 1 is better")
    ax.set_title("ablations: paired over tasks, base rates lr* x (0.1, 1, 10) and seeds")
    files.append(_save(fig, out, "ablations.png"))

    from ..tasks.trading import HORIZON_NAMES

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    x = range(len(HORIZON_NAMES))
    w = 0.8 / max(len(heads), 1)
    for i, (c, h) in enumerate(heads.items()):
        axes[0].bar([j + i * w for j in x], [h[n]["mean"] for n in HORIZON_NAMES], width=w,
                    yerr=[h[n]["sd"] for n in HORIZON_NAMES], label=c, capsize=2)
    axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[0].set_xticks([j + 0.4 - w / 2 for j in x], HORIZON_NAMES)
    axes[0].set_ylabel("validation AUC (mean ± sd over seeds)")
    axes[0].set_title("multi-horizon task, trunk + per-head groups, tuned AdamW's rate")
    axes[0].legend(fontsize=8)
    run = next((r for r in head_runs if r["config"] == "nested-hindsight+heads" and r["seed"] == 0), None)
    if run is not None:
        tr = run["trace"]
        names = ["trunk", *HORIZON_NAMES]
        for k, nm in enumerate(names):
            axes[1].plot(tr["step"], [m[k] for m in tr["mult"]], label=nm)
        _log_y(axes[1])
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("multiplier")
        axes[1].set_title("nested-hindsight+heads, seed 0: multiplier per group")
        axes[1].legend(fontsize=8, ncol=2)
    files.append(_save(fig, out, "heads.png"))

    if traces:
        fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
        for ax, tr in zip(axes[0], traces):
            for k, nm in enumerate(tr["names"]):
                ax.plot(tr["step"], [m[k] for m in tr["mult"]], label=nm)
            _log_y(ax)
            ax.set_title(f"{tr['task']}, base lr {tr['lr']:g}")
            ax.set_xlabel("step")
            ax.set_ylabel("multiplier (per tensor)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("default nested optimizer: the multiplier of each tensor over training (seed 0)")
        files.append(_save(fig, out, "multipliers.png"))
    return files


# -- the study ----------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _tune(seeds: int, tasks: tuple[str, ...], workers: int | None) -> tuple[list[dict[str, Any]], dict[Any, Any],
                                                                         dict[str, float], set[tuple[str, str, float, int]]]:
    """Phase 1 (AdamW over its grid): the records, the chosen rates, each task's ``lr*`` and the
    keys already run."""
    records, interrupted = run_jobs(plan_tuning(seeds, tasks), workers=workers)
    if interrupted:
        raise KeyboardInterrupt
    chosen = choose_rates(records)
    best_lr = {t: chosen[(t, "adamw")]["lr"] for t in tasks}
    return records, chosen, best_lr, {(r["task"], r["optimizer"], r["lr"], r["seed"]) for r in records}


def run_study(out: str | Path, seeds: int = 3, ablation_seeds: int = 2, head_seeds: int = 3,
              tasks: tuple[str, ...] = TASKS, workers: int | None = None, head_steps: int | None = None) -> dict[str, Any]:
    """Run every part; write ``report.md``, ``results.json`` and figures to ``out``."""
    import multiprocessing as mp

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, chosen, best_lr, done = _tune(seeds, tasks, workers)
    more, interrupted = run_jobs(plan_main(best_lr, seeds, ablation_seeds, tasks, done), workers=workers)
    if interrupted:
        raise KeyboardInterrupt
    records += more
    t_bench = time.perf_counter() - t0
    tgt = targets(chosen)
    attach_targets(records, tgt)
    head_lr = best_lr.get("trading-multihorizon", 1e-3)
    head_jobs = [(c, s) for c in HEAD_CONFIGS for s in range(head_seeds)]
    if workers == 1:
        head_runs = [train_heads(c, s, lr=head_lr, steps=head_steps) for c, s in head_jobs]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            head_runs = pool.starmap(partial(_train_heads_job, lr=head_lr, steps=head_steps), head_jobs)
    traces = [trace_multipliers("digits-mlp", lr) for lr in _around(best_lr["digits-mlp"], ABLATION)] \
        if "digits-mlp" in tasks else []
    rob = robustness(records, tasks, best_lr)
    diff = robust_difference(records, tasks, best_lr, _name("hindsight"), "adamw")
    abl = ablations(records, ablation_seeds, best_lr)
    cost = costs(records, tasks, best_lr)
    peer = peers(records, chosen, tasks, best_lr)
    heads = heads_summary(head_runs)
    figures = _figures(rob, abl, heads, head_runs, traces, tasks, out)
    wall = time.perf_counter() - t0
    doc = {"study": "controller", "wall_s": wall, "bench_s": t_bench, "runs": len(records), "targets": tgt,
           "best_lr": best_lr, "head_lr": head_lr, "robustness": rob, "robust_difference": diff, "ablations": abl,
           "costs": cost,
           "peers": peer, "heads": heads,
           "head_runs": [{k: v for k, v in r.items() if k != "trace"} for r in head_runs],
           "traces": traces, "figures": figures,
           "records": [{k: v for k, v in r.items() if k != "curve"} for r in records]}
    (out / "results.json").write_text(json.dumps(finite(doc), indent=1))
    (out / "report.md").write_text(_report(doc, seeds, ablation_seeds, head_seeds, tasks))
    return doc


def _ttt_table(rob: dict[str, Any], tasks: tuple[str, ...]) -> list[str]:
    """Report lines: each method's median time to target per task and base rate."""
    L = ["Median time to target (s) per task and base rate (`-`: not reached):", "",
         "| task | method | " + " | ".join(f"lr* x {x:g}" for x in ROBUST) + " |", "|---|---|" + "---|" * len(ROBUST)]
    for t in tasks:
        for label, m in rob.items():
            row = m["tasks"][t]["ttt"]
            L.append(f"| {t} | {label} | " + " | ".join(_fmt(row[str(x)]) for x in ROBUST) + " |")
    return L


def _option(key: str, value: Any) -> str:
    if key == "features":  # the default set plus or minus some names
        plus = [f for f in value if f not in DEFAULT_FEATURES]
        minus = [f for f in DEFAULT_FEATURES if f not in value]
        return "features: default" + "".join(f" + {f}" for f in plus) + "".join(f" - {f}" for f in minus)
    return f"`{key}={value!r}`"


def check_variants(variants: tuple[str, ...], seeds: int) -> None:
    """``ValueError`` naming the argument for an unknown variant or fewer than one seed."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is unknown; valid: {', '.join(repr(k) for k in VARIANTS)}")
    if seeds < 1:
        raise ValueError(f"seeds {seeds} is invalid: expected at least 1")


def run_variants(out: str | Path, variants: tuple[str, ...] = tuple(VARIANTS), seeds: int = 3,
                 tasks: tuple[str, ...] = TASKS, workers: int | None = None) -> dict[str, Any]:
    """``nestopt study controller-variants``: part 1 of the study (robustness to the base rate) for
    each of :data:`VARIANTS`, against AdamW; writes ``variants.md`` and ``variants.json``."""
    check_variants(variants, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, chosen, best_lr, done = _tune(seeds, tasks, workers)
    methods = {"adamw": "adamw", **{v: f"{MODULE}:{_slug(v)}" for v in variants}}
    jobs = [Job(t, opt, lr, s, _steps(t)) for t in tasks for opt in methods.values()
            for lr in _around(best_lr[t], ROBUST) for s in range(seeds) if (t, opt, lr, s) not in done]
    more, interrupted = run_jobs(jobs, workers=workers)
    if interrupted:
        raise KeyboardInterrupt
    records += more
    attach_targets(records, targets(chosen))
    rob = robustness(records, tasks, best_lr, methods)
    diffs = {v: robust_difference(records, tasks, best_lr, methods[v], "adamw") for v in variants}
    wall = time.perf_counter() - t0
    doc = {"study": "controller-variants", "wall_s": wall, "runs": len(records), "best_lr": best_lr, "seeds": seeds,
           "variants": {v: VARIANTS[v] for v in variants}, "robustness": rob, "robust_difference": diffs}
    (out / "variants.json").write_text(json.dumps(finite(doc), indent=1, default=list))
    L = ["# The nested optimizer's default against variants: robustness to the base rate", "",
         f"Command: `nestopt study controller-variants --out DIR` ({wall:.0f} s here, {len(records)} bench runs). "
         f"Part 1 of `nestopt study controller` for each variant: base rates lr* x ({', '.join(f'{x:g}' for x in ROBUST)}) "
         f"around tuned AdamW's rate, {seeds} seeds; a rate is robust when the median time-to-target there is within "
         "2x of the method's best rate on that task (a target never reached is not within). The difference "
         "from AdamW carries a 90% interval from a paired bootstrap over seeds (see `robust_difference`).", "",
         "| method | options | robust rates | minus AdamW's (90% interval) |", "|---|---|---|---|"]
    for label, m in rob.items():
        opts = "AdamW" if label == "adamw" else (", ".join(_option(k, v) for k, v in VARIANTS[label].items()) or "-")
        d = diffs.get(label)
        vs = "-" if d is None else f"{d['observed']:+d} [{d['interval90'][0]:+d}, {d['interval90'][1]:+d}]"
        L.append(f"| {label} | {opts} | {m['robust']} / {m['cells']} | {vs} |")
    L += ["", *_ttt_table(rob, tasks)]
    (out / "variants.md").write_text("\n".join(L) + "\n")
    return doc


def _train_heads_job(config: str, seed: int, lr: float = 1e-3, steps: int | None = None) -> dict[str, Any]:
    return train_heads(config, seed, lr=lr, steps=steps)


def _report(doc: dict[str, Any], seeds: int, ablation_seeds: int, head_seeds: int, tasks: tuple[str, ...]) -> str:
    from ..tasks.trading import HORIZON_NAMES

    rob = doc["robustness"]
    L = ["# The nested optimizer's controller: which signals and features pay off", "",
         f"Command: `nestopt study controller --out DIR` ({doc['wall_s']:.0f} s here, {doc['runs']} bench runs on "
         f"{len(tasks)} tasks). {__doc__.split(chr(10) + chr(10), 1)[1]}",
         "## 1. Robustness to the base learning rate", "",
         f"Base rates lr* x ({', '.join(f'{x:g}' for x in ROBUST)}), lr* = tuned AdamW's rate on the task "
         f"({', '.join(f'{t} {v:g}' for t, v in doc['best_lr'].items())}); {seeds} seeds; a rate is robust when the "
         "method's median time-to-target there is within 2x of its best rate on that task (a target never "
         "reached is not within).", "",
         "| method | robust rates | fraction |", "|---|---|---|"]
    for label, m in rob.items():
        L.append(f"| {label} | {m['robust']} / {m['cells']} | {m['fraction']:.2f} |")
    nd, aw = rob["nested (default)"]["robust"], rob["adamw"]["robust"]
    diff = doc["robust_difference"]
    verdict = robust_verdict(diff)
    lo, hi = diff["interval90"]
    L += ["", f"**Verdict:** {'more' if verdict == 'more' else 'less' if verdict == 'less' else 'not shown more'} "
          f"robust to the base rate than AdamW: {nd} vs {aw} robust rates, a difference of {diff['observed']:+d} "
          f"with a 90% interval of [{lo:+d}, {hi:+d}] from a paired bootstrap over seeds ({diff['draws']} draws; "
          f"the default is ahead in {diff['ahead']:.0%} of them and behind in {diff['behind']:.0%}). The verdict "
          "is \"more\" only when the interval lies above 0.", "",
          *_ttt_table(rob, tasks)]
    L += ["", "![robustness](robustness.png)", "",
          "## 2. Ablations: signals and features", "",
          f"Paired final validation losses over {len(tasks)} tasks x base rates lr* x ({', '.join(f'{x:g}' for x in ABLATION)}) x "
          f"{ablation_seeds} seeds. A signal is compared with `frozen` (the untrained controller: AdamW plus the "
          "controller's bookkeeping); a feature is judged by removing it from the default (hindsight) "
          "configuration, or adding it. Win/loss: over 1% better/worse. Verdict: better or worse when the "
          "wins and losses differ by at least max(3, 25% of the pairs), otherwise no clear effect.", "",
          "| what | config vs reference | pairs | wins | losses | ties | geo-mean loss ratio | reached target (config / ref) | verdict |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["ablations"]:
        ra = r["reached_target"]
        vals = list(ra.values())
        L.append(f"| {r['what']} | {r['config']} vs {r['reference']} | {r['pairs']} | {r['wins']} | {r['losses']} | "
                 f"{r['ties']} | {_fmt(r['geo_ratio'])} | {vals[0]} / {vals[1]} | **{r['verdict']}** |")
    L += ["", "Per base rate (wins/losses, geo-mean ratio):", "",
          "| config | " + " | ".join(f"lr* x {x:g}" for x in ABLATION) + " |", "|---|" + "---|" * len(ABLATION)]
    for r in doc["ablations"]:
        L.append(f"| {r['config']} | " + " | ".join(
            f"{v['wins']}/{v['losses']}, {_fmt(v['geo_ratio'])}" for v in r["per_lr"].values()) + " |")
    L += ["", "![ablations](ablations.png)", "", "![multipliers](multipliers.png)", "",
          "## 3. Per-head feedback on the multi-horizon task", "",
          f"Trunk and 7 heads as 8 param groups, lr {doc['head_lr']:g} (tuned AdamW's), {head_seeds} seeds, final validation AUC per horizon "
          "(mean ± sd):", "",
          "| config | val loss | " + " | ".join(HORIZON_NAMES) + " |", "|---|---|" + "---|" * len(HORIZON_NAMES)]
    heads = doc["heads"]
    for c, h in heads.items():
        L.append(f"| {c} | {h['val_loss']:.4f} | " + " | ".join(f"{h[n]['mean']:.3f} ± {h[n]['sd']:.3f}" for n in HORIZON_NAMES) + " |")
    if "adamw" in heads and "nested-hindsight+heads" in heads:
        a, b = heads["adamw"], heads["nested-hindsight+heads"]
        long = HORIZON_NAMES[-2:]
        d = {n: b[n]["mean"] - a[n]["mean"] for n in long}
        chance = all(abs(a[n]["mean"] - 0.5) < 0.03 for n in long)
        lifted = all(v > max(2 * a[n]["sd"], 0.01) for n, v in d.items())
        a_s = ", ".join(f"{a[n]['mean']:.3f}" for n in long)
        b_s = ", ".join(f"{b[n]['mean']:.3f}" for n in long)
        d_s = ", ".join(f"{v:+.3f}" for v in d.values())
        L += ["", f"Long horizons ({', '.join(long)}): AdamW's AUC {a_s} ({'at' if chance else 'not at'} chance); "
              f"with per-head features {b_s} (change {d_s}). **Verdict:** per-head feedback "
              f"{'lifts' if lifted else 'does not lift'} the long horizons "
              f"{'beyond the seed-to-seed spread' if lifted else '(the change is within the seed-to-seed spread or negative)'}."]
    L += ["", "![heads](heads.png)", "", "## 4. Cost and peers", "",
          "Median ms per training step at lr* (forward, backward and optimizer, as the bench times it) and "
          "ratios. `hindsight x adamw` is the hindsight signal's amortised cost per step as a multiple of an "
          "AdamW training step (replays included):", "",
          "| task | AdamW ms | frozen x AdamW | hindsight x AdamW | hindsight x frozen | proxy x AdamW |",
          "|---|---|---|---|---|---|"]
    for t, c in doc["costs"].items():
        L.append(f"| {t} | {c['ms_adamw']:.2f} | {c['frozen_x_adamw']:.2f} | {c['hindsight_x_adamw']:.2f} | "
                 f"{c['hindsight_x_frozen']:.2f} | {c['proxy_x_adamw']:.2f} |")
    L += ["", "Median time to target (s) per task; tuned AdamW sets the target, so it always reaches it:", ""]
    cols = ["adamw-tuned"] + [f"{m}@lr*x{f:g}" for f in ABLATION for m in ("adamw", "nested", "adamw-hd")] + \
        ["prodigy", "schedulefree-adamw"]
    L += ["| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t, row in doc["peers"].items():
        L.append(f"| {t} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    L.append("")
    return "\n".join(L)
