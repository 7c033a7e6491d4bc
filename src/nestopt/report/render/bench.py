"""Blocks of the benchmark (quick and full suites) and of the step-cost meter."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .fmt import dec, minutes, num, of, plural, table


def _peers(names: list[str]) -> list[str]:
    """The entries that come from an optional package (the registry's peers)."""
    from ...bench import registry

    out = []
    for n in names:
        try:
            if registry.get(n).origin == "peer":
                out.append(n)
        except KeyError:
            pass
    return out


def setup(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    runs = Counter(r["optimizer"] for r in doc["runs"])
    peers = _peers(list(runs))
    n_peer = sum(runs[p] for p in peers)
    cfg = doc["config"]
    where = (f"{minutes(prov['wall_s'])} on {prov['environment']['cores']} cores"
             + (" with the numerics pinned (your own run's scores and time will differ)" if prov["environment"].get("pinned")
                else ""))
    if peers:
        return (f"The quick suite ({len(cfg['tasks'])} tasks, {plural(cfg['seeds'], 'seed')}, each optimizer over its "
                f"learning-rate grid) makes {len(doc['runs']) - n_peer} runs after the first command alone, and "
                f"{len(doc['runs'])} once the second has installed the optional peers "
                f"({', '.join(f'`{p}`' for p in peers)}). The published run is the latter: {where}.")
    return (f"The quick suite ({len(cfg['tasks'])} tasks, {plural(cfg['seeds'], 'seed')}, each optimizer over its "
            f"learning-rate grid) makes {len(doc['runs'])} runs: {where}.")


def _entries(doc: dict[str, Any]) -> list[tuple[str, float, float, int, int, int]]:
    s = doc["summary"]
    tasks = doc["config"]["tasks"]
    out = []
    for e, by_task in s["table"].items():
        reached = sum(by_task.get(t, {}).get("steps_to_target_median") is not None for t in tasks)
        div = sum(by_task.get(t, {}).get("diverged", 0) for t in tasks)
        out.append((e, s["scores"]["time"].get(e, 0.0), s["scores"]["steps"].get(e, 0.0), reached, len(tasks), div))
    out.sort(key=lambda r: -r[1])
    return out


def _family(entry: str) -> str:
    from ...bench.figstyle import registry_family

    return registry_family(entry)


def _score_table(doc: dict[str, Any]) -> str:
    rows = [(f"`{e}`", _family(e), dec(t, 3), dec(st, 3), f"{r}/{n}", d) for e, t, st, r, n, d in _entries(doc)]
    return table(("entry", "family", "score (time)", "score (steps)", "tasks reached",
                  "diverged runs (at the chosen rate)"), rows)


def _reading(doc: dict[str, Any]) -> str:
    ents = _entries(doc)
    s = doc["summary"]
    ref = next((e for e in ents if e[0] == "adamw-tuned"), None)
    lines = []
    if ref is not None:
        above = [f"`{e[0]}`" for e in ents if e[1] > ref[1] and e[0] != "adamw-tuned"]
        lines.append(f"Tuned AdamW scores {dec(ref[1], 3)} by time and reaches its own target on {ref[3]}/{ref[4]} tasks; "
                     + (f"{plural(len(above), 'entry scores', 'entries score')} higher by time: {', '.join(above)}."
                        if above else "no entry scores higher by time."))
    div = [(e[0], e[5]) for e in ents if e[5]]
    lines.append("Diverged runs at each entry's chosen rate: " + (", ".join(f"`{e}` {d}" for e, d in div) if div else "none")
                 + f" (over all {len(doc['runs'])} runs, every rate of every grid: {sum(r['diverged'] for r in doc['runs'])}).")
    edges = sorted("`{1}` on `{0}`".format(*k.split("|")) for k, v in s["chosen_lr"].items() if v.get("at_grid_edge"))
    if edges:
        lines.append(f"The chosen rate sits at the edge of its grid for {plural(len(edges), 'pair')} (task and entry): "
                     + ", ".join(edges) + ".")
    return " ".join(lines)


def scores(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    cfg = doc["config"]
    head = (f"The {cfg['suite']} suite: {len(doc['runs'])} runs ({len(cfg['tasks'])} tasks, "
            f"{plural(cfg['seeds'], 'seed')}). Score = mean of the time-to-target performance profile over "
            f"`tau` in `[1, 16]`; *tasks reached* counts tasks where the median seed reaches tuned AdamW's target.")
    return "\n\n".join([head, _score_table(doc), _reading(doc)])


def full(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    return scores(doc, prov) + "\n\n![performance profile](results/bench-full/profile.png)"


def _ours(entry: str) -> bool:
    from ...bench import registry
    from ...bench.figstyle import optimizer_of

    try:
        return registry.get(optimizer_of(entry)).origin == "nestopt"
    except KeyError:
        return False


def peers(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    """Where the peers rank against our methods: overall, and per task as AdamW's time to its
    target over each entry's (above 1: faster than tuned AdamW)."""
    ents = _entries(doc)
    rank = {e[0]: i + 1 for i, e in enumerate(ents)}
    score = {e[0]: e[1] for e in ents}
    peer_entries = [e[0] for e in ents if _family(e[0]) == "peer"]
    ours = [e[0] for e in ents if _ours(e[0])]
    if not peer_entries or not ours:
        return "This result has no peer or none of our methods to rank.\n"
    best = ours[0]
    lines = [f"Of {len(ents)} entries, our best by time is `{best}` (rank {rank[best]}, score {dec(score[best], 3)}). "
             "The peers: " + ", ".join(f"`{p}` rank {rank[p]} ({dec(score[p], 3)})" for p in peer_entries) + "."]
    table_ = doc["summary"]["table"]
    tasks = doc["config"]["tasks"]
    cols = ["adamw-tuned", *peer_entries, best]
    rows = []
    for t in tasks:
        ref = table_.get("adamw-tuned", {}).get(t, {}).get("time_to_target_median")
        cells = []
        for e in cols[1:]:
            v = table_.get(e, {}).get(t, {}).get("time_to_target_median")
            ran = t in table_.get(e, {})
            cells.append("-" if not ran else "not reached" if v is None else
                         ("-" if not ref or not v else f"{num(ref / v, 2)}x"))
        rows.append((f"`{t}`", "-" if ref is None else f"{num(ref, 2)} s", *cells))
    head = ("Per task: tuned AdamW's median time to its own target, and each entry's speed against it (AdamW's time "
            "over the entry's; above 1 is faster; *not reached*: the median seed misses the target).")
    return "\n\n".join([lines[0], head, table(("task", "tuned AdamW", *(f"`{c}`" for c in cols[1:])), rows)])


def _ms(rows: dict[str, dict[str, Any]], name: str) -> float:
    r = rows.get(name)
    return math.nan if r is None or r["ms_per_step"] is None else r["ms_per_step"]


REFS = {"x AdamW(fused)": "torch AdamW(fused=True)", "x SGD(foreach)": "torch SGD(foreach=True)",
        "x SGD(mom)": "torch SGD(momentum=0.9, foreach=True)"}


def overhead(doc: list[dict[str, Any]], prov: dict[str, Any]) -> str:
    rows = {r["name"]: r for r in doc}
    refs = {col: _ms(rows, name) for col, name in REFS.items()}
    out = []
    for r in doc:
        if r["ms_per_step"] is None:
            out.append((f"`{r['name']}`", "not measured", "", "", "", "", ""))
            continue
        out.append((f"`{r['name']}`", dec(r["ms_per_step"]), *(dec(r["ms_per_step"] / v) for v in refs.values()),
                    dec(r["state_floats_per_param"]), "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"))
    head = ("One step of each optimizer on the synthetic model of `nestopt overhead`, as ratios to torch's optimizers "
            "measured in the same process. The two `norm pass + ...` rows are the floors of the optimizers that read "
            "the gradients' norms before they step.")
    verdicts = []
    for name, ref, limit, issue, x, floor, fx in limits(doc):
        f = "" if fx is None else f", its floor `{floor}` {dec(fx)}x"
        verdicts.append(f"`{name}` {dec(x, 3)}x `{REFS[ref]}` against issue {issue}'s `{limit:g}x`: "
                        f"**{'met' if x <= limit else 'not met'}**{f}")
    tail = ("In this run: " + "; ".join(verdicts) + ".") if verdicts else ""
    return "\n\n".join([head, table(("optimizer", "ms/step", *REFS, "state floats/param", "peak MB"), out), tail])


# (optimizer, reference column, limit, issue, floor row): the step-cost limits the issues set
LIMITS = (("polyak", "x SGD(foreach)", 1.5, 3, "norm pass + SGD(foreach=True)"),
          ("nested-adamw (frozen)", "x AdamW(fused)", 1.3, 5, "norm pass + AdamW(fused=True)"),
          ("learned", "x AdamW(fused)", 3.0, 6, None),
          ("complex-momentum", "x SGD(mom)", 1.5, 8, None))


def limits(doc: list[dict[str, Any]]) -> list[tuple[str, str, float, int, float, str | None, float | None]]:
    """``(optimizer, column, limit, issue, ratio, floor row, floor ratio)`` for each limit measured."""
    out = []
    for name, ref, limit, issue, floor in LIMITS:
        try:
            x = step_ratio(doc, name, ref)
        except KeyError:
            continue
        if math.isnan(x):
            continue
        fx = None
        if floor is not None:
            try:
                fx = step_ratio(doc, floor, ref)
            except KeyError:
                pass
        out.append((name, ref, limit, issue, x, floor, None if fx is None or math.isnan(fx) else fx))
    return out


def step_ratio(doc: list[dict[str, Any]], name: str, ref: str) -> float:
    """``name``'s step time over the reference of column ``ref``; ``KeyError`` when not measured."""
    rows = {r["name"]: r for r in doc}
    if name not in rows:
        raise KeyError(name)
    return _ms(rows, name) / _ms(rows, REFS[ref])


def collectives(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    head = (f"Each nestopt optimizer's step over {doc['processes']} processes (gloo on 127.0.0.1, "
            f"{doc['threads_per_process']} thread(s) each) holding the same {doc['n_params'] / 1e6:g}M-parameter model, "
            "synced (`process_group=\"auto\"`) and per-rank (no collective), interleaved round by round; "
            "`added` is the difference, the collective's cost with the ranks' wait for each other.")
    rows = [(f"`{r['name']}`", dec(r["per_rank_ms"]), dec(r["synced_ms"]), dec(r["added_ms"]),
             dec(r["collectives_per_step"])) for r in doc["rows"]]
    tail = f"A bare `all_gather` of the same small vector took {dec(doc['bare_all_gather_ms'])} ms."
    return "\n\n".join([head, table(("optimizer", "per-rank ms/step", "synced ms/step", "added ms", "collectives/step"),
                                     rows), tail])


RENDERERS = {
    "collectives.table": ("collectives", collectives),
    "bench-quick.setup": ("bench-quick", setup),
    "bench-quick.scores": ("bench-quick", scores),
    "bench-full.table": ("bench-full", full),
    "bench-full.peers": ("bench-full", peers),
    "bench-full.scores": ("bench-full", scores),
    "overhead.table": ("overhead", overhead),
}
