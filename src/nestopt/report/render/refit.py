"""Blocks of the daily-refit study (``nestopt study refit``)."""

from __future__ import annotations

import math
from typing import Any

from .fmt import dec, num, of, ratio, table


def _ci(lo: float, hi: float, fmt: Any = dec) -> str:
    return f"{fmt(lo)}-{fmt(hi)}"


def _signed(x: float | None, places: int = 4) -> str:
    return "-" if x is None or x != x else f"{x:+.{places}f}"


def strategies(doc: dict[str, Any]) -> str:
    """The table of strategies: speedup with its interval, loss, PnL, break-even."""
    rows = []
    for r in doc["rows"]:
        sp = "0 (never reached)" if not r["speedup"] else f"{dec(r['speedup'])} ({_ci(*r['speedup_ci90'])})"
        be = r["break_even_refits"]
        meta = r["meta_seconds"]
        rows.append((f"`{r['strategy']}`", sp, ratio(r.get("step_speedup")), num(r["seconds"]), of(r["reached"], r["runs"]), dec(r["val_loss"], 4),
                     f"{_signed(r['d_val_loss'])} ({_signed(r['d_val_loss_ci90'][0])} to {_signed(r['d_val_loss_ci90'][1])})",
                     dec(r["auc"], 3), num(r["pnl_total"]), _signed(r["d_pnl"], 1),
                     "-" if meta is None else num(meta), "-" if meta is None else ("never" if be is None else str(be))))
    plan = doc["plan"]
    head = (f"Each of {plan['eval_days'][1] - plan['eval_days'][0]} evaluation days (days {plan['eval_days'][0]} to "
            f"{plan['eval_days'][1] - 1}) times {plan['seeds']} seeds, {doc['steps']} steps a refit; tuned on days "
            f"{doc['tune_days'][0]} to {doc['tune_days'][-1]} and meta-trained on days {plan['train_days'][0]} to "
            f"{plan['train_days'][1] - 1}. Tuned: AdamW {num(doc['rates']['adamw-once'])}, warm start "
            f"{num(doc['rates']['warm'])}, Muon {num(doc['rates']['muon'])}, shrink {num(doc['shrink'])}.")
    return head + "\n\n" + table(
        ("strategy", "speedup over tuned-once AdamW (median over days, 90% interval)", "in steps",
         "seconds to target (median)",
         "runs that reach it", "next-day val loss", "vs tuned-once (median, 90% interval)", "mean AUC",
         "PnL over the days (bp)", "PnL vs tuned-once a day", "meta-training s", "break-even (refits)"), rows)


def verdict(doc: dict[str, Any]) -> str:
    """The chapter's claim and the goal, for the learned and nested strategies."""
    lines = []
    for c in doc["claim"]:
        lo, hi = c["ci90"]
        lines.append(f"- `{c['strategy']}`: {ratio(c['speedup'])} (90% interval {_ci(lo, hi)}): the claim is "
                     f"**{c['verdict']}** for it.")
    best = max(doc["goal"], key=lambda g: next(r["speedup"] for r in doc["rows"] if r["strategy"] == g["strategy"]))
    row = next(r for r in doc["rows"] if r["strategy"] == best["strategy"])
    need = best["factor_needed"]
    gap = ("it meets the goal" if best["met"] else
           f"it needs {'an unbounded' if math.isinf(need) else ratio(need)} factor more speed for a median of 2x, and "
           f"its interval's lower end ({dec(row['speedup_ci90'][0])}) is {dec(best['interval_short_by'])} short of 1.5")
    quality = ", ".join(f"{k} {'n/a' if v is None else 'no worse' if v else 'worse'}" for k, v in best["parts"].items()
                        if k in ("val_loss", "pnl"))
    lines += ["", f"The best learned or nested strategy is `{best['strategy']}`: {gap} ({quality}).", "",
              "Why, from the numbers (speedup in seconds, in steps, and in steps on the past days each was meta-trained on):", ""]
    for w in doc.get("why", []):
        past = w["past"]
        where = ("" if past is None else
                 f"; in steps on the past days it was meta-trained on {ratio(past['step_speedup'])} ({_ci(*past['step_ci90'])})")
        lines.append(f"- `{w['strategy']}`: {ratio(w['speedup'])} in seconds, {ratio(w['step_speedup'])} in steps "
                     f"({_ci(*w['step_ci90'])}){where}: "
                     + ("; ".join(w["findings"]) or "nothing stands out") + ".")
    return "\n".join(lines)


def headline(doc: dict[str, Any]) -> str:
    claims = {c["strategy"]: c for c in doc["claim"]}
    c = claims.get("learned-meta") or next(iter(claims.values()))
    best = max((r for r in doc["rows"] if r["strategy"] != "adamw-once"), key=lambda r: r["speedup"])
    return (f"the meta-trained learned optimizer refits {ratio(c['speedup'])} as fast as tuned-once AdamW (90% interval "
            f"{_ci(*c['ci90'])}): the chapter's claim is {c['verdict']}; fastest: `{best['strategy']}` "
            f"{ratio(best['speedup'])}")


RENDERERS = {
    "refit.strategies": ("refit", lambda d, p: strategies(d)),
    "refit.verdict": ("refit", lambda d, p: verdict(d)),
}
