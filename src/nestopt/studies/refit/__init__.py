"""``nestopt study refit --out DIR``: daily refits, end to end, and "how much faster than Adam on the
same task distribution?".

Protocol (every number from the past days or measured on the evaluation days, never both):

1. **Tuning, past days only.** On the last ``tune_days`` days of the meta-training range, AdamW
   (cold start), Muon and the warm start each get the rate of ``LRS`` with the lowest mean final
   validation loss; shrink-and-perturb gets its shrink factor of ``SHRINKS`` at the warm start's rate.
2. **Meta-training, past days only** (:mod:`.meta`): the hybrid update network by truncated
   backpropagation on ``FAMILY@0:60``, and one nested controller per feature set by ES.
3. **Evaluation** on each evaluation day and seed: every strategy of :mod:`.strategies`, the same
   step budget each; the per-day AdamW oracle is the best of the same rate grid on that day.
4. **Analysis** (:mod:`.analysis`): steps and seconds to each day's target (tuned-once AdamW's final
   validation loss, worst seed), speedups with a bootstrap interval over days, loss, AUC, PnL,
   break-even, the verdict on the chapter's 50-200% claim, and the distance to the goal. The
   evidence for why a candidate is not faster: its speedup in steps beside its speedup in seconds
   (the cost of its step), and its speedup on the past days it was meta-trained on beside the
   evaluation days' (meta-overfitting).

The study runs on any :class:`~nestopt.tasks.TaskFamily` whose ``sample(day)`` gives a day's
refit (``--family mypkg.tasks:MyFamily``); the trading signals need the task's ``monitor_stats``
(without it, the nested optimizer reads the general features only and there is nothing to ablate).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ... import tasks as task_registry
from ..._io import atomic_write_text, save_part
from .._common import finite
from . import analysis, meta
from .features import TRADING_FEATURES
from .strategies import ablations, final_value, nested_features, run_job

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SHRINKS = (0.3, 0.6, 0.9)


@dataclass(frozen=True)
class Plan:
    """What one study run does (``quick``: a smoke test of every part, minutes smaller)."""

    family: str = "trading-daily"
    train_days: tuple[int, int] = (0, 60)
    eval_days: tuple[int, int] = (60, 90)
    seeds: int = 3
    steps: int | None = None  # the task's default_steps
    tune_days: int = 8
    tune_seeds: int = 2
    learned_steps: int = 300
    learned_horizon: int = 150
    controller_steps: int = 30
    controller_pairs: int = 4
    unroll: int = 20

    @classmethod
    def quick(cls, **kw: Any) -> Plan:
        base = {"eval_days": (60, 62), "seeds": 1, "steps": 30, "tune_days": 1, "tune_seeds": 1, "learned_steps": 2,
                "learned_horizon": 20, "controller_steps": 1, "controller_pairs": 1, "unroll": 10}
        return cls(**{**base, **kw})


def _pool_map(pool: Any, jobs: list[dict[str, Any]]) -> list[Any]:
    if pool is None:
        return [_job(j) for j in jobs]
    return list(pool.imap(_job, jobs, chunksize=1))


def _job(job: dict[str, Any]) -> Any:
    """A pool job: refits (:func:`.strategies.run_job`) or a meta-training (``job["meta"]``)."""
    from ..._threads import one_thread

    with one_thread():
        if job.get("meta") == "learned":
            return meta.learned(**job["args"])
        if job.get("meta") == "controller":
            return meta.controller(**job["args"])
        return run_job(job)


def _worker_init() -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C (and stops the pool)
    torch.set_num_threads(1)


def _best(records: list[dict[str, Any]], key: str) -> Any:
    """The setting (``key`` of the job) with the lowest mean final validation loss."""
    by: dict[Any, list[float]] = {}
    for r in records:
        by.setdefault(r[key], []).append(final_value(r))
    return min(by, key=lambda k: statistics.fmean(by[k]))


def _trading(family: Any, day: int) -> tuple[str, ...]:
    return tuple(TRADING_FEATURES) if hasattr(family.sample(day), "monitor_stats") else ()


def run_study(out: str | Path, plan: Plan = Plan(), cache: str | Path | None = None, workers: int | None = None
              ) -> dict[str, Any]:
    """Run the study of ``plan`` into ``out`` (see the module docstring); ``cache`` keeps the
    meta-trained networks between runs."""
    import multiprocessing as mp
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache) if cache is not None else None
    fam = task_registry.family(plan.family)
    probe = fam.sample(plan.eval_days[0])
    steps = plan.steps or probe.default_steps
    trading = _trading(fam, plan.eval_days[0])
    t0 = time.perf_counter()
    workers = workers or min(2, os.cpu_count() or 1)
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None
    try:
        doc = _run(out, plan, cache_dir, steps, trading, pool)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    doc["wall_s"] = time.perf_counter() - t0
    from .report import figures, report

    doc["figures"] = figures(doc, out)
    atomic_write_text(out / "results.json", json.dumps(finite(doc)))
    atomic_write_text(out / "report.md", report(doc))
    return doc


def _run(out: Path, plan: Plan, cache: Path | None, steps: int, trading: tuple[str, ...], pool: Any) -> dict[str, Any]:
    lo, hi = plan.train_days
    tune = list(range(max(lo + 1, hi - plan.tune_days), hi))
    common = {"family": plan.family, "steps": steps}
    t0 = time.perf_counter()
    # 1. tuning on the past days
    jobs = [{**common, "strategy": s, "seed": seed, "days": tune if s == "warm" else [d], "settings": {"lr": lr},
             "cold_lr": lr, "tune": lr}
            for s in ("warm", "adamw-once", "muon") for lr in LRS for seed in range(plan.tune_seeds)
            for d in (tune[:1] if s == "warm" else tune)]
    tuning = [r | {"tune": j["tune"]} for j, rs in zip(jobs, _pool_map(pool, jobs)) for r in rs]
    rates = {s: _best([r for r in tuning if r["strategy"] == s], "tune") for s in ("adamw-once", "warm", "muon")}
    jobs = [{**common, "strategy": "shrink-perturb", "seed": seed, "days": tune, "cold_lr": rates["adamw-once"],
             "settings": {"lr": rates["warm"], "shrink": lam}, "tune": lam}
            for lam in SHRINKS for seed in range(plan.tune_seeds)]
    # 2. meta-training on the past days (beside the shrink-and-perturb tuning)
    mt = {"out": out / "nets", "cache": cache, "family": plan.family, "days": plan.train_days}
    sets = {"nested": trading, **{a: nested_features(a, trading) for a in ablations(trading)}}
    meta_jobs = [{"meta": "learned", "args": {**mt, "steps": plan.learned_steps, "horizon": plan.learned_horizon,
                                              "unroll": plan.unroll}}]
    meta_jobs += [{"meta": "controller", "args": {**mt, "trading": feats, "lr": rates["adamw-once"],
                                                  "steps": plan.controller_steps, "horizon": steps,
                                                  "unroll": min(plan.unroll, steps), "pairs": plan.controller_pairs}}
                  for feats in sets.values()]
    results = _pool_map(pool, meta_jobs + jobs)
    metas, sp = results[:len(meta_jobs)], results[len(meta_jobs):]
    sp_recs = [r | {"tune": j["tune"]} for j, rs in zip(jobs, sp) for r in rs]
    shrink = _best(sp_recs, "tune")
    tune_s = time.perf_counter() - t0
    save_part("tuning", {"rates": rates, "shrink": shrink, "records": tuning + sp_recs})
    learned_net = metas[0]
    controllers = dict(zip(sets, metas[1:]))
    save_part("meta", {"learned": learned_net, "controllers": controllers})
    # 3. evaluation days
    days = list(range(*plan.eval_days))
    jobs = [{**common, "strategy": s, "seed": seed, "days": days, "cold_lr": rates["adamw-once"],
             "settings": {"lr": rates["warm"], "shrink": shrink if s == "shrink-perturb" else None}}
            for s in ("warm", "shrink-perturb") for seed in range(plan.seeds)]
    single = {"adamw-grid": None, "muon": {"lr": rates["muon"]}, "prodigy": {}, "schedulefree": {},
              "learned-shipped": {"net": "default"}, "learned-meta": {"net": learned_net["path"]}}
    single |= {name: {"lr": rates["adamw-once"], "controller": c["path"], "trading": sets[name]}
               for name, c in controllers.items()}
    for name, settings in single.items():
        for seed in range(plan.seeds):
            for d in days:
                if name == "adamw-grid":
                    jobs += [{**common, "strategy": "adamw-per-day", "seed": seed, "days": [d], "settings": {"lr": lr}}
                             for lr in LRS]
                else:
                    jobs.append({**common, "strategy": name, "seed": seed, "days": [d], "settings": settings})
    # the candidates on the past days too: a speedup there and not here is meta-overfitting
    past_jobs = [{**common, "strategy": name, "seed": seed, "days": [d], "settings": single[name]}
                 for name in ("learned-shipped", "learned-meta", "nested") for seed in range(plan.tune_seeds) for d in tune]
    results = _pool_map(pool, jobs + past_jobs)
    evals = [r for rs in results[:len(jobs)] for r in rs]
    records = _oracle_and_once(evals, rates["adamw-once"])
    save_part("runs", records)
    past = [r for rs in results[len(jobs):] for r in rs]
    past += [r | {"strategy": "adamw-once"} for r in tuning if r["strategy"] == "adamw-once"
             and r["tune"] == rates["adamw-once"]]
    past_rows = analysis.summarise(analysis.per_day(past), {})
    meta_seconds = {"learned-meta": learned_net["seconds"], **{n: c["seconds"] for n, c in controllers.items()}}
    by_day = analysis.per_day(records)
    rows = analysis.summarise(by_day, meta_seconds)
    candidates = [r for r in rows if r["strategy"].startswith(("learned", "nested"))]
    for m in (learned_net, *controllers.values()):
        m["path"] = str(Path(m["path"]).relative_to(out)) if Path(m["path"]).is_relative_to(out) else m["path"]
    doc = {"study": "refit", "plan": asdict(plan), "steps": steps, "trading_features": list(trading),
            "rates": rates, "shrink": shrink, "tune_days": tune, "tune_s": tune_s, "learned": learned_net,
            "controllers": controllers, "rows": rows, "per_day": {s: {str(d): v for d, v in by.items()}
                                                                   for s, by in by_day.items()},
            "past_days": [{k: r[k] for k in ("strategy", "speedup", "speedup_ci90", "step_speedup", "step_speedup_ci90",
                                             "days")}
                          for r in past_rows],
            "claim": [analysis.claim_verdict(r) for r in candidates],
            "goal": [analysis.goal_distance(r) for r in candidates], "records": records}
    doc["why"] = analysis.explain(doc)
    return doc


def _oracle_and_once(records: list[dict[str, Any]], once_lr: float) -> list[dict[str, Any]]:
    """The rate-grid runs become ``adamw-once`` (those at the tuned-once rate) and ``adamw-per-day``
    (each day, the rate whose median seed ends lowest that day: the oracle)."""
    grid = [r for r in records if r["strategy"] == "adamw-per-day"]
    rest = [r for r in records if r["strategy"] != "adamw-per-day"]
    once = [r | {"strategy": "adamw-once"} for r in grid if r["lr"] == once_lr]
    oracle = []
    for d in sorted({r["day"] for r in grid}):
        rs = [r for r in grid if r["day"] == d]
        by = {lr: statistics.median(final_value(r) for r in rs if r["lr"] == lr) for lr in LRS}
        best = min(by, key=lambda k: by[k])
        oracle += [r for r in rs if r["lr"] == best]
    return once + oracle + rest
