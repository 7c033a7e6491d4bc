"""The controller study's statistics, from the bench's records: robust base rates and the paired
bootstrap of their difference (part 1), paired ablations (part 2), the per-head summary and its
verdict (part 3), step costs and peers (part 4)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ...bench.scoring import median
from .plan import ABLATION, CONFIGS, HEAD_CONFIGS, ROBUST, _around, _name

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
            ttt = {f: median([_ttt(r) for r in records if r["task"] == t and r["optimizer"] == opt and r["lr"] == lr])
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
                ttt[f] = median([runs[s] for s in chosen if s in runs])
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
            ms[label] = median([r["ms_per_step"] for r in records if r["task"] == t and r["optimizer"] == opt
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
        out[t] = {k: median([_ttt(r) for r in v]) for k, v in rows.items() if v}
    return out


def heads_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from ...tasks.trading import HORIZON_NAMES

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


def heads_verdict(heads: dict[str, Any]) -> dict[str, Any] | None:
    """Does per-head feedback lift the two longest horizons? AdamW's mean AUC there, the mean with
    per-head features (``nested-hindsight+heads``), the change, whether AdamW sits at chance
    (within 0.03 of 0.5), and the verdict: "lifts" when every change exceeds twice AdamW's
    seed-to-seed sd and 0.01. ``None`` without both runs."""
    from ...tasks.trading import HORIZON_NAMES

    if "adamw" not in heads or "nested-hindsight+heads" not in heads:
        return None
    a, b = heads["adamw"], heads["nested-hindsight+heads"]
    long = HORIZON_NAMES[-2:]
    change = {n: b[n]["mean"] - a[n]["mean"] for n in long}
    lifted = all(v > max(2 * a[n]["sd"], 0.01) for n, v in change.items())
    return {"horizons": list(long), "adamw": {n: a[n]["mean"] for n in long},
            "with_heads": {n: b[n]["mean"] for n in long}, "change": change,
            "at_chance": all(abs(a[n]["mean"] - 0.5) < 0.03 for n in long), "lifted": lifted,
            "verdict": "lifts" if lifted else "does not lift"}
