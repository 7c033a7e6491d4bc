"""Blocks of the hypergradient study: an acceptance summary, then the study's own report."""

from __future__ import annotations

from typing import Any

from .fmt import dec, table
from .sections import demote, figures, sections


ASKED_DECAY = 1e-3  # the exactness the issue asked for is at this decay


def _summary(doc: dict[str, Any]) -> str:
    rows = []
    for ex in doc["exactness"].values():
        cg20 = [r for r in ex["rows"] if r["solver"] == "cg" and r["iters"] == 20]
        if cg20:
            c = cg20[0]["cosine"]
            asked = ex["decay"] >= ASKED_DECAY  # the case; a weaker decay is harder than asked
            rows.append((f"exactness, cond(X) {ex['feature_cond']:.0f}, decay {ex['decay']:g} "
                         f"(Hessian cond {ex['hessian_cond']:.0f})", f"CG `20`: cosine {c:.6f} to the dense solve",
                         ("CG `20` >= `0.999`: " + ("met" if c >= 0.999 else "not met")) if asked else
                         "harder than asked: shown as the limit"))
    for label, c in doc["cost"].items():
        if label == "torchopt" or not c.get("rows"):
            continue
        by_solver: dict[str, list[str]] = {}
        worst = 0.0
        for r in c["rows"]:
            if "ratio" in r:
                by_solver.setdefault(r["solver"], []).append(f"{dec(r['ratio'], 3)}")
                worst = max(worst, r["ratio"])
        iters = "/".join(str(r["iters"]) for r in c["rows"] if r["solver"] == c["rows"][0]["solver"])
        if by_solver:
            text = "; ".join(f"{s} {iters}: {'/'.join(v)}x" for s, v in by_solver.items())
            rows.append((f"cost against TorchOpt, {label}", text + " TorchOpt's time",
                         "<= `0.8x`: " + ("met" if worst <= 0.8 else "not met")))
    h = doc["hpo"]["rows"]
    imp = [r["implicit"]["test_acc"] for r in h]
    tpe = [r["tpe"]["test_acc"] for r in h]
    wins = sum(a > b for a, b in zip(imp, tpe))
    rows.append(("one decay per weight (implicit) against Optuna TPE", f"test accuracy higher on {wins} of {len(h)} seeds",
                 "met" if wins * 2 > len(h) else "not met"))
    lk = doc["leak"]
    rows.append((f"resident memory over {lk['hyper_steps']} hyperparameter steps", f"{lk['growth_mb']:+.1f} MB",
                 "< `10` MB: " + ("met" if lk["growth_mb"] < 10 else "not met")))
    return table(("what", "measured", "acceptance"), rows)


def full(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    from ...studies.hpo.writeup import report

    parts = sections(report(doc))
    body = "\n\n".join(f"## {t}\n\n{b}" for t, b in parts.items() if t and not t.startswith("Study"))
    return _summary(doc) + "\n\n" + demote(figures(body, "hpo"), 1)


RENDERERS = {"hpo.table": ("hpo", full)}
