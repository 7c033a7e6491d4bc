"""``nestopt bench``: time-to-target benchmark of the registered optimizers on the task suite.

    >>> from nestopt.bench import run_bench
    >>> doc = run_bench(tasks=["quad-asym"], optimizers=["sgd"], seeds=1, steps=50,
    ...                 out="bench-out", workers=1)          # doctest: +SKIP

Writes ``results.json`` (schema in :mod:`nestopt.bench.schema`), ``report.md`` and PNG figures
into ``out``; returns the results document. The files reach ``out`` together when the run
completes, and replace every file of the result that was there (no figure of an older run stays).
An interrupted run writes its files to ``out/partial/`` instead and leaves ``out``'s own result as
it was (see :mod:`nestopt._io`).
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
from .._io import Staged
from . import figstyle
from .report import entry_styles, write_figures, write_json, write_report
from .runner import Job, _check_not_a_worker_importing_main, default_workers, run_job, run_jobs
from .schema import SCHEMA_VERSION, validate
from .scoring import planned_entries, summarize
from .suites import SUITES, plan, suite


def run_bench(*, tasks: Sequence[str], optimizers: Sequence[str], seeds: int, out: str | Path,
              steps: int | None = None, workers: int | None = None, suite_name: str = "custom", grid_stride: int = 1,
              command: str | None = None, on_start: Callable[[int], None] | None = None,
              on_done: Callable[[dict[str, Any]], None] | None = None,
              highlight: str | Sequence[str] | None = None, top_k: int = 5) -> dict[str, Any]:
    """Plan, run, score and write a benchmark; ``highlight`` and ``top_k`` are the figures'
    (:func:`~nestopt.bench.report.write_figures`). Returns the results document (``complete`` is
    False if it was interrupted: what finished is still scored and written, to ``out/partial/``).
    Call it under ``if __name__ == "__main__":`` in a script when ``workers`` > 1 (a worker that
    runs the call again stops with a line that says so)."""
    _check_not_a_worker_importing_main()
    out = Path(out)
    jobs = plan(tasks, optimizers, seeds, steps, grid_stride)
    figstyle.resolve_highlight(highlight, planned_entries(optimizers))  # a bad name fails before any run
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
    if interrupted and not records:
        return doc  # nothing finished: nothing to write, and the folder stays as it was
    stage = Staged(out, replaces=RESULT_FILES)
    try:
        write_json(doc, stage.dir / "results.json")
        shown = figstyle.resolve_highlight(highlight, planned_entries(optimizers)) & set(entry_styles(doc))
        # (an interrupted run may lack a highlighted entry: the figures then highlight what it has)
        figures = write_figures(doc, stage.dir, sorted(shown) if highlight else None, top_k=top_k) if records else []
        write_report(doc, stage.dir, figures)
    except BaseException:  # interrupted (again) while writing: keep what was written, beside the result
        stage.to_partial({"runs": len(records), "of": len(jobs)})
        raise
    if interrupted:
        stage.to_partial({"runs": len(records), "of": len(jobs)})
    else:
        stage.commit()
    return doc


RESULT_FILES = ("results.json", "report.md", "*.png")  # what a bench writes into its folder


__all__ = ["RESULT_FILES", "Job", "SUITES", "plan", "run_bench", "run_job", "run_jobs", "suite", "summarize", "validate"]
