r"""The Polyak note's explanation of its zig-zag, tested on the logic-gates task.

The note ("Multi-Parameter Coupling Hypothesis", "Connection to PLT") says that on a logic-gates
task learned by polynomial attention the global rule ``eta = (f - f*) / ||g||^2`` zig-zags while
AdamW converges smoothly, because the layers' gradient magnitudes differ by orders of magnitude:
the early layers dominate ``||g||^2`` and set the shared step, the later layers are starved, and
when the early layers settle the step grows and the later layers overshoot. This module runs
:func:`nestopt.tasks.logic_gates.logic_gates` (depth 3, full batch, MSE on ``+-1``, so ``f* = 0``
is attainable) from ``len(seeds)`` seeds with three optimizers, all through
:func:`nestopt.train.train_loop` with the divergence rule off (a run's whole trajectory is the
measurement):

- ``global``: ``Polyak(scope="global")``, the note's rule;
- ``tensor``: ``Polyak(scope="tensor")``, one step size per tensor (the note's fix 1, with the
  gap shared by ``||g_i||``, the optimizer's default);
- ``adamw``: ``AdamW`` (weight decay 0, so the exact fit stays the minimum) at the rate of
  :data:`ADAMW_GRID` with the lowest median final loss over the seeds (ties: the smaller rate).

A control (``control_depth``, default 1) runs the two Polyak rules on the same task with one layer
(degree 3, where the layers' gradients differ least); it is reported beside the verdicts and
takes no part in them. ``nestopt study polyak`` runs all of it (:func:`run_gates`) and writes the
section :func:`report_lines`, the figure :func:`figure` and ``results.json["logic_gates"]``
(:func:`document`)::

    >>> res = run_gates(seeds=(0,), steps=5, lr_grid=(1e-2,), control_depth=None)
    >>> [it["key"] for it in res["verdicts"]]
    ['A', 'B', 'B2', 'C', 'D', 'overall']
    >>> [(r.optimizer, len(r.loss)) for r in res["runs"]]
    [('global', 6), ('tensor', 6), ('adamw', 6)]

What is measured on each run is defined in :mod:`.gates_metrics`.

**The verdicts** (:func:`verdicts`, from the per-seed numbers; "median" is over the seeds):

- A "the global rule zig-zags while AdamW converges smoothly": AdamW meets the task's target on
  every seed, the global rule misses it on most seeds, and the global rule's median zig-zag count
  is at least 5x AdamW's (floored at 1). Confirmed if all three hold; partly if only the count
  fails (the contrast is there, the frequent rises are not the global rule's); refuted if AdamW
  misses the target or the global rule meets it on most seeds; not measured on a task without a
  goal (``task.goal``: the task's target);
- B "gradient magnitudes differ across layers by orders of magnitude": the global rule's median
  (over seeds) of the median spread is at least 1 order (10x). Confirmed if so; partly if only the
  spread at init is; refuted otherwise;
- B2 "early layers dominate ``||g||^2``": the dominant layer of the global run is ``embed`` or
  ``attn1``. Confirmed on every seed, refuted on none, partly otherwise;
- C "per-tensor scaling removes most of the zig-zag": per-tensor Polyak's median count is at most
  a quarter of the global rule's (which must be at least 1), by zig-zags and by spikes.
  Confirmed if both, partly if one, refuted if neither;
- D "the rises follow a shift of ``||g||^2`` away from the dominant layer" (the mechanism), global
  runs: median correlation at least 0.3 and median fraction of rises after a fall at least 2/3.
  Confirmed if both, partly if one, refuted if neither;
- "the coupling explains the zig-zag" (overall): confirmed if B, B2, C and D are all confirmed,
  refuted if C and D are both refuted, partly otherwise.

Everything is deterministic: the models come from their seeds, the data and batches are fixed,
and no rule depends on time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._threads import one_thread
from ..optim.polyak import Polyak
from ..tasks.logic_gates import LogicGatesTask, logic_gates
from ..train import train_loop
from .gates_metrics import SPIKE, coupling, layer_grad_norms, layer_names, loss_metrics, shares, spikes, spread_stats

OPTIMIZERS = ("global", "tensor", "adamw")
ADAMW_GRID = (1e-2, 3e-2, 1e-1)  # brackets the best rate (3e-3 ended 10x above 1e-2, measured)
SEEDS = (0, 1, 2)
CONTROL_DEPTH = 1  # the control: one layer (degree 3), where the layers' gradients differ least
EARLY = ("embed", "attn1")

# thresholds of the verdict rules (module docstring)
ZIGZAG_FACTOR = 5.0
SPREAD_ORDERS = 1.0
REMOVED = 0.25
CORR_MIN = 0.3
FRAC_MIN = 2 / 3


# -- the runs -----------------------------------------------------------------------------------------

@dataclass
class GatesRun:
    optimizer: str
    seed: int
    lr: float | None
    loss: list[float]  # L_0 .. L_T
    norms: list[list[float]]  # per step (T rows), per layer
    layers: list[str]
    final: dict[str, float]  # task.evaluate at the end
    meets_target: bool | None
    counters: dict[str, int] | None = None
    error: str | None = None
    stuck_at: int | None = None  # the Polyak step skipped, after which nothing changes (run_one)
    metrics: dict[str, Any] = field(default_factory=dict)


def _make(name: str, params: list[torch.nn.Parameter], lr: float | None) -> torch.optim.Optimizer:
    if name == "global":
        return Polyak(params, scope="global")
    if name == "tensor":
        return Polyak(params, scope="tensor")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer={name!r} is invalid: expected one of {', '.join(OPTIMIZERS)}")


def run_one(task: LogicGatesTask, optimizer: str, seed: int, steps: int, lr: float | None = None) -> GatesRun:
    """One training run, every loss and per-layer gradient norm recorded.

    A Polyak step that is skipped (a non-finite loss or ``||g||^2``, a zero gradient, a loss at
    ``f_star``) leaves every parameter as it was, and with the full batch the next step sees the
    same loss and gradient and is skipped too: the run is stuck. It stops there (``stuck_at``, the
    0-based step) and the rest of its loss curve is that constant loss, which is what the
    remaining steps would record; its norms end at that step, so the statistics over steps count
    the stuck iterate once, not once per remaining step."""
    model = task.init(seed)
    named = list(model.named_parameters())
    layers = layer_names(model)
    opt = _make(optimizer, [p for _, p in named], lr)
    losses: list[float] = []
    norms: list[list[float]] = []

    def record(step: int, loss: float, res: Any) -> bool:  # the gradient the step used, at its iterate
        losses.append(loss)
        norms.append(layer_grad_norms([(n, p.grad) for n, p in named], layers))
        return isinstance(opt, Polyak) and opt.param_groups[0]["counters"]["steps"] < step  # skipped: stuck

    batch = task.sampler(seed)
    res = train_loop(opt, steps, lambda b: task.loss(model, b), batch=batch, closure=True, on_step=record,
                     divergence=None)
    stuck_at = len(losses) - 1 if res.stopped else None
    losses += losses[-1:] * (steps - len(losses))
    final = task.evaluate(model)
    losses.append(final["val_loss"])  # train and validation are the same table: this is L_T
    counters = dict(opt.param_groups[0]["counters"]) if isinstance(opt, Polyak) else None
    meets = task.meets_goal(final) if task.goal is not None else None
    return GatesRun(optimizer, seed, lr, losses, norms, layers, final, meets, counters, res.error, stuck_at)


def measure_run(r: GatesRun) -> dict[str, Any]:
    """The run's numbers (module docstring)."""
    lm = loss_metrics(r.loss)
    sp = spread_stats(r.norms) if r.norms else {"init": None, "median": None, "steps": 0}
    first = r.loss[0]
    last = r.loss[-1]
    return {"zigzags": lm["zigzags"], "spikes": spikes(r.loss), "max_rise": lm["max_rise"],
            "final_loss": last if math.isfinite(last) else None, "initial_loss": first,
            "diverged": not math.isfinite(last) or last > first,
            "final_accuracy": r.final.get("val_accuracy"), "meets_target": r.meets_target,
            "spread_init": sp["init"], "spread_median": sp["median"], "spread_steps": sp["steps"],
            **{f"coupling_{k}": v for k, v in coupling(r.loss, r.norms, r.layers).items()}}


