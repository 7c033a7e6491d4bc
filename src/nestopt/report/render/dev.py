"""Blocks of the development page: the bad-input audit and mutation testing."""

from __future__ import annotations

from typing import Any

from .fmt import table

OUTCOMES = ("clear", "safe", "unclear", "silent")


def audit(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    rows, total = [], dict.fromkeys(OUTCOMES, 0)
    for kind, c in doc["counts"].items():
        n = sum(c.values())
        rows.append((f"{kind} ({n})", *(c.get(o, 0) for o in OUTCOMES)))
        for o in OUTCOMES:
            total[o] += c.get(o, 0)
    n = sum(total.values())
    rows.append((f"**total ({n})**", *(f"**{total[o]}**" for o in OUTCOMES)))
    bad = total["unclear"] + total["silent"]
    text = (f"{n} enumerated bad inputs, each outcome classified; " +
            ("every one gets a clear error or is handled safely." if bad == 0 else
             f"**{bad} are unclear or silent**: see `cases` in the result for which."))
    return text + "\n\n" + table(("kind (cases)", *OUTCOMES), rows)


def mutation(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    t = doc["summary"]["total"]
    rows = [(f"`{f.removeprefix('src/nestopt/')}`", s["mutants"], s["killed"], s["survived"], f"{100 * s['score']:.0f}%")
            for f, s in doc["summary"]["files"].items()]
    text = (f"{doc['sites_total']:,} mutation sites, {t['mutants']} drawn (seed {doc['seed']}): **{t['killed']} killed, "
            f"{t['survived']} survived: {100 * t['score']:.1f}%**. The survivors are listed in the result "
            f"(`survivors`); each is a change no test notices.")
    surv = [f"`{s['file'].removeprefix('src/nestopt/')}:{s['line']}` `{s['before']}` -> `{s['after']}`" for s in doc["survivors"]]
    return "\n\n".join([text, table(("file", "mutants", "killed", "survived", "score"), rows),
                        "Survivors: " + "; ".join(surv) + "." if surv else "No survivors."])


RENDERERS = {"audit.table": ("audit", audit), "mutation.summary": ("mutation", mutation)}
