"""From run records to targets, entries, time-to-target ratios and performance profiles.

Definitions (also in the report):

- **entry**: what a table row reports. A tuned optimizer ``x`` gives ``x-tuned`` (its runs at the
  grid rate chosen below); a tuned optimizer reported at its default too (``default_entry`` in the
  registry: AdamW and the peers) also gives ``x-default`` (``adamw-default``: lr 1e-3); an untuned
  optimizer gives one entry under its own name, at its default settings.
- **chosen rate**: for each task, the grid rate whose *worst seed* reaches the lowest final
  validation loss (a diverged run counts as infinitely bad).
- **target**: per task, the final validation loss that AdamW reaches at its chosen rate on every
  seed (the worst seed's final loss). So tuned AdamW reaches the target on each seed by
  construction, and a method that beats the target does so against AdamW's best grid rate.
- **steps/time to target**: the first evaluation at which the validation loss is at or below the
  target; time is training time only. A run that never gets there counts as infinite.
- **ratio**: per task, an entry's median time-to-target over seeds divided by the best entry's.
- **performance profile** ``rho(tau)``: the fraction of tasks on which an entry's ratio is at most
  ``tau``; the **score** is the mean of ``rho`` over ``log tau`` in ``[0, log TAU_MAX]`` (1 means
  fastest everywhere, 0 means never within ``TAU_MAX`` of the fastest, as in AlgoPerf).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from . import registry as opt_registry

TAU_MAX = 16.0
INF = float("inf")


def _worst_final(runs: Iterable[dict[str, Any]]) -> float:
    worst = -INF
    for r in runs:
        v = r["final_val_loss"]
        worst = max(worst, INF if (r["diverged"] or v is None) else v)
    return worst


def choose_rates(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(task, optimizer) -> {"lr", "worst_final", "by_lr"}`` for tuned optimizers."""
    grouped: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[(r["task"], r["optimizer"])][r["lr"]].append(r)
    out = {}
    for key, by_lr in grouped.items():
        if not _is_tuned(key[1]) or len(by_lr) < 2:
            continue
        scores = {lr: _worst_final(runs) for lr, runs in by_lr.items()}
        best = min(sorted(scores), key=lambda lr: scores[lr])
        grid = sorted(scores)
        out[key] = {"lr": best, "worst_final": scores[best], "at_grid_edge": best in (grid[0], grid[-1]),
                    "by_lr": {str(k): _json(v) for k, v in sorted(scores.items())}}
    return out


def _is_tuned(name: str) -> bool:
    try:
        return opt_registry.get(name).tune
    except KeyError:
        return False


def _reports_default(name: str) -> bool:
    try:
        spec = opt_registry.get(name)
    except KeyError:
        return False
    return spec.tune and spec.default_entry


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None


