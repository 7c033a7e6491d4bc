"""The refit strategies a quant team would compare, and one day's refit under each.

Every refit runs through :func:`nestopt.train.train_loop` with the same step budget, evaluating
the next day's validation loss every ``EVAL_EVERY`` steps (the task's ``validation_loss`` where it
has one, and its whole ``evaluate`` once at the end); the record keeps, at each evaluation,
the step, the validation loss and the training seconds so far (the loop's own clock: evaluation
is not counted, the optimizer's and the controller's work is).

=====================  =================================================================================
``adamw-once``         AdamW (weight decay 0.01, fused), rate tuned once on the past days; cold start (today's practice)
``adamw-per-day``      AdamW at the rate that is best on that very day: an oracle, the upper bound on tuning
``warm``               AdamW from yesterday's final weights (its own rate, tuned on the past days)
``shrink-perturb``     warm, after ``p <- lam * p + sigma * p_fresh`` (Ash & Adams 2020), ``lam`` tuned on the past days
``muon``               torch's Muon on the trunk's matrices, AdamW on the rest (heads, biases); rate tuned
``prodigy``            Prodigy at its defaults (peer)
``schedulefree``       schedule-free AdamW at its defaults (peer)
``learned-shipped``    ``LearnedOptimizer`` with the shipped network, ``lr=1``
``learned-meta``       ``LearnedOptimizer`` with a network meta-trained on the past days' refits
``nested``             ``NestedOptimizer`` (AdamW at adamw-once's rate, frozen controller meta-trained on the
                       past days), fed the trading signals of :mod:`.features`
``nested-no-<f>``      the same with feature ``f`` switched off (its own controller, meta-trained the same way)
=====================  =================================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ... import tasks as task_registry
from ...train import LoopResult, train_loop
from .features import TRADING_FEATURES, trading_features

EVAL_EVERY = 10
STATS_EVERY = 20  # steps between two refreshes of the trading signals (monitor_stats)
BASE_FEATURES = ("grad_norm", "param_norm", "depth", "update_ratio", "loss")  # not "val": that is tomorrow's data
SHRINK_NOISE = 0.1  # shrink-and-perturb's noise: this share of a fresh initialisation

FIXED = ("adamw-once", "adamw-per-day", "warm", "shrink-perturb", "muon", "prodigy", "schedulefree",
         "learned-shipped", "learned-meta", "nested")


def ablations(features: tuple[str, ...]) -> list[str]:
    return [f"nested-no-{f}" for f in features]


def nested_features(strategy: str, trading: tuple[str, ...]) -> tuple[str, ...]:
    """The trading features a nested strategy reads: all of ``trading``, or all but one."""
    if strategy == "nested":
        return trading
    return tuple(f for f in trading if f != strategy[len("nested-no-"):])


def run_seed(seed: int, day: int) -> int:
    """The seed of one refit (model initialisation and batches): distinct for every day and seed."""
    return seed * 100_003 + day


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """One param group per module holding parameters directly (in order, ``depth`` its position);
    a module under ``heads.k`` carries ``head = k`` (what the per-head features read)."""
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    out = []
    for i, (name, m) in enumerate(owners):
        g: dict[str, Any] = {"params": list(m.parameters(recurse=False)), "depth": i / max(len(owners) - 1, 1)}
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "heads" and parts[1].isdigit():
            g["head"] = int(parts[1])
        out.append(g)
    return out


def make_optimizer(strategy: str, model: nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of ``strategy`` over ``model`` (``settings``: ``lr``, ``net``, ``controller``,
    ``trading``)."""
    from ...bench import registry

    if strategy in ("adamw-once", "adamw-per-day", "warm", "shrink-perturb"):
        return torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01, fused=True)
    if strategy == "muon":
        from ...optim.muon import MuonAdamW, muon_param_groups

        head = "heads" if any(n.startswith("heads.") for n, _ in model.named_parameters()) else "auto"
        return MuonAdamW(muon_param_groups(model, head=head), lr=settings["lr"], weight_decay=0.01, fused=True)
    if strategy in ("prodigy", "schedulefree"):
        return registry.get({"schedulefree": "schedulefree-adamw"}.get(strategy, strategy)).make_for(model)
    if strategy.startswith("learned"):
        from ...optim.learned import LearnedOptimizer

        return LearnedOptimizer(model.parameters(), net=settings["net"], lr=1.0)
    if strategy.startswith("nested"):
        from ...optim.nested import NestedOptimizer

        feats = [*BASE_FEATURES, *trading_features(settings["trading"])]
        return NestedOptimizer(_groups(model), torch.optim.AdamW, controller=settings["controller"], signal="frozen",
                               features=feats, lr=settings["lr"], weight_decay=0.01, fused=True)
    raise ValueError(f"strategy={strategy!r} is invalid: expected one of {', '.join(FIXED)} or nested-no-<feature>")


