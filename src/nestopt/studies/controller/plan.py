"""What the controller study runs: the nested optimizer's configurations and variants (registered
with the bench as optimizer variants when this module is imported), the base rates, and the bench
jobs of each phase."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...bench import registry as opt_registry
from ...bench.registry import LR_GRID_ADAM, OptimizerSpec
from ...bench.runner import Job
from ...optim.nested import DEFAULT_FEATURES, NestedOptimizer

# the prefix of the variants' optimizer names (as in earlier studies' records, so they still match)
MODULE = "nestopt.studies.controller"
TASKS = ("quad-asym", "quad-cond1e2", "rosenbrock", "digits-logreg", "digits-mlp", "diabetes-mlp",
         "trading-multihorizon")
# Base rates, as multiples of each task's tuned AdamW rate lr*: a 100x range centred on it.
ROBUST = (0.1, 0.316, 1.0, 3.16, 10.0)
ABLATION = (0.1, 1.0, 10.0)


def _nested(params: Any, lr: float, **cfg: Any) -> torch.optim.Optimizer:
    return NestedOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True,
                           per_tensor_groups=True, **cfg)


def _minus(name: str) -> tuple[str, ...]:
    return tuple(f for f in DEFAULT_FEATURES if f != name)


# name -> (NestedOptimizer options, what it is compared with)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "frozen": ({"signal": "frozen"}, ""),
    "hindsight": ({}, "frozen"),
    "proxy": ({"signal": "proxy"}, "frozen"),
    "validation": ({"signal": "validation"}, "frozen"),
    **{f"no-{f}": ({"features": _minus(f)}, "hindsight") for f in DEFAULT_FEATURES},
    "plus-curvature": ({"features": (*DEFAULT_FEATURES, "curvature")}, "hindsight"),
    "plus-scratchpad": ({"scratchpad": 8}, "hindsight"),
}

# Hindsight configurations compared by ``nestopt study controller-variants``, each with its
# ``label_shift`` spelled out so that a row means the same whatever the default: label shift 1
# labels the best replay's multiplier itself (the default until 2026-11-23), label shift 2 the
# grid point nearest twice it (the default since, against the greedy label's short-horizon bias);
# the ``mult`` feature lets the controller see where its multiplier is; a 16-step window replays a
# longer horizon; a 16-step period labels twice as often; the wider grid lets one label move the
# multiplier 4x; ``follow=1`` takes the labels directly (a line search over time, the controller
# untrained): is the signal or the controller's learning of it what limits robustness?
VARIANTS: dict[str, dict[str, Any]] = {
    "label shift 1": {"label_shift": 1.0},
    "label shift 2 (default)": {"label_shift": 2.0},
    "mult feature": {"features": (*DEFAULT_FEATURES, "mult"), "label_shift": 1.0},
    "mult feature, label shift 2": {"features": (*DEFAULT_FEATURES, "mult"), "label_shift": 2.0},
    "window 16": {"window": 16, "label_shift": 1.0},
    "label shift 2, period 16": {"label_shift": 2.0, "period": 16},
    "label shift 2, grid 0.25-4": {"label_shift": 2.0, "grid": (0.25, 0.5, 1.0, 2.0, 4.0)},
    "labels followed directly": {"label_shift": 2.0, "follow": 1.0},
    "labels followed directly, period 16": {"label_shift": 2.0, "follow": 1.0, "period": 16},
}

# Part 3, per-head feedback on the multi-horizon task: the optimizer of each run (``None``: plain
# AdamW), the options given to NestedOptimizer beside the param groups; ``"heads": True`` stands for
# ``features=head_features()`` (see :func:`head_options`), and such an optimizer is given the heads'
# losses and AUCs at every step.
HEAD_CONFIGS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "nested-hindsight": {},
    "nested-hindsight+heads": {"heads": True},
    "nested-proxy+heads": {"signal": "proxy", "heads": True},
}


def head_features() -> tuple[Any, ...]:
    """The features of the ``+heads`` configurations: the default ones and the per-head ones
    (which read ``step(head_stats=...)``), made anew for each optimizer (the per-head feature keeps
    state per param group)."""
    from ..head_features import HeadFeatures

    return (*DEFAULT_FEATURES, HeadFeatures())


def head_options(config: str) -> dict[str, Any] | None:
    """NestedOptimizer's options for head configuration ``config`` (``None``: plain AdamW)."""
    cfg = HEAD_CONFIGS[config]
    if cfg is None:
        return None
    options = {k: v for k, v in cfg.items() if k != "heads"}
    if cfg.get("heads"):
        options["features"] = head_features()
    return options


