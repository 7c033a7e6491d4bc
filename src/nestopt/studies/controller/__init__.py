"""``nestopt study controller --out DIR``: which of the research note's ideas for the nested
optimizer's controller pay off (``000_94d276edca61e15a.txt``)?

Four parts, all on the bench's quick-suite tasks through the bench's own runner (same budgets,
batches, evaluation and timing rules; time is training time, the controller's work included):

1. **Robustness to the base learning rate.** The default ``NestedOptimizer`` (AdamW inside, the
   hindsight signal), AdamW and hypergradient descent (``adamw-hd``) at five base rates spanning
   100x around each task's tuned AdamW rate ``lr*`` (``lr* x`` 0.1, 0.316, 1, 3.16, 10), 3 seeds.
   ``lr*`` and the target come from AdamW over its 9-point grid (1e-4 to 1): the target is the
   final validation loss AdamW reaches at ``lr*`` on its worst seed. For each task and method, a
   rate counts as *robust* when its median time-to-target is within 2x of that method's best rate.
   The difference from AdamW's count carries a 90% interval from a paired bootstrap over seeds.
2. **Ablations of signals and features** at base rates ``lr* x`` 0.1, 1 and 10, 2 seeds: each signal
   against ``frozen`` (the untrained controller, i.e. AdamW with the controller's bookkeeping),
   and each feature removed from (or added to) the default. Verdicts come from paired
   comparisons of the final validation loss (same task, rate and seed).
3. **Per-head feedback on the multi-horizon task**: trunk and each of the 7 horizon heads as its
   own param group, ``step(head_stats=...)`` fed with each head's training loss and latest
   validation AUC. Does it lift the long horizons that sit at chance AUC?
4. **Cost**: the hindsight signal's amortised step time as a multiple of AdamW's and of the frozen
   controller's on the same task; parameter-free peers (Prodigy, schedule-free AdamW) at their
   defaults for reference.
"""

# The package, one idea a module: ``plan`` (configurations, variants and their registration with
# the bench, base rates, jobs), ``run`` (the study's own training runs), ``stats`` (robustness,
# bootstrap, paired ablations, costs, peers, per-head summary and verdicts), ``figures``,
# ``report`` (report.md and variants.md from the results) and ``study`` (run_study, run_variants).
# Importing any of them imports ``plan``, which registers the optimizer variants.

from __future__ import annotations

from .plan import (ABLATION, CONFIGS, HEAD_CONFIGS, MODULE, ROBUST, STUDY_SPECS, TASKS, VARIANTS, _around, _name,
                   _variant_name, check_variants, head_features, head_options, plan_main, plan_tuning, plan_variants)
from .report import study_report, variants_report
from .run import frozen_sweep, one_thread, one_thread_worker, trace_multipliers, train_heads
from .stats import (INF, ablations, costs, heads_summary, heads_verdict, paired, peers, robust_difference,
                    robust_verdict, robustness)
from .study import run_study, run_variants

__all__ = ["ABLATION", "CONFIGS", "HEAD_CONFIGS", "INF", "MODULE", "ROBUST", "STUDY_SPECS", "TASKS", "VARIANTS",
           "ablations", "check_variants", "costs", "frozen_sweep", "head_features", "head_options", "heads_summary",
           "heads_verdict", "one_thread", "one_thread_worker", "paired", "peers", "plan_main", "plan_tuning",
           "plan_variants", "robust_difference", "robust_verdict", "robustness", "run_study", "run_variants",
           "study_report", "trace_multipliers", "train_heads", "variants_report"]
