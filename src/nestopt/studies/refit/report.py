"""The refit study's figures and report."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..._io import atomic_savefig
from .analysis import BASELINE, CLAIM, GOAL, GOAL_LOW

MAIN = ("adamw-once", "adamw-per-day", "warm", "shrink-perturb", "muon", "prodigy", "schedulefree",
        "learned-shipped", "learned-meta", "nested")


def _smooth(ys: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(ys[max(0, i - k):i + 1]) for i in range(len(ys))]


def figures(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    per_day = doc["per_day"]
    shown = [s for s in MAIN if s in per_day]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    budget = doc["steps"]
    for i, s in enumerate(shown):
        ds = sorted(per_day[s], key=int)
        ys = [per_day[s][d]["steps"] for d in ds]
        ax.plot([int(d) for d in ds], [y if math.isfinite(y) else budget * 1.15 for y in ys], marker="o", ms=3,
                lw=1.6 if s in (BASELINE, "learned-meta", "nested") else 0.8, color=f"C{i % 10}", label=s)
    ax.axhline(budget, color="k", lw=0.6, ls=":")
    ax.set_xlabel("evaluation day")
    ax.set_ylabel("steps to the day's target (median seed)")
    ax.set_title(f"steps to tuned-once AdamW's final validation loss (above the dotted line: not reached in {budget})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, out / "steps_to_target.png", dpi=100)
    plt.close(fig)
    files.append("steps_to_target.png")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, s in enumerate(shown):
        ds = sorted(per_day[s], key=int)
        pnl = [per_day[s][d]["pnl"] for d in ds]
        cum, total = [], 0.0
        for p in pnl:
            total += p if p == p else 0.0
            cum.append(total)
        ax.plot([int(d) for d in ds], cum, lw=1.6 if s in (BASELINE, "learned-meta", "nested") else 0.8,
                color=f"C{i % 10}", label=s)
    ax.set_xlabel("evaluation day")
    ax.set_ylabel("cumulative next-day PnL (bp per asset)")
    ax.set_title("the position rule on each day's refit, summed over the evaluation days", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, out / "cumulative_pnl.png", dpi=100)
    plt.close(fig)
    files.append("cumulative_pnl.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    hist = doc["learned"]["history"]
    if hist:
        axes[0].plot([h[0] for h in hist], _smooth([h[1] for h in hist]), label="hybrid network (TBPTT)")
    axes[0].set_title("learned optimizer: meta-loss (mean log L_t/L_0), running mean", fontsize=9)
    axes[0].set_xlabel("outer step")
    for name, c in doc["controllers"].items():
        h = c["history"]
        if h:
            axes[1].plot([x[0] for x in h], _smooth([x[1] for x in h]), lw=1.6 if name == "nested" else 0.8, label=name)
    axes[1].set_title("nested controllers (ES): meta-loss, running mean", fontsize=9)
    axes[1].set_xlabel("outer step")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / "meta_training.png", dpi=100)
    plt.close(fig)
    files.append("meta_training.png")

    rows = [r for r in doc["rows"] if r["strategy"] != BASELINE]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        lo, hi = r["speedup_ci90"]
        ax.plot([lo, hi], [i, i], color="C0", lw=2)
        ax.plot([r["speedup"]], [i], "o", color="C0")
    ax.axvspan(*CLAIM, color="C2", alpha=0.12, label="the chapter's claim: 1.5x-3x")
    ax.axvline(1.0, color="k", lw=0.6)
    ax.set_yticks(range(len(rows)), [r["strategy"] for r in rows], fontsize=8)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("wall-clock speedup over tuned-once AdamW (median over days, 90% interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / "speedup.png", dpi=100)
    plt.close(fig)
    files.append("speedup.png")
    return files


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "-")
    return format(x, fmt)


def table(rows: list[dict[str, Any]]) -> list[str]:
    L = ["| strategy | speedup (median over days, 90% CI) | in steps | seconds to target | steps | reached | val loss | "
         "vs once (median, 90% CI) | mean AUC | PnL total (bp) | PnL vs once / day | meta-training s | break-even "
         "(refits) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_ci90"]
        dl, dh = r["d_val_loss_ci90"]
        be = r["break_even_refits"]
        meta = r["meta_seconds"]
        L.append(f"| {r['strategy']} | {_f(r['speedup'], '.2f')} ({_f(lo, '.2f')}-{_f(hi, '.2f')}) | "
                 f"{_f(r.get('step_speedup'), '.2f')} | "
                 f"{_f(r['seconds'], '.2f')} | {_f(r['steps'], '.0f')} | {r['reached']}/{r['runs']} | "
                 f"{_f(r['val_loss'], '.4f')} | {_f(r['d_val_loss'], '+.4f')} ({_f(dl, '+.4f')} to {_f(dh, '+.4f')}) | "
                 f"{_f(r['auc'], '.3f')} | {_f(r['pnl_total'], '.0f')} | {_f(r['d_pnl'], '+.1f')} | "
                 f"{_f(meta, '.0f')} | {'-' if meta is None else ('never' if be is None else be)} |")
    return L


def report(doc: dict[str, Any]) -> str:
    from . import __doc__ as protocol

    plan = doc["plan"]
    q = " --quick" if plan["eval_days"][1] - plan["eval_days"][0] <= 2 and plan["seeds"] == 1 else ""
    L = ["# Daily refits: how much faster than Adam on the same task distribution?", "",
         f"Command: `nestopt study refit{q} --out DIR` ({doc['wall_s']:.0f} s here, tuning and meta-training "
         f"{doc['tune_s']:.0f} s of it). Family `{plan['family']}`; meta-training and tuning on days "
         f"{plan['train_days'][0]}-{plan['train_days'][1] - 1} (tuning on days {doc['tune_days'][0]}-{doc['tune_days'][-1]}), "
         f"evaluation on days {plan['eval_days'][0]}-{plan['eval_days'][1] - 1}, {plan['seeds']} seed(s), "
         f"{doc['steps']} steps a refit.", "",
         protocol.split("\n\n", 1)[1].strip(), "",
         "## Tuned on the past days", "",
         f"AdamW (cold) {doc['rates']['adamw-once']:g}; warm start {doc['rates']['warm']:g}; Muon "
         f"{doc['rates']['muon']:g}; shrink-and-perturb shrink {doc['shrink']:g} (noise 0.1 x a fresh initialisation). "
         f"Learned network: {'loaded from the cache' if doc['learned']['cached'] else 'meta-trained'} "
         f"(`{doc['learned']['command']}`, {doc['learned']['seconds']:.0f} s). Nested controllers: "
         f"{len(doc['controllers'])} (trading features: {', '.join(doc['trading_features']) or 'none: the family gives no monitor_stats'}).",
         "", "## Strategies", ""]
    L += table(doc["rows"])
    L += ["", "Speedup: tuned-once AdamW's seconds to the day's target over the strategy's (0: its median seed never "
          "reached it). PnL rule: in each asset, the position is the mean over the seven heads of 2 sigmoid(z) - 1 "
          "(from -1 to 1), held for the 4 bars to the next sample; no costs. Break-even: meta-training seconds over "
          "the median seconds a refit saves.", "", "## The chapter's claim: 50-200% faster than Adam", ""]
    for c in doc["claim"]:
        L.append(f"- **{c['strategy']}**: speedup {_f(c['speedup'], '.2f')} (90% CI {_f(c['ci90'][0], '.2f')}-"
                 f"{_f(c['ci90'][1], '.2f')}): **{c['verdict']}**.")
    L += ["", f"## The goal: {GOAL:g}x (interval above {GOAL_LOW:g}x), no worse loss or PnL", ""]
    for g in doc["goal"]:
        parts = ", ".join(f"{k} {'n/a' if v is None else 'yes' if v else 'no'}" for k, v in g["parts"].items())
        L.append(f"- {g['strategy']}: {'met' if g['met'] else 'not met'} ({parts}); "
                 f"{_f(g['factor_needed'], '.1f')}x more speed needed, interval short by {_f(g['interval_short_by'], '.2f')}.")
    if doc.get("why"):
        L += ["", "## Why: the evidence", ""]
        for w in doc["why"]:
            past = w["past"]
            where = ("" if past is None else f"; in steps on the past days ({past['days']}): "
                     f"{_f(past['step_speedup'], '.2f')} ({_f(past['step_ci90'][0], '.2f')}-{_f(past['step_ci90'][1], '.2f')})")
            meta = "" if w["meta_loss"] is None else f"; meta-loss {w['meta_loss'][0]:+.4f} to {w['meta_loss'][1]:+.4f}"
            L.append(f"- **{w['strategy']}**: {_f(w['speedup'], '.2f')} in seconds, {_f(w['step_speedup'], '.2f')} in "
                     f"steps{where}{meta}. " + ("; ".join(w["findings"]) or "nothing stands out") + ".")
    L += [""] + [f"![{f}]({f})" for f in doc["figures"]]
    return "\n".join(L) + "\n"
