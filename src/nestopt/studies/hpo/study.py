"""``nestopt study hpo``: every section in turn, then ``results.json``, ``report.md`` and the figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..._io import atomic_write_text, save_part
from .._common import finite
from .augment import augmentation
from .distillation import distill
from .leak import leak_check
from .measure import measuring_memory
from .plots import figures
from .self_tuning import stn_vs_grid
from .solver_cost import cost
from .solver_exactness import exactness
from .weight_decay import hpo_compare
from .writeup import report


def run_study(out: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run every section and write ``results.json``, ``report.md`` and the figures into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with measuring_memory():  # for the study's run; the allocator's setting before it afterwards
        t0 = time.perf_counter()
        doc: dict[str, Any] = {"quick": quick}
        timings = {}

        def section(name, fn):
            s = time.perf_counter()
            doc[name] = fn()
            timings[name] = time.perf_counter() - s
            save_part(name, doc[name])  # kept (in partial/) if a later section is interrupted

        if quick:
            section("exactness", lambda: exactness((1, 5, 20)))
            section("cost", lambda: cost((("hpo MLP 64-32-10, 200 rows", (64, 32, 10), 200),), (5,), repeats=1))
            section("hpo", lambda: hpo_compare((0,), trials=3, hyper_steps=3, inner_steps=5))
            section("distill", lambda: distill((0,), outer_steps=3, unroll=5, eval_inits=1))
            section("augment", lambda: augmentation((0,), hyper_steps=2, inner_steps=5))
            section("stn", lambda: stn_vs_grid((0,), steps=10))
            section("leak", lambda: leak_check(20))
        else:
            section("exactness", exactness)
            section("cost", cost)
            section("hpo", hpo_compare)
            section("distill", distill)
            section("augment", augmentation)
            section("stn", stn_vs_grid)
            section("leak", leak_check)
        doc["section_seconds"] = timings
        doc["total_seconds"] = time.perf_counter() - t0
        figures(doc, out)
        doc["distill"].pop("images")  # tensors for the figures, not results
        doc["augment"].pop("examples")
        atomic_write_text(out / "results.json", json.dumps(finite(doc), indent=1, default=float))
        atomic_write_text(out / "report.md", report(doc))
    return doc
