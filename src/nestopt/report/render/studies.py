"""Blocks of the Polyak, large-learning-rate and learned-optimizer studies."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .fmt import dec, num, of, plural, ratio, table

# -- polyak --------------------------------------------------------------------------------------

_EXP_TITLES = {"exp1": "1: `(x-3)^2`", "exp2": "2: `(x-1)^2 + (y-2)^2`", "exp3": "3: `(x-1)^2 + 100 (y-2)^2`",
               "exp4": "4: linear model, MSE", "exp5": "5: `x^2`-activation MLP"}


def polyak_verdicts(doc: dict[str, Any]) -> str:
    rows, counts = [], Counter()
    for exp, items in doc["verdicts"].items():
        for it in items:
            counts[it["verdict"]] += 1
            v = f"**{it['verdict']}**" if it["verdict"] == "refuted" else it["verdict"]
            rows.append((_EXP_TITLES.get(exp, exp), it["claim"], v, it["evidence"]))
    n = sum(counts.values())
    head = (f"The note's expectations, one verdict each, computed from the runs by the rules stated in the evidence "
            f"column: {counts['confirmed']} confirmed, {counts['partly']} partly, {counts['refuted']} refuted "
            f"(of {n}).")
    return head + "\n\n" + table(("experiment", "the note expects", "verdict", "evidence"), rows)


_GATES_OPTS = {"global": "Polyak, one global step (the note's rule)", "tensor": "Polyak per tensor (its fix 1)",
               "adamw": "AdamW"}


def polyak_gates(doc: dict[str, Any]) -> str:
    from ...studies.polyak_gates import seed_median as _median

    g = doc.get("logic_gates")
    if g is None:
        return "*Not measured in this version:* the stored Polyak result has no logic-gates part.\n"
    s = g["summary"]
    rows = []
    for opt, label in _GATES_OPTS.items():
        m = s[opt]
        name = label + (f" (lr {g['adamw_lr']:g})" if opt == "adamw" else "")
        met = sum(bool(x) for x in m["meets_target"])
        rows.append((name, dec(_median(m["spread_init"]), 1), dec(_median(m["spread_median"]), 1),
                     ", ".join(str(x) for x in m["zigzags"]), ", ".join(str(x) for x in m["spikes"]),
                     num(_median(m["final_loss"]), 2), of(met, len(m["meets_target"]))))
    task = g["task"]
    head = (f"Task `{task['name']}`: {task['description']}; {g['steps']} full-batch steps from seeds "
            f"{', '.join(str(x) for x in g['seeds'])}. The spread is log10(largest / smallest per-layer gradient norm), "
            "in orders of magnitude (median over seeds); zig-zags are steps whose loss rose (the experiments' "
            "definition), spikes the rises above 10%, both per seed.")
    verdict_rows = [(f"{it['key']}: {it['claim']}", f"**{it['verdict']}**" if it["verdict"] == "refuted" else it["verdict"],
                     it["evidence"]) for it in g["verdicts"]]
    text = head + "\n\n" + table(("optimizer", "spread at init", "median spread", "zig-zags", "spikes",
                                    "final loss (median)", "target met"), rows)
    text += "\n\n" + table(("the note's explanation, claim by claim", "verdict", "evidence"), verdict_rows)
    ctrl = g.get("control")
    if ctrl is not None:
        cs = ctrl["summary"]["global"]
        text += (f"\n\nControl, outside the verdicts: at depth {ctrl['depth']} the layers' gradients spread "
                 f"{dec(_median(cs['spread_median']), 1)} orders (depth {g['depth']}: "
                 f"{dec(_median(s['global']['spread_median']), 1)}) and the global rule still rises on "
                 f"{', '.join(str(x) for x in cs['zigzags'])} steps per seed.")
    return text


def _variant_labels() -> dict[str, str]:
    from ...studies.polyak_experiments import VARIANTS

    return {v.key: v.label for v in VARIANTS}


def polyak_fixes(doc: dict[str, Any]) -> str:
    labels = _variant_labels()
    exps = list(doc["verdicts"])
    cell: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in doc["runs"]:
        cell[(r["variant"], r["experiment"], r["dtype"])] = r
    variants = list(dict.fromkeys(r["variant"] for r in doc["runs"]))

    def show(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if r.get("error"):
            return "error"
        m = r["metrics"]
        if m.get("nan") or not math.isfinite(m.get("final_loss") or 0.0):
            return "diverged"
        s = m.get("steps_to_1e-6")
        return str(s) if s is not None else f"not reached ({num(m['final_loss'], 2)})"

    rows = []
    for v in variants:
        name = labels.get(v, v)
        lr = next((cell[k]["lr"] for k in cell if k[0] == v and cell[k]["lr"] is not None), None)
        if lr is not None:
            name += " (rates chosen per experiment)"
        rows.append([f"`{v}`: {name}"] + [f"{show(cell.get((v, e, 'float64')))} / {show(cell.get((v, e, 'float32')))}"
                                           for e in exps])
    exp3 = sorted(((cell[(v, "exp3", "float64")]["metrics"].get("steps_to_1e-6"), v) for v in variants
                   if (v, "exp3", "float64") in cell), key=lambda t: (t[0] is None, t[0] or 0))
    ranked = [f"`{v}` {s}" for s, v in exp3 if s is not None]
    never = [f"`{v}`" for s, v in exp3 if s is None]
    text = ("Steps to a loss of `1e-6`, float64 / float32, for every variant on every experiment (*not reached*: "
            "the loss at the end of the run). On experiment 3 the variants rank: " + ", ".join(ranked) +
            (f"; never: {', '.join(never)}." if never else "."))
    return text + "\n\n" + table(["variant"] + [f"exp {e[-1]}" for e in exps], rows)


# -- large-lr ------------------------------------------------------------------------------------

def large_lr_claims(doc: dict[str, Any]) -> str:
    rec = [v for v in doc["verdicts"] if v["arm"] == "recipe"]
    none = [v for v in doc["verdicts"] if v["arm"] == "no recipe"]
    holds = sum(v["verdict"] == "holds" for v in rec)
    none_fail = sum("every run at lr" in v["evidence"] for v in none)
    grid = ", ".join(f"{x:g}" for x in doc["grid"])
    gs = doc["grid_search"]
    text = (f"A spurious-cue task built from scikit-learn's digits, a small CNN trained by SGD with momentum over the note's "
            f"grid ({grid}), with the note's recipe (`LargeLRConfig`) and without it, "
            f"{plural(doc['seeds'], 'seed')}, {doc['epochs']} epochs. With the recipe, {holds} of the paper's {len(rec)} "
            f"claims hold.")
    if none and none_fail == len(none):
        text += (" Without it, every run at the large rates failed (diverged or collapsed to chance), so no claim can "
                 "hold there.")
    elif none:
        text += (f" Without it, {sum(v['verdict'] == 'holds' for v in none)} of {len(none)} hold "
                 f"({none_fail} comparisons have no surviving large-rate run).")
    text += (f" The recipe's grid search picks lr {gs['best_lr']:g} on validation accuracy." if gs.get("best_lr") is not None
             else f" The recipe's grid search chose no rate: {gs.get('error', 'no result')}.")
    text += (f" Every diagnostic at its default interval cost {100 * doc['diagnostics_overhead']:.1f}% of the training "
             "time.")
    rows = [(v["claim"], f"**{v['verdict']}**" if v["verdict"] == "holds" else v["verdict"], v["evidence"]) for v in rec]
    return text + "\n\n" + table(("claim (recipe arm; large rates against small)", "verdict", "measured"), rows) + \
        "\n\n![metrics against the learning rate](results/large-lr/metrics_vs_lr.png)"


# -- learned -------------------------------------------------------------------------------------

def _sp(r: dict[str, Any]) -> str:
    lo, hi = r["speedup_ci90"]
    return f"{dec(r['speedup'])} ({dec(lo)}-{dec(hi)})" if r["speedup"] else "0 (never reached)"


def learned_families(doc: dict[str, Any]) -> str:
    """Per held-out family, on how many of its tasks each network (and peer) beat tuned AdamW."""
    nets = list(doc["nets"])
    by = {(r["task"], r["net"]): r for r in doc["rows"]}
    tasks = list(dict.fromkeys(r["task"] for r in doc["rows"]))
    family = {t: t.split("#")[0] for t in tasks}  # (a held-out task is FAMILY#INDEX)
    rows = []
    for f in dict.fromkeys(family.values()):
        mine = [t for t in tasks if family[t] == f]
        rows.append([f"`{f}`"] + [of(sum(bool(by[(t, n)]["faster"]) for t in mine), len(mine)) for n in nets])
    total = ["all"] + [of(sum(bool(by[(t, n)]["faster"]) for t in tasks), len(tasks)) for n in nets]
    return ("Held-out tasks on which each one is faster than tuned AdamW (median steps to AdamW's own target), by "
            "family; none of these families was seen in meta-training, and the peers run untuned at their defaults:"
            "\n\n" + table(["family"] + nets, [*rows, total]))


def learned_table(doc: dict[str, Any]) -> str:
    nets = list(doc["nets"])
    tasks = list(dict.fromkeys(r["task"] for r in doc["rows"] + doc["long"]))
    by = {(r["task"], r["net"]): r for r in doc["rows"] + doc["long"]}
    long_tasks = {r["task"] for r in doc["long"]}
    rows = []
    for t in tasks:
        first = by[(t, nets[0])]
        name = first["name"] + (f", {first['steps']} steps (the long horizon)" if t in long_tasks else "")
        rows.append([name, f"{first['adamw_lr']:g}"] +
                    [f"{_sp(by[(t, n)])}, {by[(t, n)]['reached']}/{by[(t, n)]['seeds']}" for n in nets])
    lines = [table(["task", "tuned AdamW lr"] + [f"{n}: speedup (90% interval), seeds reached" for n in nets], rows), ""]
    lines += [learned_families(doc), ""]
    for n in nets:
        v = doc["verdicts"][n]
        longs = [r for r in doc["long"] if r["net"] == n]
        sentence = (f"**{n}**: faster than tuned AdamW on {of(v['faster'], v['tasks'])} held-out tasks "
                    f"(median steps to its target), {plural(v['diverged'], 'diverged run')}")
        strong = sum(r["speedup_ci90"][0] > 1.0 for r in doc["rows"] if r["net"] == n)
        thin = sum(r["faster"] and r["speedup_ci90"][0] == 0.0 for r in doc["rows"] if r["net"] == n)
        sentence += f"; the interval lies wholly above 1 on {strong}, and reaches 0 on {thin} of the faster ones"
        for r in longs:
            lo, hi = r["speedup_ci90"]
            if r["speedup"] > 1.0:
                sentence += (f"; over the long horizon ({r['steps']} steps) its median seed reaches the target "
                             f"{ratio(r['speedup'])} sooner than tuned AdamW's ({of(r['reached'], r['seeds'])} seeds reach it; "
                             f"90% interval {dec(lo)}-{dec(hi)}" +
                             (", wholly above 1)" if lo > 1.0 else ": not resolved, the interval reaches below 1)"))
            elif r["speedup"] > 0:
                pace = "as fast as" if r["speedup"] == 1.0 else "slower than"
                sentence += (f"; over the long horizon ({r['steps']} steps) it is {pace} tuned AdamW "
                             f"({ratio(r['speedup'])}, {of(r['reached'], r['seeds'])} seeds reach the target)")
            else:
                sentence += f"; over the long horizon ({r['steps']} steps) its median seed never reaches the target"
        verdict = {"met": "the issue's bar on the held-out tasks (faster on at least half, no divergence) is met",
                   "not met": "the issue's bar on the held-out tasks (faster on at least half, no divergence) is not met",
                   "reference": "a reference, not a candidate"}[v["verdict"]]
        lines.append(f"{sentence}: {verdict}.")
        lines.append("")
    lines.append("A speedup is tuned AdamW's median steps to its own target divided by the network's; 0 means the "
                 "network's median seed never reached it. The interval is a bootstrap over seeds.")
    lines += ["", "![held-out loss curves](results/learned/heldout_curves.png)"]
    return "\n".join(lines)


def learned_native(loaded: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """The long horizon under the pinned numerics against the machine's own: what rounding does."""
    (pinned, _), (native, nprov) = loaded
    cpu = nprov["environment"].get("cpu", "this machine")
    rows, moved = [], 0
    for a in pinned["rows"] + pinned["long"]:
        b = next((x for x in native["rows"] + native["long"] if x["task"] == a["task"] and x["net"] == a["net"]), None)
        if b is None:
            continue
        same = (a["speedup"], a["reached"]) == (b["speedup"], b["reached"])
        moved += not same
        if not same:
            name = a["name"] + (f", {a['steps']} steps" if a in pinned["long"] else "")
            rows.append((name, a["net"], f"{_sp(a)}, {a['reached']}/{a['seeds']}", f"{_sp(b)}, {b['reached']}/{b['seeds']}"))
    n = len(pinned["rows"]) + len(pinned["long"])
    text = (f"The same study on this machine's own numerics ({cpu}, its widest vector kernels, not pinned): "
            f"{moved} of {n} rows change. " + ("Those that do:" if rows else "None does."))
    if not rows:
        return text
    return (text + "\n\n" + table(("task", "network", "pinned numerics", "this machine's own numerics"), rows) +
            "\n\nA row that moves with the rounding of the arithmetic, with nothing else changed, is not resolved by "
            "this study: read its interval, and the pinned row as one draw of it.")


RENDERERS = {
    "learned.native": (("learned", "learned-native"), learned_native),
    "polyak.verdicts": ("polyak", lambda d, p: polyak_verdicts(d)),
    "polyak.fixes": ("polyak", lambda d, p: polyak_fixes(d)),
    "polyak.gates": ("polyak", lambda d, p: polyak_gates(d)),
    "large-lr.claims": ("large-lr", lambda d, p: large_lr_claims(d)),
    "learned.table": ("learned", lambda d, p: learned_table(d)),
    "learned.families": ("learned", lambda d, p: learned_families(d)),
}
