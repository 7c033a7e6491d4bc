"""Blocks of the deep-optimal-stopping study: the price table and the note's five claims."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .fmt import plural, table


def prices(doc: dict[str, Any]) -> str:
    p = doc["plan"]
    rows = [(r["d"], r["s0"], f"{r['price']:.3f} ± {r['se']:.3f}",
             "-" if r["paper_l"] is None else f"{r['paper_l']:.3f}",
             f"{r['reference']:.3f}, {r['reference_kind']}", f"{100 * r['rel_err']:+.2f}%",
             "yes" if r["within_1pct"] else "**no**") for r in doc["prices"]]
    n_ok = sum(r["within_1pct"] for r in doc["prices"])
    text = (f"The Bermudan max-call of Becker et al. 2019 trained backwards in time on {p['price_train_paths']:,} paths "
            f"(seed {p['price_seed']}, {p['price_steps']} Adam steps per date), priced on {p['price_paths']:,} fresh "
            f"paths (seed {p['price_eval_seed']}, never trained on): {n_ok} of {len(doc['prices'])} prices within 1% "
            "of the reference.")
    return text + "\n\n" + table(("d", "S0", "ours (lower bound ± se)", "paper's L", "reference", "ours vs reference",
                                  "within 1%"), rows)


def claims(doc: dict[str, Any]) -> str:
    p = doc["plan"]
    c = Counter(v["verdict"] for v in doc["verdicts"])
    grid = ", ".join(f"{x:g}" for x in p["grid"])
    text = (f"The trade-exit task ({p['exit_train_entries']:,} training entries, {p['exit_val_entries']:,} held-out, "
            f"data seed {p['exit_data_seed']}), SGD with momentum over the note's grid ({grid}), "
            f"{plural(p['seeds'], 'seed')} (0 to {p['seeds'] - 1}), {p['steps']} steps; JAL on the multi-horizon "
            f"trading task, {plural(p['jal_seeds'], 'seed')}, {p['jal_steps']} AdamW steps. Of the note's "
            f"{len(doc['verdicts'])} claims: {c['holds']} hold, {c['mixed']} mixed, {c['does not hold']} do not hold.")
    rows = [(v["claim"], f"**{v['verdict']}**" if v["verdict"] == "holds" else v["verdict"], v["evidence"])
            for v in doc["verdicts"]]
    return (text + "\n\n" + table(("claim", "verdict", "measured"), rows) +
            "\n\n![price against the reference](results/stopping/prices.png)"
            "\n![value against learning rate](results/stopping/value_vs_lr.png)"
            "\n![AUC against the noise rate](results/stopping/auc_vs_noise.png)")


def headline(doc: dict[str, Any]) -> str:
    n_ok = sum(r["within_1pct"] for r in doc["prices"])
    worst = max(abs(r["rel_err"]) for r in doc["prices"])
    holds = sum(v["verdict"] == "holds" for v in doc["verdicts"])
    return (f"{n_ok} of {len(doc['prices'])} max-call prices within 1% of the paper's reference (worst "
            f"{100 * worst:.2f}%); {holds} of the note's {len(doc['verdicts'])} claims hold")


RENDERERS = {
    "stopping.prices": ("stopping", lambda d, p: prices(d)),
    "stopping.claims": ("stopping", lambda d, p: claims(d)),
}