def targets(chosen: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: tuned AdamW's worst-seed final validation loss at its chosen rate."""
    out = {}
    for (task, opt), c in chosen.items():
        if opt == "adamw" and math.isfinite(c["worst_final"]):
            out[task] = {"val_loss": c["worst_final"], "adamw_lr": c["lr"]}
    return out


def planned_entries(optimizers: Sequence[str]) -> list[str]:
    """The entries a bench of ``optimizers`` reports (``adamw`` always runs): ``NAME-tuned`` for a
    tuned optimizer, plus ``NAME-default`` where it is also reported at its default, else ``NAME``."""
    out: list[str] = []
    for name in dict.fromkeys(["adamw", *optimizers]):
        if _is_tuned(name):
            out.append(f"{name}-tuned")
            if _reports_default(name):
                out.append(f"{name}-default")
        else:
            out.append(name)
    return out


def entries_of(records: list[dict[str, Any]], chosen: dict[tuple[str, str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Map entry label -> its run records (a run can belong to two entries, e.g. adamw at 1e-3)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        name, task = r["optimizer"], r["task"]
        c = chosen.get((task, name))
        if c is not None and r["lr"] == c["lr"]:
            out[f"{name}-tuned"].append(r)
        if _reports_default(name) and r["lr"] == opt_registry.get(name).default_lr:
            out[f"{name}-default"].append(r)
        if not _is_tuned(name):
            out[name].append(r)
    return dict(out)


def attach_targets(records: list[dict[str, Any]], tgt: dict[str, dict[str, Any]]) -> None:
    """Fill ``steps_to_target`` and ``time_to_target_s`` of each record in place."""
    for r in records:
        t = tgt.get(r["task"])
        r["steps_to_target"], r["time_to_target_s"] = None, None
        if t is None:
            continue
        c = r["curve"]
        for step, v, ts in zip(c["step"], c["val_loss"], c["time_s"]):
            if v is not None and v <= t["val_loss"]:
                r["steps_to_target"], r["time_to_target_s"] = step, ts
                break


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else INF


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Targets, chosen rates, per-(entry, task) summaries, ratios, profiles and scores."""
    chosen = choose_rates(records)
    tgt = targets(chosen)
    attach_targets(records, tgt)
    entries = entries_of(records, chosen)
    tasks = sorted({r["task"] for r in records})

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for entry, runs in sorted(entries.items()):
        per_task: dict[str, dict[str, Any]] = {}
        for task in tasks:
            rs = [r for r in runs if r["task"] == task]
            if not rs:
                continue
            finals = [r["final_val_loss"] for r in rs if r["final_val_loss"] is not None]
            trains = [r["final_train_loss"] for r in rs if r["final_train_loss"] is not None]
            accs = [r["final_val_accuracy"] for r in rs if r.get("final_val_accuracy") is not None]
            tts = [INF if r["time_to_target_s"] is None else r["time_to_target_s"] for r in rs]
            sts = [INF if r["steps_to_target"] is None else float(r["steps_to_target"]) for r in rs]
            per_task[task] = {
                "lr": rs[0]["lr"],
                "seeds": len(rs),
                "final_val_loss_mean": statistics.fmean(finals) if finals else None,
                "final_val_loss_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0 if finals else None,
                "final_train_loss_mean": statistics.fmean(trains) if trains else None,
                "final_val_accuracy_mean": statistics.fmean(accs) if accs else None,
                "best_val_loss_min": min((r["best_val_loss"] for r in rs if r["best_val_loss"] is not None), default=None),
                "time_to_target_median": _json(median(tts)),
                "steps_to_target_median": _json(median(sts)),
                "reached": sum(math.isfinite(x) for x in tts),
                "ms_per_step_mean": statistics.fmean(r["ms_per_step"] for r in rs),
                "diverged": sum(r["diverged"] for r in rs),
            }
        table[entry] = per_task

    ratios = {"time": _ratios(table, tasks, "time_to_target_median"),
              "steps": _ratios(table, tasks, "steps_to_target_median")}
    taus = [TAU_MAX ** (i / 199) for i in range(200)]
    profiles = {kind: {e: [sum(r[t] <= tau for t in r) / max(len(r), 1) for tau in taus]
                       for e, r in rat.items()} for kind, rat in ratios.items()}
    scores = {kind: {e: statistics.fmean(p) for e, p in prof.items()} for kind, prof in profiles.items()}
    return {
        "targets": tgt,
        "chosen_lr": {f"{t}|{o}": c for (t, o), c in sorted(chosen.items())},
        "table": table,
        "ratios": {k: {e: {t: _json(x) for t, x in r.items()} for e, r in v.items()} for k, v in ratios.items()},
        "profile": {"tau": taus, **profiles},
        "scores": scores,
    }


def _ratios(table: dict[str, dict[str, dict[str, Any]]], tasks: list[str], key: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {e: {} for e in table}
    for task in tasks:
        vals = {e: (INF if pt[task][key] is None else pt[task][key]) for e, pt in table.items() if task in pt}
        finite = [v for v in vals.values() if math.isfinite(v)]
        best = min(finite) if finite else INF
        for e, v in vals.items():
            if not math.isfinite(v) or not math.isfinite(best):
                out[e][task] = INF
            else:
                out[e][task] = v / best if best > 0 else (1.0 if v == 0 else INF)
    return out
