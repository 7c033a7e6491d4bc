"""``nestopt study stopping --out DIR``: deep optimal stopping against the paper's table, then the
large-learning-rate note's five claims on the workload it was written for.

1. **Prices.** The Bermudan max-call of Becker et al. 2019 (``d = 2`` at ``S0 = 90, 100, 110``;
   ``d = 5`` at ``S0 = 100``), trained backwards in time on one set of paths
   (:func:`~nestopt.studies.stopping_parts.fit_backward`), priced on fresh paths from another seed
   (the lower bound), beside the paper's values.
2. **The note's claims** on the trade-exit task (``stopping-exit``: when to close a position within
   ``max_holding_days = 7`` on the synthetic market), all date networks trained jointly by SGD with
   momentum over the note's grid of learning rates, several seeds, in three arms: plain constant
   rate; constant rate with clipping, evaluated on the BEMA average; the note's recipe (warmup,
   cosine, clipping, weight decay; at the note's base rate only). Values are the mean realised
   return (percent) of the exit rule on held-out paths.

   - *BEMA + clipping enables 5-10x higher rates*: the highest stable rate of each arm, and its best
     final value.
   - *20-30% faster to target*: steps to reach the target (95% of the tuned constant rate's final
     value) for the recipe at the note's base rate against the tuned constant rate.
   - *40-60% smaller by pruning*: the largest fraction of weights magnitude pruning removes with the
     value not significantly lower (paired over paths, two standard errors).
   - *JAL for noisy labels*: JAL against cross-entropy on the multi-horizon trading task with its
     training labels flipped at 0%, 20% and 40%, scored by the clean validation labels' AUC.
   - *10-20% robustness out of distribution*: the value on paths whose volatilities are twice those
     seen in training, recipe against the tuned constant rate.

Each verdict is computed from the numbers by the rule written beside it in :func:`verdicts`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_savefig, atomic_write_text
from ..schedule import LargeLRConfig
from ..tasks.stopping import PAPER_MAXCALL, MaxCall, StoppingTask, TradeExit
from ._common import finite
from .stopping_parts import (fit_backward, fixed_rules, lower_bound, paired, prune, rewards, train_arm,
                             train_noisy)

TARGET_FRACTION = 0.95
PRUNE_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NOISE_RATES = (0.0, 0.2, 0.4)
OOD_VOL_SCALE = 2.0


@dataclass(frozen=True)
class Plan:
    """The study's sizes; :meth:`quick` is the smoke test's."""

    problems: tuple[tuple[int, int], ...] = ((2, 90), (2, 100), (2, 110), (5, 100))
    price_train_paths: int = 131_072
    price_steps: int = 200
    price_batch: int = 4096
    price_paths: int = 1_048_576
    price_seed: int = 0
    price_eval_seed: int = 1_000  # never used to train
    grid: tuple[float, ...] = LargeLRConfig().lr_grid
    seeds: int = 3
    steps: int = 200
    eval_every: int = 20
    exit: TradeExit = TradeExit()
    exit_batch: int = 512
    jal_seeds: int = 5
    jal_steps: int = 400
    noise_rates: tuple[float, ...] = NOISE_RATES
    recipe_lr: float = LargeLRConfig().base_lr
    quick: bool = False

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(problems=((2, 100),), price_train_paths=8192, price_steps=20, price_batch=1024,
                   price_paths=65_536, grid=(0.03, 0.3), seeds=1, steps=30, eval_every=10,
                   exit=TradeExit(n_assets=6, n_bars=4000), exit_batch=256, jal_seeds=2, jal_steps=20,
                   quick=True)


def _prices(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for d, s0 in plan.problems:
        problem = MaxCall(d=d, s0=float(s0))
        fit = fit_backward(problem, seed=plan.price_seed, n_train=plan.price_train_paths, steps=plan.price_steps,
                           batch=plan.price_batch)
        lb = lower_bound(problem, fit["nets"], fit["start_stop"], n_paths=plan.price_paths, seed=plan.price_eval_seed)
        paper_l, ref, kind = PAPER_MAXCALL[(d, s0)]
        rel = (lb["mean"] - ref) / ref
        rows.append({"d": d, "s0": s0, "price": lb["mean"], "se": lb["se"], "paper_l": paper_l, "reference": ref,
                     "reference_kind": kind, "rel_err": rel, "within_1pct": abs(rel) <= 0.01,
                     "train_seed": plan.price_seed, "eval_seed": plan.price_eval_seed, "eval_paths": lb["paths"],
                     "train_paths": plan.price_train_paths, "steps_per_date": plan.price_steps,
                     "in_sample": fit["in_sample"], "train_seconds": fit["train_seconds"]})
    return rows


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def _by_lr(runs: list[dict[str, Any]], arm: str) -> dict[float, dict[str, Any]]:
    out = {}
    for lr in sorted({r["lr"] for r in runs if r["arm"] == arm}):
        rs = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
        ok = [r["value"] for r in rs if not r["diverged"] and r["value"] is not None]
        out[lr] = {"mean": _mean(ok), "se": _se(ok), "failed": len(rs) - len(ok), "runs": len(rs)}
    return out


def _steps_to(curve: list[list[Any]], target: float) -> int | None:
    return next((s for s, v in curve if s > 0 and v is not None and v >= target), None)


def _prunable(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    base = rewards(model, data)
    rows, best = [], 0.0
    for frac in PRUNE_FRACTIONS:
        diff, se = paired(rewards(prune(model, frac), data), base)
        equal = diff >= -2 * se
        rows.append({"fraction": frac, "diff": diff, "se": se, "equal": equal})
        if equal and all(r["equal"] for r in rows):
            best = frac
    return {"value": float(base.mean()), "prunable": best, "rows": rows}


def verdicts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per claim, computed from the numbers:

    - rates: holds if the highest stable rate with BEMA and clipping is at least 5x the plain
      arm's (stable: no seed diverged and the mean value keeps at least half of the best
      arm-and-rate mean's gain over holding to the last day); does not hold otherwise (when the plain arm is stable at the grid's top rate, no
      ratio above 1 can be shown on this grid, and the line says so).
    - time to target: holds if the recipe's mean steps to the target are at most 0.8x the tuned
      constant rate's with every recipe seed reaching it; does not hold otherwise.
    - pruning: holds if the recipe's model keeps its value with at least 40% of its weights
      removed (median over seeds) and more than the constant rate's model does; mixed if it reaches
      40% but the constant rate's model prunes as far; does not hold below 40%.
    - JAL: holds if JAL's clean AUC beats cross-entropy's by more than two standard errors (over
      seeds, paired) at both noise rates above zero; does not hold if it is not above
      cross-entropy's at any of them; mixed otherwise.
    - out of distribution: holds if the recipe's value is at least 10% above the tuned constant
      rate's and the paired difference exceeds two standard errors; mixed if it is significantly
      above but by less than 10%; does not hold otherwise."""
    out = []
    lr = doc["rates"]
    top = max(doc["plan"]["grid"])
    hi_b, hi_p = lr["highest_stable"]["bema-clip"], lr["highest_stable"]["plain"]
    ratio = (hi_b / hi_p) if hi_b and hi_p else None
    verdict = "holds" if ratio is not None and ratio >= 5 else "does not hold"
    ev = (f"highest stable rate {_g(hi_b)} with BEMA and clipping, {_g(hi_p)} plain"
          + (f" (ratio {ratio:.2g})" if ratio is not None else "")
          + f"; best value {_v(lr['best']['bema-clip'])} vs {_v(lr['best']['plain'])}")
    if hi_p == top:
        ev += f"; plain SGD is already stable at the grid's largest rate ({top:g})"
    out.append({"key": "rates", "claim": "BEMA + gradient clipping enables 5-10x higher learning rates",
                "verdict": verdict, "evidence": ev})

    t = doc["time_to_target"]
    r_steps, c_steps = t["recipe_steps"], t["constant_steps"]
    reached = all(s is not None for s in r_steps)
    rm = _mean([s for s in r_steps if s is not None])
    cm = _mean([s for s in c_steps if s is not None])
    tr = rm / cm if rm is not None and cm else None
    verdict = "holds" if reached and tr is not None and tr <= 0.8 else "does not hold"
    out.append({"key": "speed", "claim": "The recipe converges 20-30% faster to the target",
                "verdict": verdict,
                "evidence": (f"steps to {TARGET_FRACTION:.0%} of the tuned constant rate's value ({t['target']:.3f}): "
                             f"recipe (lr {t['recipe_lr']:g}) {_steps(r_steps)}, constant (lr {t['constant_lr']:g}) "
                             f"{_steps(c_steps)}" + (f"; ratio {tr:.2f}" if tr is not None else ""))})

    p = doc["pruning"]
    rp, cp = p["recipe_prunable"], p["constant_prunable"]
    verdict = "does not hold" if rp < 0.4 else ("holds" if rp > cp else "mixed")
    out.append({"key": "pruning", "claim": "The recipe gives 40-60% smaller models by pruning at equal value",
                "verdict": verdict,
                "evidence": f"prunable at equal value (median over seeds): recipe {rp:.0%}, constant rate {cp:.0%}"})

    j = doc["jal"]["diff"]
    noisy = [k for k in j if float(k) > 0]
    clean = [k for k in j if float(k) == 0]
    sig = [j[k]["mean"] > 2 * j[k]["se"] for k in noisy]
    # robust to noise: JAL's lead over cross-entropy grows with the noise rate (a lead it also has on
    # clean labels is a better loss for this task, not robustness to noise)
    if noisy and clean:
        top, zero = max(noisy, key=float), clean[0]
        grow = j[top]["mean"] - j[zero]["mean"]
        verdict = "holds" if grow > 2 * math.hypot(j[top]["se"], j[zero]["se"]) else "does not hold"
        lead = (f"; its lead at {float(top):.0%} noise minus its lead on clean labels: {grow:+.4f}"
                + (" (JAL is better at every noise rate, not more robust)" if all(sig) and verdict != "holds" else ""))
    else:
        verdict = "holds" if noisy and all(sig) else "does not hold"
        lead = ""
    out.append({"key": "jal", "claim": "JAL makes training robust to noisy labels (clean-label AUC against "
                "cross-entropy)", "verdict": verdict,
                "evidence": "; ".join(f"noise {float(k):.0%}: JAL {doc['jal']['auc'][k]['jal']:.4f} vs CE "
                                      f"{doc['jal']['auc'][k]['ce']:.4f} (diff {j[k]['mean']:+.4f} ± {j[k]['se']:.4f})"
                                      for k in j) + lead})

    o = doc["ood"]
    gain = o["gain"]
    sig = o["diff"] > 2 * o["se"]
    verdict = "holds" if sig and gain >= 0.10 else ("mixed" if sig else "does not hold")
    out.append({"key": "ood", "claim": "10-20% better out of distribution (volatility regime not seen in training)",
                "verdict": verdict,
                "evidence": (f"value at {OOD_VOL_SCALE:g}x volatility: recipe {o['recipe']:.3f} vs constant rate "
                             f"{o['constant']:.3f} (diff {o['diff']:+.3f} ± {o['se']:.3f}, gain {gain:+.1%}); in "
                             f"distribution {o['recipe_in']:.3f} vs {o['constant_in']:.3f}")})
    return out


