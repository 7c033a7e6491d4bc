"""From the refits' records to the study's table, interval and verdicts.

- **Target** of a day: tuned-once AdamW's final validation loss that day, its worst seed's (so each
  of its seeds reaches it within the budget, as in the bench).
- **Time to target** of a run: the training seconds (and steps) at its first evaluation at or below
  the target. A run already there before its first step (a warm start can be) is credited its
  first evaluation interval, so a ratio stays finite; a run that never gets there takes ``inf``.
- **Speedup** on a day: the median over seeds of tuned-once AdamW's seconds, over the strategy's
  median (0 when the strategy's median seed never reached the target). Its summary is the median
  over days, with a 90% percentile-bootstrap interval resampling the days. The same ratio of steps
  (``step_speedup``) separates a slower step from a slower path.
- **Quality**: the final next-day validation loss, mean AUC over the horizons, and the next-day
  PnL, each the median over seeds, compared with tuned-once AdamW day by day (paired differences,
  median over days with the same bootstrap).
- **Break-even**: meta-training seconds over the median seconds a refit saves against tuned-once
  AdamW (``None``, never, when it saves nothing).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

from .strategies import final_value

BASELINE = "adamw-once"
CLAIM = (1.5, 3.0)  # "50-200% faster convergence than Adam": 1.5x to 3x
GOAL = 2.0  # the goal: half the wall-clock time of tuned-once AdamW ...
GOAL_LOW = 1.5  # ... with the interval's lower end above 1.5x


def time_to(record: dict[str, Any], target: float) -> tuple[float, float]:
    """``(seconds, steps)`` to ``target`` (see the module docstring)."""
    c = record["curve"]
    for i, (s, v) in enumerate(zip(c["step"], c["val_loss"])):
        if v is not None and math.isfinite(v) and v <= target:
            if s == 0:  # there before the first step: one evaluation interval
                j = min(1, len(c["step"]) - 1)
                return float(c["train_s"][j]), float(c["step"][j])
            return float(c["train_s"][i]), float(s)
    return math.inf, math.inf


def bootstrap(values: list[float], stat: Any = statistics.median, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90% percentile-bootstrap interval of ``stat`` over ``values`` (resampled with replacement)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return draws[int(0.05 * n)], draws[int(0.95 * n) - 1]


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else math.nan


def _mean_auc(final: dict[str, float] | None) -> float:
    if not final:
        return math.nan
    aucs = [v for k, v in final.items() if k.startswith("val_auc_") and v == v]
    return statistics.fmean(aucs) if aucs else math.nan


def per_day(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{strategy: {day: {...}}}``: the target, seconds and steps to it, final loss, AUC and PnL
    (medians over seeds) and the speedup over tuned-once AdamW."""
    days = sorted({r["day"] for r in records})
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    out: dict[str, dict[int, dict[str, float]]] = {s: {} for s in strategies}
    for d in days:
        base = [r for r in records if r["day"] == d and r["strategy"] == BASELINE]
        if not base:
            continue
        target = max(final_value(r) for r in base)
        base_s = _median([time_to(r, target)[0] for r in base])
        base_steps = _median([time_to(r, target)[1] for r in base])
        for s in strategies:
            rs = [r for r in records if r["day"] == d and r["strategy"] == s]
            if not rs:
                continue
            times = [time_to(r, target) for r in rs]
            secs = statistics.median(t[0] for t in times)
            out[s][d] = {
                "target": target, "seconds": secs, "steps": statistics.median(t[1] for t in times),
                "reached": sum(math.isfinite(t[0]) for t in times), "seeds": len(rs),
                "val_loss": _median([final_value(r) for r in rs]),
                "auc": _median([_mean_auc(r["final"]) for r in rs]),
                "pnl": _median([final_value(r, "val_pnl_bp") for r in rs]),
                "diverged": sum(r["diverged"] for r in rs),
                "speedup": base_s / secs if math.isfinite(secs) and secs > 0 else 0.0,
            }
            st = out[s][d]["steps"]
            out[s][d]["step_speedup"] = base_steps / st if math.isfinite(st) and st > 0 else 0.0
    return out


