"""Section 3: one weight decay per weight by implicit hypergradients against Optuna TPE on one global
weight decay, both judged by the same retraining."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import functional as F

from ...hyper import Bilevel
from ...train import train_loop
from .data import digits_split, mlp, seeded, weights


HPO_SIZES = (64, 32, 10)
RETRAIN_STEPS = 300
RETRAIN_LR = 1e-2


def _penalised_loss(net, p, h, x, y, per_weight: bool):
    out = functional_call(net, p, (x,))
    if per_weight:
        pen = sum((h[k].exp() * p[k] ** 2).sum() for k in p)
    else:
        pen = h.exp() * sum((v ** 2).sum() for v in p.values())
    return F.cross_entropy(out, y) + pen


def retrain(net, init: dict[str, torch.Tensor], hparams, data, per_weight: bool,
            steps: int = RETRAIN_STEPS) -> dict[str, float]:
    """The judging protocol: full-batch Adam (lr 1e-2) from ``init`` for ``steps`` steps."""
    w = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.Adam(w.values(), lr=RETRAIN_LR)
    train_loop(opt, steps, lambda _: _penalised_loss(net, w, hparams, data["xt"], data["yt"], per_weight),
               divergence=None, catch=())
    with torch.no_grad():
        val = functional_call(net, w, (data["xv"],))
        test = functional_call(net, w, (data["xs"],))
        return {"val_loss": float(F.cross_entropy(val, data["yv"])),
                "val_acc": float((val.argmax(1) == data["yv"]).float().mean()),
                "test_acc": float((test.argmax(1) == data["ys"]).float().mean())}


def tpe(net, init, data, trials: int, seed: int) -> dict[str, Any]:
    try:
        import optuna
    except ImportError as exc:
        raise RuntimeError("nestopt study hpo compares against Optuna TPE: pip install 'nestopt[hpo]'") from exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()

    def objective(trial):
        wd = trial.suggest_float("weight_decay", 1e-7, 1e-1, log=True)
        return retrain(net, init, torch.tensor(math.log(wd)), data, per_weight=False)["val_loss"]

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - t0
    best = study.best_params["weight_decay"]
    judged = retrain(net, init, torch.tensor(math.log(best)), data, per_weight=False)
    return {"wall_s": wall, "best_weight_decay": best, "best_val_loss": study.best_value, **judged,
            "trace": [t.value for t in study.trials]}


def per_weight_decay(net, init, data, hyper_steps: int, inner_steps: int, seed: int) -> dict[str, Any]:
    """Implicit hypergradients on one weight decay per weight, warm-started inner training."""
    t0 = time.perf_counter()
    lam0 = {k: torch.full_like(v, math.log(1e-3)) for k, v in init.items()}

    def inner(p, h):
        return _penalised_loss(net, p, h, data["xt"], data["yt"], per_weight=True)

    def outer(p, h):
        return F.cross_entropy(functional_call(net, p, (data["xv"],)), data["yv"])

    b = Bilevel(inner, outer, init, lam0, method="implicit", horizon="continue", inner_steps=inner_steps,
                inner_optimizer=lambda p: torch.optim.Adam(p, lr=RETRAIN_LR),
                hyper_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
                solver_kwargs={"solver": "cg", "iters": 20, "damping": 1e-3, "max_residual": 0.5},
                on_error="skip")
    with seeded(seed):  # anything in the run that draws from torch's generator draws from the seed
        b.run(hyper_steps)
    wall = time.perf_counter() - t0
    judged = retrain(net, init, b.hparams, data, per_weight=True)
    lam = torch.cat([v.reshape(-1) for v in b.hparams.values()]).exp()
    return {"wall_s": wall, **judged, "skipped": int(sum(r["skipped"] for r in b.history)),
            "trace": [r["outer_loss"] for r in b.history],
            "decay_quantiles": [float(q) for q in torch.quantile(lam, torch.tensor([0.1, 0.5, 0.9]))]}


def hpo_compare(seeds: tuple[int, ...] = (0, 1, 2), trials: int = 50, hyper_steps: int = 40,
                inner_steps: int = 15) -> dict[str, Any]:
    rows = []
    for seed in seeds:
        data = digits_split(seed)
        net = mlp(HPO_SIZES, seed)
        init = weights(net)
        t = tpe(net, init, data, trials, seed)
        ours = per_weight_decay(net, init, data, hyper_steps, inner_steps, seed)
        base = retrain(net, init, torch.tensor(math.log(1e-3)), data, per_weight=False)
        rows.append({"seed": seed, "tpe": t, "implicit": ours, "default_1e-3": base})
    return {"rows": rows, "trials": trials, "hyper_steps": hyper_steps, "inner_steps": inner_steps}
