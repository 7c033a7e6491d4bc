"""Section 6: resident memory over many hyperparameter steps."""

from __future__ import annotations

import gc

from ...hyper import Bilevel
from .measure import rss_mb
from .solver_cost import _decay_problem


def leak_check(hyper_steps: int = 1000) -> dict[str, float]:
    p = _decay_problem((64, 32, 10), 200)
    b = Bilevel(p["inner"], p["outer"], p["params"], p["lam"], inner_steps=1,
                solver_kwargs={"iters": 5, "damping": 1e-3, "max_residual": 10.0}, on_error="skip")
    b.run(50)
    b.history.clear()
    gc.collect()
    before = rss_mb()
    for _ in range(hyper_steps):
        b.step()
        b.history.clear()
    gc.collect()
    return {"hyper_steps": hyper_steps, "rss_before_mb": before, "rss_after_mb": rss_mb(),
            "growth_mb": rss_mb() - before}