def run_gates(seeds: Sequence[int] = SEEDS, steps: int | None = None, task: LogicGatesTask | None = None,
              lr_grid: Sequence[float] = ADAMW_GRID, control_depth: int | None = CONTROL_DEPTH,
              on_run: Callable[[GatesRun], None] | None = None) -> dict[str, Any]:
    """All runs, their numbers, the per-optimizer summary and the verdicts (a JSON-able dict except
    ``"runs"`` and ``"control"["runs"]``, the :class:`GatesRun` records). ``control_depth`` (``None``:
    none) adds the two Polyak rules on the same task at that depth, a control outside the verdicts."""
    with one_thread():  # tiny tensors: one thread is fastest, and a loaded machine does not stall it
        task = task or logic_gates()
        out = _run_gates(seeds, steps, task, lr_grid, on_run)
        if control_depth is not None:
            t0 = time.perf_counter()
            ctrl = logic_gates(depth=control_depth, width=task.width, n_bits=task.n_bits, gates=task.gates,
                               init_scale=task.init_scale, steps=task.default_steps,
                               name=f"{task.name}[depth={control_depth}]")
            runs = []
            for seed in seeds:
                for name in ("global", "tensor"):
                    r = run_one(ctrl, name, seed, out["steps"])
                    r.metrics = measure_run(r)
                    runs.append(r)
            out["control"] = {"task": ctrl.info(), "depth": control_depth, "summary": summarize(runs), "runs": runs}
            out["wall_s"] += time.perf_counter() - t0
        return out