def _g(x: float | None) -> str:
    return "none" if x is None else f"{x:g}"


def _v(b: dict[str, Any]) -> str:
    return "-" if b["mean"] is None else f"{b['mean']:.3f} at lr {b['lr']:g}"


def _steps(xs: list[int | None]) -> str:
    return "[" + ", ".join("never" if s is None else str(s) for s in xs) + "]"


def _figures(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pr = doc["prices"]
    labels = [f"d={r['d']}, S0={r['s0']}" for r in pr]
    xs = range(len(pr))
    ax.errorbar([x - 0.1 for x in xs], [r["price"] for r in pr], yerr=[2 * r["se"] for r in pr], fmt="o",
                label="ours (lower bound, ±2 se)")
    ax.plot([x + 0.1 for x in xs], [r["reference"] for r in pr], "s", label="reference")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("price")
    ax.legend()
    ax.set_title("Bermudan max-call: price against the reference")
    fig.tight_layout()
    atomic_savefig(fig, out / "prices.png", dpi=100)
    plt.close(fig)
    names.append("prices.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, label in (("plain", "constant rate"), ("bema-clip", "BEMA + clipping"), ("recipe", "recipe")):
        rows = doc["rates"]["by_lr"][arm]
        ks = [k for k in rows if rows[k]["mean"] is not None]
        ax.errorbar([float(k) for k in ks], [rows[k]["mean"] for k in ks],
                    yerr=[0 if math.isnan(rows[k]["se"] or math.nan) else rows[k]["se"] for k in ks],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out value (% return)")
    ax.legend()
    ax.set_title("trade exit: value against learning rate")
    fig.tight_layout()
    atomic_savefig(fig, out / "value_vs_lr.png", dpi=100)
    plt.close(fig)
    names.append("value_vs_lr.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    auc = doc["jal"]["auc"]
    ks = list(auc)
    for loss, label in (("ce", "cross-entropy"), ("jal", "JAL")):
        ax.plot([float(k) for k in ks], [auc[k][loss] for k in ks], marker="o", label=label)
    ax.set_xlabel("label noise rate")
    ax.set_ylabel("clean-label AUC (mean over horizons)")
    ax.legend()
    ax.set_title("noisy labels: AUC against the noise rate")
    fig.tight_layout()
    atomic_savefig(fig, out / "auc_vs_noise.png", dpi=100)
    plt.close(fig)
    names.append("auc_vs_noise.png")
    return names


def run_study(out: str | Path, plan: Plan | None = None) -> dict[str, Any]:
    plan = plan or Plan()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prices = _prices(plan)

    task = StoppingTask(plan.exit, name="stopping-exit", n_train=10**7, n_val=10**7, batch_size=plan.exit_batch)
    runs, models = [], {}
    recipe_lr = plan.recipe_lr if plan.recipe_lr in plan.grid else max(plan.grid)
    for arm, grid in (("plain", plan.grid), ("bema-clip", plan.grid), ("recipe", (recipe_lr,))):
        for lr in grid:
            for seed in range(plan.seeds):
                r = train_arm(task, arm, lr, seed, plan.steps, eval_every=plan.eval_every)
                models[(arm, lr, seed)] = r.pop("model")
                runs.append(r)
    by_lr = {arm: _by_lr(runs, arm) for arm in ("plain", "bema-clip", "recipe")}
    best_all = max(v["mean"] for rows in by_lr.values() for v in rows.values() if v["mean"] is not None)
    hold = fixed_rules(task.val_data())[f"day {plan.exit.max_holding_days}"]
    bar = hold + 0.5 * (best_all - hold)  # a stable run keeps half the best run's gain over holding to the end
    highest, best = {}, {}
    for arm in ("plain", "bema-clip"):
        stable = [lr for lr, v in by_lr[arm].items() if v["failed"] == 0 and v["mean"] is not None
                  and v["mean"] >= bar and best_all > hold]
        highest[arm] = max(stable) if stable else None
        lr_best = max((lr for lr in by_lr[arm] if by_lr[arm][lr]["mean"] is not None),
                      key=lambda k: by_lr[arm][k]["mean"], default=None)
        best[arm] = {"lr": lr_best, "mean": by_lr[arm][lr_best]["mean"] if lr_best is not None else None}

    const_lr = best["plain"]["lr"]
    target = TARGET_FRACTION * best["plain"]["mean"]
    pick = {(r["arm"], r["lr"], r["seed"]): r for r in runs}
    seeds = range(plan.seeds)
    ttt = {"target": target, "constant_lr": const_lr, "recipe_lr": recipe_lr,
           "constant_steps": [_steps_to(pick[("plain", const_lr, s)]["curve"], target) for s in seeds],
           "recipe_steps": [_steps_to(pick[("recipe", recipe_lr, s)]["curve"], target) for s in seeds]}

    val = task.val_data()
    prune_rows = {"recipe": [_prunable(models[("recipe", recipe_lr, s)], val) for s in seeds],
                  "constant": [_prunable(models[("plain", const_lr, s)], val) for s in seeds]}
    pruning = {"recipe_prunable": statistics.median(r["prunable"] for r in prune_rows["recipe"]),
               "constant_prunable": statistics.median(r["prunable"] for r in prune_rows["constant"]),
               "rows": prune_rows, "fractions": list(PRUNE_FRACTIONS)}

    ood_problem = TradeExit(**{**{k: getattr(plan.exit, k) for k in ("max_holding_days", "n_assets", "n_bars",
                                                                     "entry_stride")}, "vol_scale": OOD_VOL_SCALE})
    ood_data = ood_problem.simulate(None, seed=task.data_seed + 1, stream=1)
    rec = torch.stack([rewards(models[("recipe", recipe_lr, s)], ood_data) for s in seeds]).mean(0)
    con = torch.stack([rewards(models[("plain", const_lr, s)], ood_data) for s in seeds]).mean(0)
    diff, se = paired(rec, con)
    c_in = _mean([pick[("plain", const_lr, s)]["value"] or 0.0 for s in seeds])
    r_in = _mean([pick[("recipe", recipe_lr, s)]["value"] or 0.0 for s in seeds])
    ood = {"vol_scale": OOD_VOL_SCALE, "recipe": float(rec.mean()), "constant": float(con.mean()), "diff": diff,
           "se": se, "gain": diff / abs(float(con.mean())) if float(con.mean()) else math.inf,
           "recipe_in": r_in, "constant_in": c_in, "paths": len(rec), "fixed_rules": fixed_rules(ood_data)}

    jal_runs = [train_noisy(eta, loss, seed, steps=plan.jal_steps) for eta in plan.noise_rates
                for loss in ("ce", "jal") for seed in range(plan.jal_seeds)]
    auc, jdiff = {}, {}
    for eta in plan.noise_rates:
        k = f"{eta:g}"
        per = {loss: [r["auc"] for r in jal_runs if r["noise"] == eta and r["loss"] == loss] for loss in ("ce", "jal")}
        auc[k] = {loss: statistics.fmean(v) for loss, v in per.items()}
        d = [a - b for a, b in zip(per["jal"], per["ce"])]
        jdiff[k] = {"mean": statistics.fmean(d), "se": _se(d) if len(d) > 1 else 0.0}

    doc: dict[str, Any] = {
        "quick": plan.quick,
        "plan": {"grid": list(plan.grid), "seeds": plan.seeds, "steps": plan.steps, "eval_every": plan.eval_every,
                 "jal_seeds": plan.jal_seeds, "jal_steps": plan.jal_steps, "noise_rates": list(plan.noise_rates),
                 "price_train_paths": plan.price_train_paths, "price_paths": plan.price_paths,
                 "price_steps": plan.price_steps, "price_seed": plan.price_seed,
                 "price_eval_seed": plan.price_eval_seed, "exit_data_seed": task.data_seed,
                 "exit_train_entries": len(task.train_data()["g"]), "exit_val_entries": len(val["g"])},
        "prices": prices,
        "fixed_rules": fixed_rules(val),
        "rates": {"by_lr": {arm: {f"{lr:g}": v for lr, v in rows.items()} for arm, rows in by_lr.items()},
                  "highest_stable": highest, "best": best, "stable_bar": bar, "runs": runs},
        "time_to_target": ttt, "pruning": pruning, "ood": ood,
        "jal": {"runs": jal_runs, "auc": auc, "diff": jdiff, "params": {"alpha": 1.0, "beta": 1.0, "a": 5.0}},
    }
    doc["verdicts"] = verdicts(doc)
    figures = _figures(doc, out)
    doc["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "report.md", _report(doc, figures))
    atomic_write_text(out / "results.json", json.dumps(finite(doc), indent=1, allow_nan=False))
    return doc


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _report(doc: dict[str, Any], figures: list[str]) -> str:
    lines = ["# Deep optimal stopping, BEMA and JAL: the large-learning-rate note's workload", "",
             f"Command: `nestopt study stopping --out DIR` ({doc['wall_s']:.0f} s here).", "",
             "## Prices (Bermudan max-call; lower bound on fresh paths)", "",
             "| d | S0 | ours | se | paper L | reference | error |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['s0']} | {r['price']:.3f} | {r['se']:.3f} | {_num(r['paper_l'])} | {r['reference']:.3f} "
              f"({r['reference_kind']}) | {100 * r['rel_err']:+.2f}% |" for r in doc["prices"]]
    lines += ["", "## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} |" for v in doc["verdicts"]]
    lines += ["", (verdicts.__doc__ or "").replace("\n    ", "\n"), "", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"

