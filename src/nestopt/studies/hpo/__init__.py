"""``nestopt study hpo --out DIR``: hypergradients measured (issue 7; Lorraine's thesis, seed 002).

Sections, each with numbers in ``results.json`` and the report:

1. exactness: CG and Neumann against the dense solve on logistic regression with feature-covariance
   condition numbers 25 and 250, as the iteration count grows (figure ``exactness.png``);
2. cost: time and peak extra memory of one hypergradient as a multiple of one AdamW training step,
   per solver and iteration count, on two MLPs, with TorchOpt's ``custom_root`` solvers in the same
   process when TorchOpt is installed;
3. per-weight weight decay on a digits MLP (200 train / 400 validation) by implicit hypergradients
   against Optuna TPE (50 trials) on one global weight decay, both judged by retraining 300 steps from
   the same initialisation and measuring test accuracy on the remaining digits (figure ``hpo.png``);
4. dataset distillation: one learned image per digit class against 10 random real images
   (figure ``distill.png``);
5. a learned data-augmentation network (implicit hypergradients through its weights) against no
   augmentation, and a self-tuning network for dropout and weight decay against a 4x4 grid
   (figures ``augment.png``, ``stn.png``);
6. a leak check: resident memory over 1,000 hyperparameter steps.
"""

# The package, one section a module: ``solver_exactness`` (1), ``solver_cost`` (2),
# ``weight_decay`` (3), ``distillation`` (4), ``augment`` (5a), ``self_tuning`` (5b), ``leak`` (6);
# ``data`` (the digits split, the MLPs, seeded initialisation), ``measure`` (memory and time with
# the allocator settled for each), ``plots``, ``writeup`` (report.md) and ``study`` (run_study).

from __future__ import annotations

from .augment import augmentation
from .data import digits_split, mlp, seeded, weights
from .distillation import distill
from .leak import leak_check
from .measure import _mallopt_for_measurement, _time, measuring_memory, peak_extra_mb, rss_mb  # noqa: F401
from .plots import figures
from .self_tuning import _train_plain, stn_vs_grid  # noqa: F401
from .solver_cost import COST_DAMPING, COST_ITERS, _decay_problem, cost  # noqa: F401
from .solver_exactness import ITERS, exactness, logistic_problem
from .study import run_study
from .weight_decay import HPO_SIZES, RETRAIN_LR, RETRAIN_STEPS, hpo_compare, per_weight_decay, retrain, tpe
from .writeup import report

__all__ = ["COST_DAMPING", "COST_ITERS", "HPO_SIZES", "ITERS", "RETRAIN_LR", "RETRAIN_STEPS", "augmentation", "cost",
           "digits_split", "distill", "exactness", "figures", "hpo_compare", "leak_check", "logistic_problem",
           "measuring_memory", "mlp", "peak_extra_mb", "per_weight_decay", "report", "retrain", "rss_mb", "run_study",
           "seeded", "stn_vs_grid", "tpe", "weights"]