def _run_gates(seeds: Sequence[int], steps: int | None, task: LogicGatesTask, lr_grid: Sequence[float],
               on_run: Callable[[GatesRun], None] | None) -> dict[str, Any]:
    steps = task.default_steps if steps is None else steps
    t0 = time.perf_counter()
    runs: list[GatesRun] = []
    grid: dict[float, list[GatesRun]] = {}
    for seed in seeds:
        for name in ("global", "tensor"):
            r = run_one(task, name, seed, steps)
            r.metrics = measure_run(r)
            runs.append(r)
            if on_run is not None:
                on_run(r)
        for lr in lr_grid:
            r = run_one(task, "adamw", seed, steps, lr)
            r.metrics = measure_run(r)
            grid.setdefault(lr, []).append(r)
    med_final = {lr: float(np.median([r.metrics["final_loss"] if r.metrics["final_loss"] is not None else math.inf
                                      for r in rs])) for lr, rs in grid.items()}
    lr_best = min(med_final, key=lambda lr: (med_final[lr], lr))
    for r in grid[lr_best]:
        runs.append(r)
        if on_run is not None:
            on_run(r)
    summary = summarize(runs)
    return {"task": task.info(), "depth": task.depth, "steps": steps, "seeds": list(seeds), "adamw_grid": list(lr_grid),
            "adamw_lr": lr_best, "adamw_grid_median_final_loss": med_final, "summary": summary,
            "verdicts": verdicts(summary, has_target=task.goal is not None),
            "wall_s": time.perf_counter() - t0, "runs": runs}


def summarize(runs: Sequence[GatesRun]) -> dict[str, dict[str, list[Any]]]:
    """Per optimizer, each metric as a list over the seeds (in run order)."""
    out: dict[str, dict[str, list[Any]]] = {}
    for r in runs:
        d = out.setdefault(r.optimizer, {"seed": []})
        d["seed"].append(r.seed)
        for k, v in r.metrics.items():
            if k != "coupling_median_shares":
                d.setdefault(k, []).append(v)
    return out


# -- the verdicts -------------------------------------------------------------------------------------

def seed_median(xs: Sequence[Any]) -> float | None:
    """The median of the per-seed values that were measured (``None`` and NaN left out); ``None``
    when none was."""
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(vals)) if vals else None


def _grade(n_true: int, n: int) -> str:
    return "confirmed" if n_true == n else ("refuted" if n_true == 0 else "partly")


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.{nd}g}"


