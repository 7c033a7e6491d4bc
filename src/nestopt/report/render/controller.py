"""Blocks of the nested optimizer's studies (``controller`` and ``controller-variants``)."""

from __future__ import annotations

from typing import Any

from .fmt import dec, num, pct, table


def _verdict_word(v: str) -> str:
    return {"more": "more", "less": "less"}.get(v, "not shown more")


def robustness(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    rob, diff = doc["robustness"], doc["robust_difference"]
    lo, hi = diff["interval90"]
    first = next(iter(rob.values()))["tasks"]
    rates = ", ".join(f"{float(x):g}" for x in next(iter(first.values()))["ttt"])  # the multipliers of lr* stored
    head = (f"{len(doc['tasks'])} quick-suite tasks through the bench's runner, base rates `lr* x ({rates})` around each "
            f"task's tuned AdamW rate `lr*`, {doc['seeds']} seeds, {doc['runs']} runs; target = tuned AdamW's worst-seed "
            "final validation loss. A rate is robust when the method's median time-to-target there is within `2x` of its "
            "best rate on that task.")
    rows = [(k, f"{m['robust']} / {m['cells']}", dec(m["fraction"])) for k, m in rob.items()]
    nd, aw = rob["nested (default)"]["robust"], rob["adamw"]["robust"]
    verdict = (f"**Robustness to the base rate: {_verdict_word(doc['robust_verdict'])} than AdamW's.** The default nested "
               f"optimizer has {nd} robust rates against AdamW's {aw}, a difference of {diff['observed']:+d} with a "
               f"90% interval of [{lo:+d}, {hi:+d}] (a paired bootstrap over seeds, {diff['draws']} draws; ahead in "
               f"{pct(diff['ahead'])} of them, behind in {pct(diff['behind'])}); the verdict says \"more\" only when "
               "the interval lies above 0.")
    return "\n\n".join([head, table(("method", "robust rates", "fraction"), rows), verdict,
                        "![robustness](results/controller/robustness.png)"])


def variants(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    from ...studies.controller.report import _option

    rob, diffs = doc["robustness"], doc["robust_difference"]
    rows = []
    for label, m in rob.items():
        opts = "AdamW" if label == "adamw" else (", ".join(_option(k, v) for k, v in doc["variants"][label].items()) or "-")
        d = diffs.get(label)
        vs = "-" if d is None else f"{d['observed']:+d} [{d['interval90'][0]:+d}, {d['interval90'][1]:+d}]"
        rows.append((label, opts, f"{m['robust']} / {m['cells']}", vs))
    above = [v for v, d in diffs.items() if d["interval90"][0] > 0]
    below = [v for v, d in diffs.items() if d["interval90"][1] < 0]
    head = (f"Each hindsight configuration against AdamW in one run ({doc['seeds']} seeds, {doc['runs']} runs): robust "
            "rates as above, and the difference from AdamW's count with its 90% paired-bootstrap interval.")
    tail = ("No interval lies above 0: no configuration tried is shown more robust than AdamW."
            if not above else f"Shown more robust than AdamW (interval above 0): {', '.join(above)}.")
    outside = [v for v, d in diffs.items() if not d["interval90"][0] <= d["observed"] <= d["interval90"][1]]
    if outside:
        tail += (f" For {', '.join(outside)} the observed difference lies outside its own interval: the bootstrap "
                 "resamples seeds, and with few seeds its distribution is lopsided; read the interval, not the point.")
    tail += (" Robust rates are judged on measured time to target, so a rerun of the same configuration (AdamW's "
             "count here and in the study above) can move by a rate or two.")
    if below:
        tail += f" Shown less robust (interval below 0): {', '.join(below)}."
    return "\n\n".join([head, table(("configuration", "options", "robust rates", "minus AdamW's (90% interval)"), rows),
                        tail])


def ablations(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    rows = []
    for r in doc["ablations"]:
        rows.append((r["what"], f"{r['config']} vs {r['reference']}", r["pairs"], r["wins"], r["losses"], r["ties"],
                     num(r["geo_ratio"]), f"**{r['verdict']}**"))
    clear = [f"{r['what']} ({r['verdict']})" for r in doc["ablations"] if "no clear" not in r["verdict"]]
    head = (f"Paired final validation losses ({doc['ablation_seeds']} seeds per task and rate). A signal is compared "
            "with `frozen` (the untrained controller); a feature by removing it from the default configuration, or "
            "adding it. Win/loss: over `1%` better/worse; better or worse when wins and losses differ by at least "
            "`max(3, 25%)` of the pairs.")
    tail = ("Clear effects: " + "; ".join(clear) + "." if clear else "No ablation shows a clear effect.")
    return "\n\n".join([head, table(("what", "config vs reference", "pairs", "wins", "losses", "ties", "geo-mean loss ratio",
                                     "verdict"), rows), tail, "![ablations](results/controller/ablations.png)"])


def heads(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    from ...tasks.trading import HORIZON_NAMES

    rows = [(c, dec(h["val_loss"], 4), *(f"{h[n]['mean']:.3f} ± {h[n]['sd']:.3f}" for n in HORIZON_NAMES))
            for c, h in doc["heads"].items()]
    hv = doc["heads_verdict"]
    text = (f"The multi-horizon trading task with the trunk and each head as param groups, lr {doc['head_lr']:g} (tuned "
            f"AdamW's), {doc['head_seeds']} seeds; final validation AUC per horizon (mean ± sd).")
    out = [text, table(("config", "val loss", *HORIZON_NAMES), rows)]
    if hv is not None:
        long = hv["horizons"]
        out.append(f"**Per-head feedback {hv['verdict']} the long horizons** ({', '.join(long)}): AdamW's AUC "
                   f"{', '.join(dec(hv['adamw'][n], 3) for n in long)} ({'at' if hv['at_chance'] else 'not at'} chance), "
                   f"with per-head features {', '.join(dec(hv['with_heads'][n], 3) for n in long)} "
                   f"({'beyond' if hv['lifted'] else 'within'} the seed-to-seed spread).")
    return "\n\n".join(out)


def cost(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    rows = [(t, dec(c["ms_adamw"]), dec(c["frozen_x_adamw"]), dec(c["hindsight_x_adamw"]), dec(c["hindsight_x_frozen"]),
             dec(c["proxy_x_adamw"])) for t, c in doc["costs"].items()]
    fx = [c["frozen_x_adamw"] for c in doc["costs"].values()]
    hx = [c["hindsight_x_adamw"] for c in doc["costs"].values()]
    text = (f"Median ms per training step at `lr*` (forward, backward and step, as the bench times it). On these small "
            f"models the frozen controller's training step costs {dec(min(fx))} to {dec(max(fx))}x AdamW's, and the "
            f"hindsight signal's amortised step (replays included) {dec(min(hx))} to {dec(max(hx))}x.")
    return "\n\n".join([text, table(("task", "AdamW ms", "frozen x AdamW", "hindsight x AdamW", "hindsight x frozen",
                                     "proxy x AdamW"), rows)])


RENDERERS = {
    "controller.robustness": ("controller", robustness),
    "controller-variants.table": ("controller-variants", variants),
    "controller.ablations": ("controller", ablations),
    "controller.heads": ("controller", heads),
    "controller.cost": ("controller", cost),
}
