"""The README's ``summary.latest`` block: one line per published result, each from its result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..published import RECORDS
from ..store import load, stored
from .bench import REFS, _entries, limits
from .fmt import dec, of, ratio, table
from .refit import headline as _refit
from .stopping import headline as _stopping

PAGES = {"bench-quick": "benchmark.md", "bench-full": "benchmark.md", "polyak": "polyak.md", "large-lr": "large-lr.md",
         "learned": "learned.md", "learned-native": "learned.md", "controller": "nested.md", "controller-variants": "nested.md", "hpo": "hypergradients.md",
         "games": "games.md", "overhead": "step-cost.md", "audit": "development.md",
         "mutation": "development.md", "refit": "refit.md", "collectives": "scaling-out.md",
         "stopping": "stopping.md"}


def _bench(doc: dict[str, Any]) -> str:
    ents = _entries(doc)
    top = ", ".join(f"`{e[0]}` {dec(e[1], 3)}" for e in ents[:3])
    ref = next(e for e in ents if e[0] == "adamw-tuned")
    return f"best scores by time: {top}" + ("" if ref in ents[:3] else f"; tuned AdamW {dec(ref[1], 3)}")


def _polyak(doc: dict[str, Any]) -> str:
    c = Counter(it["verdict"] for items in doc["verdicts"].values() for it in items)
    return (f"of the note's {sum(c.values())} expectations: {c['confirmed']} confirmed, {c['partly']} partly, "
            f"{c['refuted']} refuted")


def _large_lr(doc: dict[str, Any]) -> str:
    rec = [v for v in doc["verdicts"] if v["arm"] == "recipe"]
    n = sum(v["verdict"] == "holds" for v in rec)
    return f"{n} of the paper's {len(rec)} claims hold{'s' if n == 1 else ''} with the recipe"


def _native(doc: dict[str, Any]) -> str:
    label = next(iter(doc["nets"]))
    for r in doc["long"]:
        if r["net"] == label:
            lo, hi = r["speedup_ci90"]
            return (f"on this machine's own numerics the {label}'s long horizon reads {dec(r['speedup'])}x (90% interval "
                    f"{dec(lo)}-{dec(hi)}, {of(r['reached'], r['seeds'])} seeds): rounding alone moves it")
    return _learned(doc)


def _learned(doc: dict[str, Any]) -> str:
    label = next(iter(doc["nets"]))
    v = doc["verdicts"][label]
    s = f"the {label} is faster than tuned AdamW on {of(v['faster'], v['tasks'])} held-out tasks"
    for r in doc["long"]:
        if r["net"] == label:
            lo, hi = r["speedup_ci90"]
            if r["speedup"] > 1.0:
                s += (f"; over the long horizon {ratio(r['speedup'], 3)} sooner (90% interval {dec(lo)}-{dec(hi)}, "
                      f"{of(r['reached'], r['seeds'])} seeds reach the target; pinned numerics, and the next row "
                      "shows how far rounding moves it)")
            elif r["speedup"] > 0:
                s += f"; slower over the long horizon ({ratio(r['speedup'], 3)})"
            else:
                s += "; never reaches the target over the long horizon"
    return s


def _controller(doc: dict[str, Any]) -> str:
    rob, d = doc["robustness"], doc["robust_difference"]
    lo, hi = d["interval90"]
    word = {"more": "more", "less": "less"}.get(doc["robust_verdict"], "not shown more")
    return (f"the default nested optimizer is {word} robust to the base rate than AdamW: "
            f"{rob['nested (default)']['robust']} vs {rob['adamw']['robust']} robust rates (90% interval [{lo:+d}, {hi:+d}])")


def _variants(doc: dict[str, Any]) -> str:
    above = [v for v, d in doc["robust_difference"].items() if d["interval90"][0] > 0]
    n = len(doc["robust_difference"])
    return (f"{of(len(above), n)} hindsight configurations shown more robust than AdamW" +
            (f" ({', '.join(above)})" if above else ""))


def _hpo(doc: dict[str, Any]) -> str:
    h = doc["hpo"]["rows"]
    wins = sum(r["implicit"]["test_acc"] > r["tpe"]["test_acc"] for r in h)
    t = [r["implicit"]["wall_s"] / r["tpe"]["wall_s"] for r in h]
    return (f"one decay per weight beats Optuna TPE's one decay on {of(wins, len(h))} seeds in "
            f"{dec(min(t))}-{dec(max(t))}x its time")


def _games(doc: dict[str, Any]) -> str:
    worst = max(r["rel_err"] for r in doc["rates"]["rows"])
    rr = "finds more" if doc["ridge"]["ridge_rider_wins"] else "does not find more"
    return (f"measured rates match the analysis within {100 * worst:.2f}%; Ridge Rider {rr} distinct solutions "
            "than random restarts at equal compute")


def _overhead(doc: list[dict[str, Any]]) -> str:
    parts = [f"`{name}` {dec(x, 3)}x `{REFS[ref]}` (limit `{limit:g}x`: {'met' if x <= limit else 'not met'})"
             for name, ref, limit, _, x, _, _ in limits(doc)]
    return "; ".join(parts)


def _collectives(doc: dict[str, Any]) -> str:
    synced = [r for r in doc["rows"] if r["collectives_per_step"] > 0]
    none = [r["name"] for r in doc["rows"] if r["collectives_per_step"] == 0]
    added = [r["added_ms"] for r in synced]
    text = (f"at {doc['processes']} processes the synced optimizers ({len(synced)}) add {dec(min(added))} to "
            f"{dec(max(added))} ms a step" if synced else "no optimizer syncs")
    return text + (f"; {len(none)} need no collective under DDP" if none else "")


def _audit(doc: dict[str, Any]) -> str:
    total = {o: sum(c.get(o, 0) for c in doc["counts"].values()) for o in ("clear", "safe", "unclear", "silent")}
    return (f"{sum(total.values())} bad inputs: {total['clear']} clear errors, {total['safe']} handled safely, "
            f"{total['unclear']} unclear, {total['silent']} silent")


def _mutation(doc: dict[str, Any]) -> str:
    t = doc["summary"]["total"]
    return f"{t['killed']} of {t['mutants']} mutants killed ({100 * t['score']:.1f}%)"


HEADLINES: dict[str, Callable[[Any], str]] = {
    "bench-quick": _bench, "bench-full": _bench, "polyak": _polyak, "large-lr": _large_lr, "learned": _learned, "learned-native": _native,
    "controller": _controller, "controller-variants": _variants, "hpo": _hpo, "games": _games, "overhead": _overhead,
    "audit": _audit, "mutation": _mutation, "refit": _refit, "collectives": _collectives, "stopping": _stopping,
}


def latest(root: Path) -> str:
    rows = []
    have = set(stored(root))
    for key, rec in RECORDS.items():
        link = f"[{rec.about}](docs/{PAGES[key]})"
        if key not in have:
            rows.append((link, "not measured in this version", f"`nestopt report --run {key}`", "-"))
            continue
        doc, prov = load(root, key)
        when = f"{prov['started'][:10]}, {prov['wall_s'] / 60:.1f} min, code `{prov['code_hash'][:8]}`"
        how = f"`{rec.command('DIR')}`" + (" without the pinned numerics" if rec.native else "")
        rows.append((link, HEADLINES[key](doc), how, when))
    return table(("what", "latest result", "command", "measured"), rows) + "\n"


RENDERERS = {"summary.latest": latest}
