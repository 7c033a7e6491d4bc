"""The controller studies end to end: ``nestopt study controller`` (:func:`run_study`) and
``nestopt study controller-variants`` (:func:`run_variants`): plan, run, analyse, write."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from ..._io import atomic_write_text, save_part
from ...bench.runner import run_jobs
from ...bench.scoring import attach_targets, choose_rates, targets
from .._common import finite
from .figures import _figures
from .plan import (ABLATION, HEAD_CONFIGS, TASKS, VARIANTS, _around, _name, _variant_name, check_variants, plan_main,
                   plan_tuning, plan_variants)
from .report import study_report, variants_report
from .run import _train_heads_job, one_thread, one_thread_worker, train_heads, trace_multipliers
from .stats import ablations, costs, heads_summary, heads_verdict, peers, robust_difference, robust_verdict, robustness


def _tune(seeds: int, tasks: tuple[str, ...], workers: int | None) -> tuple[list[dict[str, Any]], dict[Any, Any],
                                                                         dict[str, float], set[tuple[str, str, float, int]]]:
    """Phase 1 (AdamW over its grid): the records, the chosen rates, each task's ``lr*`` and the
    keys already run."""
    records, interrupted = run_jobs(plan_tuning(seeds, tasks), workers=workers)
    save_part("tuning-unfinished" if interrupted else "tuning", records)
    if interrupted:
        raise KeyboardInterrupt
    chosen = choose_rates(records)
    best_lr = {t: chosen[(t, "adamw")]["lr"] for t in tasks}
    return records, chosen, best_lr, {(r["task"], r["optimizer"], r["lr"], r["seed"]) for r in records}


def run_study(out: str | Path, seeds: int = 3, ablation_seeds: int = 2, head_seeds: int = 3,
              tasks: tuple[str, ...] = TASKS, workers: int | None = None, head_steps: int | None = None) -> dict[str, Any]:
    """Run every part; write ``report.md``, ``results.json`` and figures to ``out``."""
    import multiprocessing as mp

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, chosen, best_lr, done = _tune(seeds, tasks, workers)
    more, interrupted = run_jobs(plan_main(best_lr, seeds, ablation_seeds, tasks, done), workers=workers)
    save_part("main-unfinished" if interrupted else "main", more)
    if interrupted:
        raise KeyboardInterrupt
    records += more
    t_bench = time.perf_counter() - t0
    tgt = targets(chosen)
    attach_targets(records, tgt)
    head_lr = best_lr.get("trading-multihorizon", 1e-3)
    head_jobs = [(c, s) for c in HEAD_CONFIGS for s in range(head_seeds)]
    # The head runs use one torch thread: in worker processes set up so, or here for the block (the
    # traces after them included, as they always ran in this case).
    with one_thread() if workers == 1 else nullcontext():
        if workers == 1:
            head_runs = [train_heads(c, s, lr=head_lr, steps=head_steps) for c, s in head_jobs]
        else:
            with mp.get_context("spawn").Pool(workers, initializer=one_thread_worker) as pool:
                head_runs = pool.starmap(partial(_train_heads_job, lr=head_lr, steps=head_steps), head_jobs)
        save_part("heads", [{k: v for k, v in r.items() if k != "trace"} for r in head_runs])
        traces = [trace_multipliers("digits-mlp", lr) for lr in _around(best_lr["digits-mlp"], ABLATION)] \
            if "digits-mlp" in tasks else []
    rob = robustness(records, tasks, best_lr)
    diff = robust_difference(records, tasks, best_lr, _name("hindsight"), "adamw")
    abl = ablations(records, ablation_seeds, best_lr)
    cost = costs(records, tasks, best_lr)
    peer = peers(records, chosen, tasks, best_lr)
    heads = heads_summary(head_runs)
    figures = _figures(rob, abl, heads, head_runs, traces, tasks, out)
    wall = time.perf_counter() - t0
    doc = {"study": "controller", "wall_s": wall, "bench_s": t_bench, "runs": len(records), "targets": tgt,
           "best_lr": best_lr, "head_lr": head_lr, "robustness": rob, "robust_difference": diff,
           "robust_verdict": robust_verdict(diff), "ablations": abl,
           "costs": cost,
           "peers": peer, "heads": heads, "heads_verdict": heads_verdict(heads),
           "head_runs": [{k: v for k, v in r.items() if k != "trace"} for r in head_runs],
           "traces": traces, "figures": figures,
           "seeds": seeds, "ablation_seeds": ablation_seeds, "head_seeds": head_seeds, "tasks": list(tasks),
           "records": [{k: v for k, v in r.items() if k != "curve"} for r in records]}
    atomic_write_text(out / "results.json", json.dumps(finite(doc), indent=1))
    atomic_write_text(out / "report.md", study_report(doc))
    return doc


def run_variants(out: str | Path, variants: tuple[str, ...] = tuple(VARIANTS), seeds: int = 3,
                 tasks: tuple[str, ...] = TASKS, workers: int | None = None) -> dict[str, Any]:
    """``nestopt study controller-variants``: part 1 of the study (robustness to the base rate) for
    each of :data:`VARIANTS`, against AdamW; writes ``variants.md`` and ``variants.json``."""
    check_variants(variants, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, chosen, best_lr, done = _tune(seeds, tasks, workers)
    methods = {"adamw": "adamw", **{v: _variant_name(v) for v in variants}}
    more, interrupted = run_jobs(plan_variants(best_lr, methods, seeds, tasks, done), workers=workers)
    save_part("variants-unfinished" if interrupted else "variants", more)
    if interrupted:
        raise KeyboardInterrupt
    records += more
    attach_targets(records, targets(chosen))
    rob = robustness(records, tasks, best_lr, methods)
    diffs = {v: robust_difference(records, tasks, best_lr, methods[v], "adamw") for v in variants}
    wall = time.perf_counter() - t0
    doc = {"study": "controller-variants", "wall_s": wall, "runs": len(records), "best_lr": best_lr, "seeds": seeds,
           "variants": {v: VARIANTS[v] for v in variants}, "robustness": rob, "robust_difference": diffs,
           "robust_verdicts": {v: robust_verdict(d) for v, d in diffs.items()}, "tasks": list(tasks)}
    atomic_write_text(out / "variants.json", json.dumps(finite(doc), indent=1, default=list))
    atomic_write_text(out / "variants.md", variants_report(doc))
    return doc
