"""The hypergradient study's ``report.md``, from its results."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .solver_cost import COST_DAMPING


def _mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else math.nan


def report(doc: dict[str, Any]) -> str:
    lines = ["# Study: hypergradients (issue 7)", "",
             f"Reproduce: `nestopt study hpo --out DIR` ({doc['total_seconds']:.0f} s here"
             f"{', quick smoke settings' if doc['quick'] else ''}).", "", "## 1. Exactness", "",
             "Logistic regression, 500 rows, 50 features (feature matrix condition number 25 or 250), one "
             "weight decay per feature (all 1e-3, or all 1e-4: weaker decay leaves the Hessian worse conditioned), "
             "weights solved by Newton to machine precision, float64. Reference: the dense solve. Neumann uses "
             "alpha = 1/lambda_max (power iteration).", "",
             "| cond(X) | decay | Hessian cond | solver | iters | cosine | rel. error |", "|---|---|---|---|---|---|---|"]
    for ex in doc["exactness"].values():
        for r in ex["rows"]:
            lines.append(f"| {ex['feature_cond']:.0f} | {ex['decay']:g} | {ex['hessian_cond']:.0f} | {r['solver']} | {r['iters']} | "
                         f"{r['cosine']:.6f} | {r['rel_error']:.2e} |")
    lines += ["", "![exactness](exactness.png)", "", "## 2. Cost of one hypergradient", "",
              f"TorchOpt: {doc['cost']['torchopt'] or 'not installed (pip install nestopt[hpo])'}. Both solve "
              f"(H + {COST_DAMPING:g} I) x = dL_V/dw with the same iteration count (Hessian-vector products), "
              "per-weight decays as hyperparameters, weights trained 1,000 Adam steps. Best of repeated runs in "
              "one process; extra memory = peak resident memory above the level before the call. TorchOpt's "
              "Neumann sums one more term from the same products (K+1 terms for K products, ours K), so only "
              "the CG results coincide.", ""]
    for label, c in doc["cost"].items():
        if label == "torchopt":
            continue
        lines += [f"**{label}** ({c['params']} weights and as many weight decays; AdamW step "
                  f"{c['train_step_ms']:.2f} ms):", "",
                  "| solver | iters | ms | x train step | extra MB | TorchOpt ms | TorchOpt extra MB | ours / TorchOpt | rel. diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            to = (f"{r['torchopt_time_ms']:.1f} | {r['torchopt_extra_mb']:.1f} | {r['ratio']:.2f} | "
                  f"{r['rel_diff_vs_torchopt']:.1e}" if "ratio" in r else "- | - | - | -")
            em = "n/a" if r["extra_mb"] is None else f"{r['extra_mb']:.1f}"
            lines.append(f"| {r['solver']} | {r['iters']} | {r['time_ms']:.1f} | {r['x_step']:.1f} | {em} | {to} |")
        lines.append("")
    h = doc["hpo"]
    lines += ["## 3. One weight decay per weight (implicit) vs Optuna TPE on one global decay", "",
              f"Digits MLP 64-32-10; 200 train, 400 validation, 1,197 test digits. TPE: {h['trials']} trials, each "
              "a 300-step retrain scored by validation loss. Implicit: warm-started inner training "
              f"({h['inner_steps']} Adam steps per hyper step, {h['hyper_steps']} hyper steps, CG 20 iterations, "
              "damping 1e-3). Judged the same way: retrain 300 full-batch Adam steps (lr 1e-2) from the same "
              "initialisation with the hyperparameters found; test accuracy.", "",
              "| seed | TPE test acc | TPE s | implicit test acc | implicit s | time ratio | default 1e-3 test acc |",
              "|---|---|---|---|---|---|---|"]
    for r in h["rows"]:
        lines.append(f"| {r['seed']} | {r['tpe']['test_acc']:.4f} | {r['tpe']['wall_s']:.1f} | "
                     f"{r['implicit']['test_acc']:.4f} | {r['implicit']['wall_s']:.1f} | "
                     f"{r['implicit']['wall_s'] / r['tpe']['wall_s']:.2f} | {r['default_1e-3']['test_acc']:.4f} |")
    lines += ["", "![hpo](hpo.png)", ""]
    d = doc["distill"]
    lines += ["## 4. Dataset distillation", "",
              f"One 8x8 image per class plus a learned step size, by unrolled hypergradients through {d['unroll']} SGD "
              f"steps from a fresh random initialisation each outer step ({d['outer_steps']} outer steps). "
              "Evaluation: fresh MLPs trained on the 10 images, test accuracy averaged over initialisations. "
              "The images start as 10 random real images, one per class; the baseline is those same images, trained "
              "with the best of 4 step sizes (chosen on the test split, which favours the baseline).", "",
              "| seed | distilled | random real (best lr) | learned lr |", "|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['seed']} | {r['distilled_acc']:.4f} | {r['real_acc_best_lr']:.4f} | {r['learned_lr']:.3f} |")
    lines.append(f"| mean | {_mean([r['distilled_acc'] for r in d['rows']]):.4f} | "
                 f"{_mean([r['real_acc_best_lr'] for r in d['rows']]):.4f} | |")
    lines += ["", "![distill](distill.png)", ""]
    a = doc["augment"]
    lines += ["## 5a. Learned data augmentation", "",
              f"{a['n_train']} training digits; an augmentation MLP (input + noise -> residual image) tuned by "
              "implicit hypergradients of the validation loss through its weights; judged by a 300-step retrain "
              "with fresh augmentations, test accuracy.", "",
              "| seed | no augmentation | learned augmentation | skipped hyper steps |", "|---|---|---|---|"]
    for r in a["rows"]:
        lines.append(f"| {r['seed']} | {r['none']:.4f} | {r['learned']:.4f} | {r['skipped']} |")
    lines += ["", "![augment](augment.png)", ""]
    s = doc["stn"]
    lines += ["## 5b. Self-tuning network (dropout, weight decay) vs a 4x4 grid", "",
              "| seed | grid best (wd, dropout) | grid test acc | grid s | STN final (wd, dropout) | STN test acc | STN s |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        g = r["grid_best"]
        lines.append(f"| {r['seed']} | {g['weight_decay']:.0e}, {g['dropout']:.1f} | {g['test_acc']:.4f} | "
                     f"{r['grid_wall_s']:.1f} | {r['stn_final']['weight_decay']:.1e}, {r['stn_final']['dropout']:.2f} | "
                     f"{r['stn_test_acc']:.4f} | {r['stn_wall_s']:.1f} |")
    lines += ["", "![stn](stn.png)", ""]
    lk = doc["leak"]
    lines += ["## 6. Leak check", "",
              f"Resident memory over {lk['hyper_steps']} hyperparameter steps (Bilevel, implicit CG): "
              f"{lk['rss_before_mb']:.1f} MB -> {lk['rss_after_mb']:.1f} MB (growth {lk['growth_mb']:+.1f} MB).", ""]
    lines += ["Section times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["section_seconds"].items()), ""]
    return "\n".join(lines)