def _slug(label: str) -> str:
    return "variant-" + "".join(c if c.isalnum() else "-" for c in label)


@dataclass(frozen=True)
class _Build:
    """``_nested`` with these options: a spec's ``build`` that pickles to the bench's worker
    processes and compares by value there (where importing this module registered an equal spec
    before the worker registers the parent's, which ``register_variant`` allows only when equal)."""

    options: dict[str, Any]

    def __call__(self, params: Any, lr: float) -> torch.optim.Optimizer:
        return _nested(params, lr, **self.options)


_BASE = {"default_lr": 1e-3, "needs_loss": True, "nonfinite": "skip", "group_independent": False}
STUDY_SPECS: dict[str, OptimizerSpec] = {
    **{f"nested-{k}": OptimizerSpec(f"{MODULE}:nested-{k}", _Build(cfg), description=f"nested, {k}", **_BASE)
       for k, (cfg, _) in CONFIGS.items()},
    **{_slug(k): OptimizerSpec(f"{MODULE}:{_slug(k)}", _Build(cfg), description=f"nested, {k}", **_BASE)
       for k, cfg in VARIANTS.items()},
}
for _spec in STUDY_SPECS.values():  # the bench's runner finds them by name, in its workers too
    opt_registry.register_variant(_spec)


def _name(config: str) -> str:
    """The bench's optimizer name of configuration ``config`` of :data:`CONFIGS`."""
    return f"{MODULE}:nested-{config}"


def _variant_name(label: str) -> str:
    """The bench's optimizer name of variant ``label`` of :data:`VARIANTS`."""
    return f"{MODULE}:{_slug(label)}"


def _steps(t: str) -> int:
    from ... import tasks as task_registry

    return task_registry.get(t).default_steps


def _around(lr: float, factors: tuple[float, ...]) -> list[float]:
    return [float(f"{lr * f:.3g}") for f in factors]


def check_variants(variants: tuple[str, ...], seeds: int) -> None:
    """``ValueError`` naming the argument for an unknown variant or fewer than one seed."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is unknown; valid: {', '.join(repr(k) for k in VARIANTS)}")
    if seeds < 1:
        raise ValueError(f"seeds {seeds} is invalid: expected at least 1")


def plan_tuning(seeds: int, tasks: tuple[str, ...]) -> list[Job]:
    """Phase 1: AdamW over its grid (sets each task's target and tuned rate ``lr*``)."""
    return [Job(t, "adamw", lr, s, _steps(t)) for t in tasks for lr in LR_GRID_ADAM for s in range(seeds)]


def plan_main(best: dict[str, float], seeds: int, ablation_seeds: int, tasks: tuple[str, ...],
              done: set[tuple[str, str, float, int]]) -> list[Job]:
    """Phase 2, around each task's tuned AdamW rate ``lr*``: the 100x range ``lr* x ROBUST``
    for AdamW (the grid runs are reused), hypergradient descent and the default nested optimizer;
    the ablations at ``lr* x ABLATION``; the peers at their defaults."""
    jobs: list[Job] = []
    for t in tasks:
        n, lrs = _steps(t), _around(best[t], ROBUST)
        for opt in ("adamw", "adamw-hd", _name("hindsight")):
            jobs += [Job(t, opt, lr, s, n) for lr in lrs for s in range(seeds) if (t, opt, lr, s) not in done]
        for c in CONFIGS:
            if c != "hindsight":
                jobs += [Job(t, _name(c), lr, s, n) for lr in _around(best[t], ABLATION) for s in range(ablation_seeds)]
        for peer in ("prodigy", "schedulefree-adamw"):
            spec = opt_registry.get(peer)
            if spec.available():
                jobs += [Job(t, peer, spec.default_lr, s, n) for s in range(seeds)]
    return jobs


def plan_variants(best: dict[str, float], methods: dict[str, str], seeds: int, tasks: tuple[str, ...],
                  done: set[tuple[str, str, float, int]]) -> list[Job]:
    """The variants study's phase 2: every method at ``lr* x ROBUST`` (AdamW's grid runs reused)."""
    return [Job(t, opt, lr, s, _steps(t)) for t in tasks for opt in methods.values()
            for lr in _around(best[t], ROBUST) for s in range(seeds) if (t, opt, lr, s) not in done]
