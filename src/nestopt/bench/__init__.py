"""``nestopt bench``: time-to-target benchmark of the registered optimizers on the task suite.

    >>> from nestopt.bench import run_bench
    >>> doc = run_bench(tasks=["quad-asym"], optimizers=["sgd"], seeds=1, steps=50,
    ...                 out="bench-out", workers=1)          # doctest: +SKIP

Writes ``results.json`` (schema in :mod:`nestopt.bench.schema`), ``report.md`` and PNG figures
into ``out``; returns the results document.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .report import write_figures, write_json, write_report
from .runner import Job, default_workers, run_job, run_jobs
from .schema import SCHEMA_VERSION, validate
from .scoring import summarize
from .suites import SUITES, plan, suite


def run_bench(*, tasks: Sequence[str], optimizers: Sequence[str], seeds: int, out: str | Path,
              steps: int | None = None, workers: int | None = None, suite_name: str = "custom", grid_stride: int = 1,
              command: str | None = None, on_start: Callable[[int], None] | None = None,
              on_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Plan, run, score and write a benchmark. Returns the results document (``complete`` is
    False if it was interrupted; what finished is still scored and written)."""
    out = Path(out)
    jobs = plan(tasks, optimizers, seeds, steps, grid_stride)
    workers = default_workers() if workers is None else workers
    if on_start:
        on_start(len(jobs))
    records, interrupted = run_jobs(jobs, workers=min(workers, len(jobs)), on_done=on_done)
    key = {j.key: i for i, j in enumerate(jobs)}
    records.sort(key=lambda r: key[(r["task"], r["optimizer"], r["lr"], r["seed"])])
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": not interrupted,
        "environment": {"nestopt": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(terse=True), "cores": os.cpu_count(), "workers": workers},
        "config": {"suite": suite_name, "tasks": list(tasks), "optimizers": list(dict.fromkeys(["adamw", *optimizers])),
                   "seeds": seeds, "steps": steps, "grid_stride": grid_stride, "command": command or " ".join(["nestopt", *sys.argv[1:]])},
        "runs": records,
        "summary": summarize(records),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(doc, out / "results.json")
    figures = write_figures(doc, out) if records else []
    write_report(doc, out, figures)
    return doc


__all__ = ["Job", "SUITES", "plan", "run_bench", "run_job", "run_jobs", "suite", "summarize", "validate"]