def _stats_input(task: Any, model: nn.Module, trading: tuple[str, ...]) -> Any:
    """The ``trading=`` value of a nested step: the task's ``monitor_stats`` every ``STATS_EVERY`` steps."""
    if not trading or not any(TRADING_FEATURES[f].reads for f in trading):
        return None
    counter = [0]

    def stats() -> dict[str, Any] | None:
        counter[0] += 1
        return task.monitor_stats(model) if (counter[0] - 1) % STATS_EVERY == 0 else None

    return stats


def refit(task: Any, strategy: str, seed: int, steps: int, settings: dict[str, Any],
          start: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One day's refit: ``(record, final weights)``. ``start`` (yesterday's weights) is loaded
    first; ``settings["shrink"]`` shrinks and perturbs them."""
    s = run_seed(seed, getattr(task, "day", 0))
    model = task.init(s)
    if start is not None:
        model.load_state_dict(start)
        if settings.get("shrink") is not None:
            fresh = task.init(s + 1)
            with torch.no_grad():
                for p, q in zip(model.parameters(), fresh.parameters()):
                    p.mul_(settings["shrink"]).add_(q, alpha=SHRINK_NOISE)
    opt = make_optimizer(strategy, model, settings)
    modes = hasattr(opt, "train") and hasattr(opt, "eval") and not isinstance(opt, nn.Module)
    trading = tuple(settings.get("trading", ())) if strategy.startswith("nested") else ()
    stats = _stats_input(task, model, trading) if hasattr(task, "monitor_stats") else None
    if stats is not None:
        step_fn = lambda c: (loss := c(), opt.step(loss=loss, trading=stats))[0]  # noqa: E731
    elif strategy.startswith("nested"):
        step_fn = lambda c: (loss := c(), opt.step(loss=loss))[0]  # noqa: E731
    else:
        step_fn = None
    curve: dict[str, list[float]] = {"step": [], "val_loss": [], "train_s": []}

    quick = getattr(task, "validation_loss", None)  # the curve's points need the loss only

    def evaluate(full: bool = False) -> dict[str, float]:
        if modes:
            opt.eval()
        try:
            return task.evaluate(model) if full or quick is None else {"val_loss": quick(model)}
        finally:
            if modes:
                opt.train()

    def on_eval(step: int, metrics: dict[str, float], res: LoopResult) -> None:
        curve["step"].append(step)
        curve["val_loss"].append(metrics["val_loss"])
        curve["train_s"].append(res.train_time)

    res = train_loop(opt, steps, lambda b: task.loss(model, b), batch=task.sampler(s), step_fn=step_fn,
                     evaluate=evaluate, eval_every=EVAL_EVERY, on_eval=on_eval)
    final = None if res.diverged else {k: v for k, v in evaluate(full=True).items() if isinstance(v, int | float)}
    record = {"strategy": strategy, "day": getattr(task, "day", None), "seed": seed, "steps": steps,
              "lr": settings.get("lr"), "curve": curve, "diverged": res.diverged, "error": res.error,
              "train_s": res.train_time, "final": final, "warm": start is not None}
    return record, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A job: one refit (``days`` of one day), or a chain of warm-started refits over ``days`` (each
    day from the day before's final weights; the first from a cold adamw-once refit of the day
    before it, not recorded)."""
    family = task_registry.family(job["family"])
    strategy, seed, steps, settings = job["strategy"], job["seed"], job["steps"], job["settings"]
    if strategy not in ("warm", "shrink-perturb"):
        return [refit(family.sample(d), strategy, seed, steps, settings)[0] for d in job["days"]]
    first = job["days"][0]
    _, state = refit(family.sample(first - 1), "adamw-once", seed, steps, {"lr": job["cold_lr"]})
    out = []
    for d in job["days"]:
        rec, state = refit(family.sample(d), strategy, seed, steps, settings, start=state)
        out.append(rec)
    return out


def final_value(record: dict[str, Any], key: str = "val_loss") -> float:
    """A record's final metric (``inf`` for a diverged run, NaN when the task does not report it)."""
    if record["final"] is None:
        return math.inf
    v = record["final"].get(key)
    return math.nan if v is None else float(v)