def verdicts(summary: dict[str, dict[str, list[Any]]], has_target: bool = True) -> list[dict[str, str]]:
    """The claims' verdicts from :func:`summarize`'s numbers, by the rules of the module docstring
    (each row's ``rule`` says it again)."""
    g, t, a = summary["global"], summary["tensor"], summary["adamw"]
    out: list[dict[str, str]] = []
    zz = {k: seed_median(v["zigzags"]) for k, v in (("global", g), ("tensor", t), ("adamw", a))}
    sk = {k: seed_median(v["spikes"]) for k, v in (("global", g), ("tensor", t), ("adamw", a))}
    assert zz["global"] is not None and zz["tensor"] is not None and zz["adamw"] is not None

    # A
    a_conv = has_target and all(bool(x) for x in a["meets_target"])
    g_fail = has_target and sum(not x for x in g["meets_target"]) * 2 > len(g["meets_target"])
    more_zz = zz["global"] >= ZIGZAG_FACTOR * max(zz["adamw"], 1.0)
    verdict_a = ("not measured" if not has_target else  # (a task without a goal: nothing says who converged)
                 "refuted" if not (a_conv and g_fail) else ("confirmed" if more_zz else "partly"))
    out.append({"key": "A", "claim": "the global rule zig-zags while AdamW converges smoothly", "verdict": verdict_a,
                "evidence": f"AdamW meets the target on {sum(bool(x) for x in a['meets_target'])} of "
                            f"{len(a['meets_target'])} seeds (final accuracy {[_f(x) for x in a['final_accuracy']]}), "
                            f"the global rule on {sum(bool(x) for x in g['meets_target'])} (final loss "
                            f"{[_f(x) for x in g['final_loss']]}); zig-zags per seed: global {g['zigzags']}, AdamW "
                            f"{a['zigzags']} (medians {_f(zz['global'])} vs {_f(zz['adamw'])}); spikes (rises > "
                            f"{SPIKE:.0%}): global {g['spikes']}, AdamW {a['spikes']}; largest rise: global "
                            f"{[_f(x, 2) for x in g['max_rise']]}x, AdamW {[_f(x, 2) for x in a['max_rise']]}x",
                "rule": "confirmed if AdamW meets the target on every seed, the global rule misses it on most seeds, "
                        f"and the global rule's median zig-zag count is >= {ZIGZAG_FACTOR:g}x AdamW's (floored at 1); "
                        "partly if only the count fails; refuted if AdamW misses the target or the global rule "
                        "meets it on most seeds; not measured on a task without a goal"})
    # B
    sm, si = seed_median(g["spread_median"]), seed_median(g["spread_init"])
    big_med = sm is not None and sm >= SPREAD_ORDERS
    big_init = si is not None and si >= SPREAD_ORDERS
    out.append({"key": "B", "claim": "gradient magnitudes differ across layers by orders of magnitude",
                "verdict": "confirmed" if big_med else ("partly" if big_init else "refuted"),
                "evidence": f"log10 of max/min per-layer gradient norm, global rule: median over steps "
                            f"{[_f(x, 2) for x in g['spread_median']]}, at init {[_f(x, 2) for x in g['spread_init']]} "
                            f"(per seed); per-tensor Polyak median {[_f(x, 2) for x in t['spread_median']]}, AdamW "
                            f"{[_f(x, 2) for x in a['spread_median']]}",
                "rule": f"confirmed if the median over seeds of the median spread is >= {SPREAD_ORDERS:g} order "
                        f"({10 ** SPREAD_ORDERS:g}x); partly if only the spread at init is; refuted otherwise"})
    # B2
    dom = g["coupling_dominant"]
    n_early = sum(d in EARLY for d in dom)
    out.append({"key": "B2", "claim": "early layers (near the input) dominate ||g||^2",
                "verdict": _grade(n_early, len(dom)),
                "evidence": f"layer with the largest median share of ||g||^2 in the global runs: {dom}",
                "rule": f"confirmed if it is {' or '.join(EARLY)} on every seed, refuted if on none, partly otherwise"})
    # C
    gz, gs = zz["global"], sk["global"]
    c_zz = gz >= 1 and zz["tensor"] <= REMOVED * gz
    c_sk = gs >= 1 and sk["tensor"] <= REMOVED * gs
    out.append({"key": "C", "claim": "the coupling explains it: per-tensor scaling removes most of the zig-zag",
                "verdict": _grade(c_zz + c_sk, 2),
                "evidence": f"zig-zags per seed: per-tensor {t['zigzags']} vs global {g['zigzags']}; spikes: "
                            f"per-tensor "
                            f"{t['spikes']} vs global {g['spikes']}; per-tensor final loss "
                            f"{[_f(x) for x in t['final_loss']]}",
                "rule": f"confirmed if per-tensor Polyak's median count is <= {REMOVED:g} of the global rule's (itself "
                        ">= 1) by zig-zags and by spikes; partly if by one; refuted if by neither"})
    # D
    corr, frac = seed_median(g["coupling_corr"]), seed_median(g["coupling_frac_after_fall"])
    d_corr = corr is not None and corr >= CORR_MIN
    d_frac = frac is not None and frac >= FRAC_MIN
    out.append({"key": "D", "claim": "the loss rises follow a shift of ||g||^2 away from the dominant layer "
                                     "(the shared step then grows and the starved layers overshoot)",
                "verdict": _grade(d_corr + d_frac, 2),
                "evidence": f"global runs, per seed: corr(fall of the dominant layer's share, rise) "
                            f"{[_f(x, 2) for x in g['coupling_corr']]}; fraction of rises after a fall "
                            f"{[_f(x, 2) for x in g['coupling_frac_after_fall']]}; median log10 jump of the shared "
                            f"step at rises {[_f(x, 2) for x in g['coupling_eta_jump_at_rises']]}, elsewhere "
                            f"{[_f(x, 2) for x in g['coupling_eta_jump_elsewhere']]}; median log10 of the shared step "
                            f"L/||g||^2 at rises {[_f(x, 2) for x in g['coupling_eta_at_rises']]}, elsewhere "
                            f"{[_f(x, 2) for x in g['coupling_eta_elsewhere']]}; median loss before a rise "
                            f"{[_f(x, 2) for x in g['coupling_loss_before_rises']]}",
                "rule": f"confirmed if the median correlation is >= {CORR_MIN:g} and the median fraction >= "
                        f"{FRAC_MIN:.2g}; partly if one; refuted if neither"})
    # overall
    v = {it["key"]: it["verdict"] for it in out}
    if all(v[k] == "confirmed" for k in ("B", "B2", "C", "D")):
        overall = "confirmed"
    elif v["C"] == "refuted" and v["D"] == "refuted":
        overall = "refuted"
    else:
        overall = "partly"
    out.append({"key": "overall", "claim": "the note's explanation: gradient-norm coupling across layers causes the "
                                           "zig-zag", "verdict": overall,
                "evidence": ", ".join(f"{k} {v[k]}" for k in ("A", "B", "B2", "C", "D")),
                "rule": "confirmed if B, B2, C and D are all confirmed; refuted if C and D are both refuted; "
                        "partly otherwise"})
    return out


