"""The controller study's reports: ``report.md`` (:func:`study_report`) and the variants study's
``variants.md`` (:func:`variants_report`), rendered from the results, verdicts included."""

from __future__ import annotations

import math
import sys
from typing import Any

from ...optim.nested import DEFAULT_FEATURES
from .plan import ABLATION, ROBUST


def _about() -> str:
    """The study's description: its package's docstring after the first paragraph."""
    return sys.modules[__package__].__doc__.split(chr(10) + chr(10), 1)[1]


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


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


def variants_report(doc: dict[str, Any]) -> str:
    """``variants.md`` from the variants study's results."""
    L = ["# The nested optimizer's default against variants: robustness to the base rate", "",
         f"Command: `nestopt study controller-variants --out DIR` ({doc['wall_s']:.0f} s here, {doc['runs']} bench runs). "
         f"Part 1 of `nestopt study controller` for each variant: base rates lr* x ({', '.join(f'{x:g}' for x in ROBUST)}) "
         f"around tuned AdamW's rate, {doc['seeds']} seeds; a rate is robust when the median time-to-target there is within "
         "2x of the method's best rate on that task (a target never reached is not within). The difference "
         "from AdamW carries a 90% interval from a paired bootstrap over seeds (see `robust_difference`).", "",
         "| method | options | robust rates | minus AdamW's (90% interval) |", "|---|---|---|---|"]
    rob, diffs, tasks = doc["robustness"], doc["robust_difference"], tuple(doc["tasks"])
    for label, m in rob.items():
        opts = "AdamW" if label == "adamw" else (", ".join(_option(k, v) for k, v in doc["variants"][label].items()) or "-")
        d = diffs.get(label)
        vs = "-" if d is None else f"{d['observed']:+d} [{d['interval90'][0]:+d}, {d['interval90'][1]:+d}]"
        L.append(f"| {label} | {opts} | {m['robust']} / {m['cells']} | {vs} |")
    L += ["", *_ttt_table(rob, tasks)]
    return "\n".join(L) + "\n"


def study_report(doc: dict[str, Any]) -> str:
    """``report.md`` from the study's results."""
    from ...tasks.trading import HORIZON_NAMES

    rob, tasks = doc["robustness"], tuple(doc["tasks"])
    seeds, ablation_seeds, head_seeds = doc["seeds"], doc["ablation_seeds"], doc["head_seeds"]
    L = ["# The nested optimizer's controller: which signals and features pay off", "",
         f"Command: `nestopt study controller --out DIR` ({doc['wall_s']:.0f} s here, {doc['runs']} bench runs on "
         f"{len(tasks)} tasks). {_about()}",
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
    verdict = doc["robust_verdict"]
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
    hv = doc["heads_verdict"]
    if hv is not None:
        long, lifted = hv["horizons"], hv["lifted"]
        a_s = ", ".join(f"{hv['adamw'][n]:.3f}" for n in long)
        b_s = ", ".join(f"{hv['with_heads'][n]:.3f}" for n in long)
        d_s = ", ".join(f"{v:+.3f}" for v in hv["change"].values())
        L += ["", f"Long horizons ({', '.join(long)}): AdamW's AUC {a_s} ({'at' if hv['at_chance'] else 'not at'} chance); "
              f"with per-head features {b_s} (change {d_s}). **Verdict:** per-head feedback "
              f"{hv['verdict']} the long horizons "
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