def summarise(days: dict[str, dict[int, dict[str, float]]], meta_seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per strategy: median speedup and its interval, quality against tuned-once AdamW,
    break-even."""
    base = days[BASELINE]
    rows = []
    for s, by_day in days.items():
        ds = sorted(by_day)
        sp = [by_day[d]["speedup"] for d in ds]
        dloss = [by_day[d]["val_loss"] - base[d]["val_loss"] for d in ds if d in base]
        dpnl = [by_day[d]["pnl"] - base[d]["pnl"] for d in ds if d in base]
        saved = [base[d]["seconds"] - by_day[d]["seconds"] for d in ds if d in base]
        saved_med = _median([x if math.isfinite(x) else -math.inf for x in saved]) if saved else math.nan
        meta = meta_seconds.get(s)
        break_even = (math.ceil(meta / saved_med) if meta is not None and saved_med > 0 and math.isfinite(saved_med)
                      else None)
        rows.append({
            "strategy": s, "days": len(ds), "speedup": _median(sp), "speedup_ci90": bootstrap(sp),
            "step_speedup": _median([by_day[d]["step_speedup"] for d in ds]),
            "step_speedup_ci90": bootstrap([by_day[d]["step_speedup"] for d in ds]),
            "seconds": _median([by_day[d]["seconds"] for d in ds]), "steps": _median([by_day[d]["steps"] for d in ds]),
            "reached": sum(by_day[d]["reached"] for d in ds), "runs": sum(by_day[d]["seeds"] for d in ds),
            "val_loss": _median([by_day[d]["val_loss"] for d in ds]),
            "d_val_loss": _median(dloss), "d_val_loss_ci90": bootstrap(dloss),
            "auc": _median([by_day[d]["auc"] for d in ds]),
            "pnl_total": sum(by_day[d]["pnl"] for d in ds if by_day[d]["pnl"] == by_day[d]["pnl"]),
            "d_pnl": _median(dpnl), "d_pnl_ci90": bootstrap(dpnl),
            "diverged": sum(by_day[d]["diverged"] for d in ds),
            "meta_seconds": meta, "saved_seconds": saved_med, "break_even_refits": break_even,
        })
    return rows


def claim_verdict(row: dict[str, Any]) -> dict[str, Any]:
    """The chapter's "50-200% faster convergence than Adam on the same task distribution" for one
    strategy: ``holds`` when the speedup interval lies inside 1.5x-3x, ``exceeded`` above it,
    ``false`` when it lies below 1.5x, ``inconclusive`` otherwise."""
    lo, hi = row["speedup_ci90"]
    if lo >= CLAIM[0] and hi <= CLAIM[1]:
        verdict = "holds"
    elif lo > CLAIM[1]:
        verdict = "exceeded"
    elif hi < CLAIM[0]:
        verdict = "false"
    else:
        verdict = "inconclusive"
    return {"strategy": row["strategy"], "speedup": row["speedup"], "ci90": [lo, hi], "verdict": verdict}


def goal_distance(row: dict[str, Any]) -> dict[str, Any]:
    """How far ``row`` is from the issue's goal: median speedup >= 2 with its interval above 1.5,
    and no worse next-day validation loss (median paired difference <= 0) or PnL (>= 0; ``None``
    in ``parts`` when the task reports no PnL)."""
    lo = row["speedup_ci90"][0]
    met = {"speedup": row["speedup"] >= GOAL, "interval": lo > GOAL_LOW,
           "val_loss": row["d_val_loss"] <= 0, "pnl": row["d_pnl"] >= 0 if row["d_pnl"] == row["d_pnl"] else None}
    return {"strategy": row["strategy"], "met": all(v is not False for v in met.values()), "parts": met,
            "factor_needed": max(1.0, GOAL / row["speedup"]) if row["speedup"] > 0 else math.inf,
            "interval_short_by": GOAL_LOW - lo if lo <= GOAL_LOW else 0.0}


def _trend(history: list[list[float]]) -> tuple[float, float] | None:
    """Mean meta-loss over the first and the last tenth of a meta-training history."""
    ys = [h[1] for h in history if h[1] == h[1]]
    if len(ys) < 2:
        return None
    k = max(1, len(ys) // 10)
    return statistics.fmean(ys[:k]), statistics.fmean(ys[-k:])


def explain(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """For each learned or nested candidate, the evidence on why it is (not) faster: its speedup in
    steps beside its speedup in seconds (the cost of its step), its speedup in steps on the past
    days it was meta-trained on beside the evaluation days' (meta-overfitting; steps, not seconds,
    since the two sets of runs ran under different loads), and whether its meta-loss fell;
    ``findings`` says what they show."""
    past = {r["strategy"]: r for r in doc.get("past_days", [])}
    metas = {"learned-meta": doc["learned"], **doc["controllers"]}
    out = []
    for row in doc["rows"]:
        s = row["strategy"]
        if not s.startswith(("learned", "nested")):
            continue
        lo, hi = row["speedup_ci90"]
        steps, (slo, shi) = row["step_speedup"], row["step_speedup_ci90"]
        p = past.get(s) if s in metas else None  # the shipped network never saw these days
        trend = _trend(metas[s]["history"]) if s in metas else None
        findings = []
        if lo >= CLAIM[0]:
            findings.append("faster: the interval lies above 1.5x")
        if steps > 0 and row["speedup"] > 0 and steps >= 1.25 * row["speedup"]:
            findings.append(f"its step costs more than AdamW's: {steps:.2f}x in steps, {row['speedup']:.2f}x in seconds")
        if abs(steps - 1.0) < 0.05 and (slo, shi) != (0.0, 0.0):
            findings.append("in steps it is tuned-once AdamW itself: the controller hardly moves the rates")
        if p is not None:
            plo = p["step_speedup_ci90"][0]
            if plo > shi:
                findings.append(f"meta-overfitting: {p['step_speedup']:.2f}x in steps on the past days against "
                                f"{steps:.2f}x on the evaluation days")
            elif p["step_speedup"] < CLAIM[0] and slo < CLAIM[0]:
                findings.append(f"no meta-overfitting: on the past days it was meta-trained on it is {p['step_speedup']:.2f}x "
                                "in steps, no faster; the meta-objective (the training loss over the refit) does not "
                                "buy the target (the next day's validation loss) by 1.5x")
        if trend is not None and trend[1] >= trend[0]:
            findings.append(f"its meta-loss did not fall ({trend[0]:+.4f} to {trend[1]:+.4f})")
        out.append({"strategy": s, "speedup": row["speedup"], "ci90": [lo, hi], "step_speedup": steps,
                    "step_ci90": [slo, shi],
                    "past": None if p is None else {"step_speedup": p["step_speedup"],
                                                    "step_ci90": list(p["step_speedup_ci90"]), "days": p["days"]},
                    "meta_loss": None if trend is None else list(trend), "findings": findings})
    return out