# -- records, report, figure ----------------------------------------------------------------------------

def record(r: GatesRun) -> dict[str, Any]:
    """A run as ``results.json`` holds it (the loss curve, not the per-step norms)."""
    return {"optimizer": r.optimizer, "seed": r.seed, "lr": r.lr, "error": r.error, "counters": r.counters,
            "stuck_at": r.stuck_at,
            "final": r.final, "metrics": r.metrics, "layers": r.layers,
            "loss": [float(f"{x:.6g}") if math.isfinite(x) else None for x in r.loss]}


def document(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` as ``results.json`` holds it."""
    doc = {**{k: v for k, v in result.items() if k != "runs"}, "runs": [record(r) for r in result["runs"]]}
    if "control" in result:
        doc["control"] = {**result["control"], "runs": [record(r) for r in result["control"]["runs"]]}
    return doc


def report_lines(result: dict[str, Any]) -> list[str]:
    """The report section (markdown lines), generated from the numbers and the verdicts."""
    task, s = result["task"], result["summary"]
    lines = ["## Logic gates: the note's explanation of its zig-zag", "",
             f"Task `{task['name']}`: {task['description']}; {result['steps']} steps from seeds {result['seeds']}. "
             f"Optimizers: `Polyak(scope=\"global\")` (the note's rule), `Polyak(scope=\"tensor\")` (its fix 1), and "
             f"AdamW (weight decay 0) at lr {result['adamw_lr']:g}, the rate of the grid "
             f"{result['adamw_grid']} with the lowest median final loss "
             f"({', '.join(f'{lr:g}: {_f(v)}' for lr, v in result['adamw_grid_median_final_loss'].items())}). "
             f"Zig-zags are counted as in the experiments above (a rise by more than a relative 1e-9 above the "
             f"precision floor); spikes are rises of more than {SPIKE:.0%}. The spread is log10(max/min) of the "
             "per-layer gradient norms (layers: embeddings, attention 1..depth, read-out). This part took "
             f"{result['wall_s']:.0f} s.", "",
             "| claim | verdict | evidence | rule |", "|---|---|---|---|"]
    lines += [f"| {it['key']}: {it['claim']} | **{it['verdict']}** | {it['evidence']} | {it['rule']} |"
              for it in result["verdicts"]]
    lines += [""] + _run_table(result["runs"])
    shares0 = next((r.metrics.get("coupling_median_shares") for r in result["runs"] if r.optimizer == "global"), None)
    if shares0:
        lines += ["", "Median share of ||g||^2 per layer, global rule, seed " f"{result['seeds'][0]}: " +
                  ", ".join(f"{k} {v:.2g}" for k, v in shares0.items()) + "."]
    diverged = {k: sum(bool(x) for x in v["diverged"]) for k, v in s.items()}
    lines += ["", "Runs that ended above their initial loss (diverged): " +
              ", ".join(f"{k} {n} of {len(s[k]['diverged'])}" for k, n in diverged.items()) + "."]
    ctrl = result.get("control")
    if ctrl is not None:
        cs = ctrl["summary"]
        lines += ["", f"**Control (not part of the verdicts): depth {ctrl['depth']}** ({ctrl['task']['description']}). "
                  f"If the zig-zag came from the layers' gradients differing by orders of magnitude, it should shrink "
                  f"where they differ less. Global rule at depth {ctrl['depth']} (against depth {result['depth']}): "
                  f"median spread {_f(seed_median(cs['global']['spread_median']), 2)} orders "
                  f"({_f(seed_median(s['global']['spread_median']), 2)}), median zig-zags "
                  f"{_f(seed_median(cs['global']['zigzags']))} ({_f(seed_median(s['global']['zigzags']))}), median spikes "
                  f"{_f(seed_median(cs['global']['spikes']))} ({_f(seed_median(s['global']['spikes']))}); per-tensor Polyak "
                  f"zig-zags {_f(seed_median(cs['tensor']['zigzags']))} ({_f(seed_median(s['tensor']['zigzags']))}).", ""]
        lines += _run_table(ctrl["runs"])
    return lines


def _run_table(runs: Sequence[GatesRun]) -> list[str]:
    lines = ["| optimizer | seed | zig-zags | spikes | largest rise | final loss | final accuracy | target met | "
             "spread at init | median spread | dominant layer | stuck from step (why) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r.metrics
        why = ", ".join(k for k, v in (r.counters or {}).items() if k != "steps" and v)
        skips = "-" if r.stuck_at is None else f"{r.stuck_at} ({why})"
        if r.error is not None:  # the loop stopped on an error: the rest of the curve repeats its last loss
            skips = f"{len(r.norms)} (error: {r.error.splitlines()[0][:60]})"
        lines.append(f"| {r.optimizer}{'' if r.lr is None else f' (lr {r.lr:g})'} | {r.seed} | {m['zigzags']} | "
                     f"{m['spikes']} | {_f(m['max_rise'])}x | {_f(m['final_loss'])} | {_f(m['final_accuracy'])} | "
                     f"{_f(m['meets_target'])} | {_f(m['spread_init'], 2)} | {_f(m['spread_median'], 2)} | "
                     f"{m['coupling_dominant']} | {skips} |")
    return lines


def figure(result: dict[str, Any], out: Path, name: str = "logic_gates.png") -> str:
    """Loss curves of the three optimizers, and the global rule's per-layer norms and shares
    (first seed), and the spread over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_savefig

    seed = result["seeds"][0]
    first = {r.optimizer: r for r in result["runs"] if r.seed == seed}
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
    for opt, r in first.items():
        y = np.asarray(r.loss, dtype=float)
        top = 1e30
        y = np.where(np.isfinite(y), np.clip(y, 1e-12, top), top)
        axes[0].plot(y, lw=1, label=opt if r.lr is None else f"{opt} (lr {r.lr:g})")
        sp = spread_stats(r.norms)["series"] if r.norms else []
        axes[3].plot(sp, lw=1, label=opt)
    axes[0].set_yscale("log")
    axes[0].set_title(f"training loss (seed {seed})")
    axes[0].legend(fontsize=7)
    g = first.get("global")
    if g is not None and g.norms:
        n = np.asarray(g.norms, dtype=float)
        sh = shares(g.norms)
        for i, layer in enumerate(g.layers):
            axes[1].plot(np.where(np.isfinite(n[:, i]) & (n[:, i] > 0), n[:, i], np.nan), lw=1, label=layer)
            axes[2].plot(sh[:, i], lw=1, label=layer)
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=7)
        axes[2].legend(fontsize=7)
    axes[1].set_title("global rule: per-layer gradient norm")
    axes[2].set_title("global rule: share of ||g||^2")
    axes[3].set_title("log10 spread (max/min layer norm)")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    atomic_savefig(fig, out / name, dpi=100)
    plt.close(fig)
    return name
