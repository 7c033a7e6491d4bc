"""The optimizer registry: what ``nestopt bench``, ``nestopt overhead`` and the conformance tests
iterate over. An optimizer joins everything with one call::

    >>> from nestopt.bench import registry
    >>> registry.register(registry.OptimizerSpec(
    ...     name="my-sgd", build=lambda params, lr: torch.optim.SGD(params, lr=lr),
    ...     default_lr=0.1, description="plain SGD"))          # doctest: +SKIP

A spec says how to build the optimizer at a learning rate, its default rate, the grid the bench
tunes it on (if it is a tuned baseline), whether ``step`` needs the loss (a closure), and its rule
for non-finite gradients: ``"skip"`` (parameters and state stay as they were, which the
conformance tests check bitwise) or ``"propagate"`` (torch's own optimizers: a NaN gradient
reaches the parameters; use a guard).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .._checks import check_number, unknown_name

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

LR_GRID_ADAM = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
LR_GRID_SGD = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and use one optimizer.

    Attributes:
        name: registry key (lowercase, dashes).
        build: ``build(params, lr) -> torch.optim.Optimizer``.
        default_lr: the learning rate used untuned.
        lr_grid: rates the bench tries when ``tune`` is set.
        tune: the bench reports this optimizer at its best grid rate ("<name>-tuned").
        needs_loss: ``step`` must receive the loss (closure or ``loss=``).
        nonfinite: ``"skip"`` or ``"propagate"`` (see module docstring).
        train_eval_modes: the optimizer has ``train()``/``eval()`` (schedule-free) that the bench
            calls around evaluation.
        requires: module that must be importable for the optimizer to be available.
        origin: ``"torch"``, ``"peer"`` (third-party) or ``"nestopt"``.
        conformance_lr: a rate at which the conformance tests' analytic problems (an asymmetric
            quadratic with curvatures 2 and 200, and Rosenbrock) are stable; default ``default_lr``.
        group_independent: each param group's update depends only on that group (so two groups
            step exactly as two separate optimizers would); False for rules that pool statistics.
        create_graph: the closure must call ``loss.backward(create_graph=True)`` (second order).
        schedule: ``schedule(lr, total_steps) -> Schedule``: the bench drives the optimizer with it
            through a :class:`~nestopt.schedule.LargeLRScheduler`, one step per optimizer step.
        clip_norm: the bench clips the global gradient norm to this before each step.
        limits: documented limitations the conformance tests check as such; ``"group-lrs"``: it
            refuses param groups with different non-zero learning rates (it raises);
            ``"lr-zero-averages"``: at lr 0 its iterate ``state["z"]`` stops but the averaged
            weights keep moving toward it (schedule-free's weighting uses the largest lr seen);
            ``"global-rng"``: its step draws from torch's and NumPy's global generators, so two
            copies in lockstep agree only when each draws from the same generator state (the
            bench seeds both per run, so its runs stay deterministic).
        family: how the bench's figures group it: ``"baseline"`` (torch's tuned baselines),
            ``"peer"`` (other people's optimizers), ``"polyak"``, ``"learned"``, ``"nested"``
            (learning-rate learners), ``"schedule"`` or ``"games"``.
        param_groups: ``param_groups(model) -> groups`` when the optimizer needs to know which
            tensor is which (Muon's split); the bench, the studies and :meth:`make_for` use it.
        default_entry: a tuned optimizer also reported untuned at ``default_lr`` (``"<name>-default"``;
            the default rate joins its grid if it is not on it).
        full_only: run by the full suite only (the quick suite leaves it out: its step is costly).
        named_only: run by no suite unless named (``--optimizers``): its step costs too much for
            the full suite's time budget (PSGD-Kron, measured in :mod:`nestopt.bench.overhead`).
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    default_lr: float
    description: str = ""
    lr_grid: tuple[float, ...] = ()
    tune: bool = False
    needs_loss: bool = False
    nonfinite: Literal["skip", "propagate"] = "propagate"
    group_independent: bool = True
    train_eval_modes: bool = False
    requires: str | None = None
    origin: Literal["torch", "peer", "nestopt"] = "nestopt"
    conformance_lr: float | None = None
    create_graph: bool = False
    schedule: Callable[[float, int], Any] | None = None
    clip_norm: float | None = None
    limits: tuple[str, ...] = ()
    family: Literal["baseline", "peer", "polyak", "learned", "nested", "schedule", "games"] = "nested"
    param_groups: Callable[[torch.nn.Module], Params] | None = None
    default_entry: bool = False
    full_only: bool = False
    named_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def make(self, params: Params, lr: float | None = None) -> torch.optim.Optimizer:
        if not self.available():
            raise RuntimeError(f"optimizer {self.name!r} needs the package {self.requires!r}: "
                               f"pip install 'nestopt[peers]'")  # (the extra that holds every peer package)
        lr = self.default_lr if lr is None else lr
        if not torch.is_tensor(lr):
            check_number("lr", lr, lo=0.0)
        return self.build(params, lr=lr)

    def make_for(self, model: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters, grouped by ``param_groups`` where the spec has it."""
        params = self.param_groups(model) if self.param_groups is not None else model.parameters()
        return self.make(params, lr=lr)

    def grid(self, stride: int = 1) -> list[float]:
        """The rates the bench runs: every ``stride``-th grid rate (tuned), plus ``default_lr`` where
        the spec reports its default too; the default rate alone when untuned."""
        if not self.tune:
            return [self.default_lr]
        lrs = list(self.lr_grid[::stride])
        if self.default_entry and self.default_lr not in lrs:
            lrs.append(self.default_lr)
        return lrs


_REGISTRY: dict[str, OptimizerSpec] = {}
# Specs a study runs through the bench's runner without listing them among the optimizers
# (``names()`` leaves them out); ``run_jobs`` hands them to its worker processes.
_VARIANTS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec``; a ``ValueError`` if its name is taken."""
    if spec.name in _REGISTRY or spec.name in _VARIANTS:
        raise ValueError(f"name={spec.name!r} is invalid: an optimizer of that name is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_variant(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` as a study's variant: ``get`` finds it (in the bench's worker processes too, which
    ``run_jobs`` gives every variant registered here), but ``names()`` and the conformance table do
    not list it. Registering the same spec again is a no-op; another spec under a taken name is a
    ``ValueError``."""
    if spec.name in _REGISTRY or _VARIANTS.get(spec.name, spec) != spec:
        raise ValueError(f"name={spec.name!r} is invalid: an optimizer of that name is already registered")
    _VARIANTS[spec.name] = spec
    return spec


def variants() -> list[OptimizerSpec]:
    """The specs registered with :func:`register_variant`, in registration order."""
    return list(_VARIANTS.values())


def get(name: str) -> OptimizerSpec:
    """The spec called ``name`` (a registered optimizer or variant); ``KeyError`` lists the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} is invalid: expected an optimizer name (a string) such as "
                        f"{next(iter(_REGISTRY), 'sgd')!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _VARIANTS:
        return _VARIANTS[name]
    raise unknown_name("optimizer", name, _REGISTRY)


def names(*, available_only: bool = True) -> list[str]:
    """Registered names in registration order (by default only those whose packages are installed)."""
    return [n for n, s in _REGISTRY.items() if s.available() or not available_only]


def specs(*, available_only: bool = True) -> list[OptimizerSpec]:
    return [_REGISTRY[n] for n in names(available_only=available_only)]


# -- baselines ---------------------------------------------------------------------------------

register(OptimizerSpec(
    "sgd", lambda p, lr: torch.optim.SGD(p, lr=lr), default_lr=0.1, lr_grid=LR_GRID_SGD, tune=True,
    origin="torch", conformance_lr=1e-3, family="baseline", description="torch.optim.SGD"))
register(OptimizerSpec(
    "sgd-momentum", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), default_lr=0.01,
    lr_grid=tuple(x / 10 for x in LR_GRID_SGD), tune=True, origin="torch", conformance_lr=2e-4, family="baseline",
    description="torch.optim.SGD(momentum=0.9)"))
register(OptimizerSpec(
    "adam", lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True), default_lr=1e-3, lr_grid=LR_GRID_ADAM,
    tune=True, origin="torch", conformance_lr=0.05, family="baseline", description="torch.optim.Adam(fused=True)"))
register(OptimizerSpec(
    "adamw", lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01, fused=True), default_lr=1e-3,
    lr_grid=LR_GRID_ADAM, tune=True, origin="torch", conformance_lr=0.05, family="baseline", default_entry=True,
    description="torch.optim.AdamW(weight_decay=0.01, fused=True); tuned and at its default in the bench"))


def _prodigy(params: Params, lr: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr)


def _schedulefree(params: Params, lr: float) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    opt = AdamWScheduleFree(params, lr=lr)
    opt.train()
    return opt


register(OptimizerSpec(
    "prodigy", _prodigy, default_lr=1.0, requires="prodigyopt", origin="peer", group_independent=False,
    limits=("group-lrs",), family="peer",
    description="Prodigy (parameter-free Adam, prodigyopt), lr=1 as its authors advise"))
register(OptimizerSpec(
    "schedulefree-adamw", _schedulefree, default_lr=2.5e-3, requires="schedulefree", origin="peer",
    train_eval_modes=True, conformance_lr=0.05, limits=("lr-zero-averages",), family="peer", description="schedule-free AdamW (schedulefree), its default lr"))


# -- today's peers: Muon (torch), SOAP, PSGD-Kron and AdEMAMix (pytorch-optimizer) ---------------------
# Peers of today's comparisons (Wen et al. 2025, "Fantastic pretraining optimizers"). They are tuned
# on half-decade grids like the baselines and also reported at their authors' defaults
# ("<name>-default"). The matrix methods cost a matrix computation per tensor per step (Newton-Schulz
# iterations, eigenbases, triangular preconditioners): the quick suite runs Muon and leaves out the three from
# pytorch-optimizer; the full suite runs Muon, SOAP and AdEMAMix. PSGD-Kron runs only when named: its
# first 20 steps cost 56x AdamW's on the digits CNN and 17x on the GRU (173 and 269 ms a step against
# 3.1 and 16, one thread, evaluations included; it refits its preconditioner every step at first), and
# its first step on a 960x960 matrix (wide-mlp) did not finish in two minutes: more than the full
# suite's time budget holds. The peers are tuned on Adam's and AdamW's own grid (1e-4 to 1.0, half a
# decade apart): a shorter grid would cap them below AdamW's best rate on the tasks where that rate is
# large (the quadratics, 1.0; gru-seq, 0.1).

LR_GRID_PEER = LR_GRID_ADAM


def _muon(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.muon import MuonAdamW

    return MuonAdamW(params, lr=lr, weight_decay=0.01, fused=True)


def _muon_groups(model: torch.nn.Module) -> Params:
    from ..optim.muon import muon_param_groups

    return muon_param_groups(model)


def _pytorch_optimizer(cls: str, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Params, lr: float) -> torch.optim.Optimizer:
        import pytorch_optimizer

        return getattr(pytorch_optimizer, cls)(params, lr=lr, **kw)

    return build


register(OptimizerSpec(
    "muon", _muon, default_lr=1e-3, lr_grid=LR_GRID_PEER, tune=True, default_entry=True, origin="torch",
    family="peer", param_groups=_muon_groups, conformance_lr=0.05,
    description="torch.optim.Muon on the hidden matrices, AdamW(fused) on embeddings, head, biases and norms "
                "(nestopt.optim.MuonAdamW, adjust_lr_fn='match_rms_adamw': one lr for both, wd 0.01)"))
_MATRIX = {"requires": "pytorch_optimizer", "origin": "peer", "family": "peer", "tune": True, "default_entry": True,
           "lr_grid": LR_GRID_PEER, "full_only": True}
register(OptimizerSpec(
    "soap", _pytorch_optimizer("SOAP"), default_lr=3e-3, conformance_lr=0.05, **_MATRIX,
    description="SOAP (Vyas et al. 2024: Adam in Shampoo's eigenbasis, pytorch-optimizer), its defaults: betas "
                "(0.95, 0.95), wd 0.01, eigenbasis refreshed every 10 steps"))
register(OptimizerSpec(
    "kron", _pytorch_optimizer("Kron"), default_lr=1e-3, conformance_lr=0.05, limits=("global-rng",), **_MATRIX,
    named_only=True,
    description="PSGD-Kron (Li 2015/2024: Kronecker-factored preconditioner fitted to Hessian-vector pairs, "
                "pytorch-optimizer), its defaults: momentum 0.9, preconditioner update probability 1 annealed to 0.03"))
register(OptimizerSpec(
    "ademamix", _pytorch_optimizer("AdEMAMix"), default_lr=1e-3, conformance_lr=0.05, **_MATRIX,
    description="AdEMAMix (Pagliardini et al. 2024: Adam plus a slow EMA, beta3 0.9999, alpha 5; pytorch-optimizer)"))


# -- Polyak step sizes (nestopt.optim.polyak) ----------------------------------------------------


def _polyak(**kw: Any) -> Callable[..., torch.optim.Optimizer]:
    from ..optim.polyak import Polyak

    return lambda params, lr: Polyak(params, lr=lr, **kw)


def _polyak_adam(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.polyak import PolyakAdam

    return PolyakAdam(params, lr=lr)


_POLYAK = {"needs_loss": True, "nonfinite": "skip", "default_lr": 1.0, "origin": "nestopt", "family": "polyak"}
register(OptimizerSpec("polyak", _polyak(), group_independent=False, **_POLYAK,
                       description="Polyak step (f - f*)/||g||^2, one step size for all parameters (the note's rule)"))
register(OptimizerSpec("polyak-tensor", _polyak(scope="tensor"), group_independent=False, **_POLYAK,
                       description="Polyak, one step per tensor, gap shared in proportion to ||g_i||"))
register(OptimizerSpec("polyak-group", _polyak(scope="group"), group_independent=False, **_POLYAK,
                       description="Polyak, one step per param group, gap shared in proportion to ||g_i||"))
register(OptimizerSpec("polyak-rms", _polyak(precondition="rms"), group_independent=False, **_POLYAK,
                       description="Polyak magnitude on D^-1 g, D = sqrt of a squared-gradient average"))
register(OptimizerSpec("polyak-hutchinson", _polyak(precondition="hutchinson"), group_independent=False,
                       create_graph=True, **_POLYAK,
                       description="Polyak magnitude on D^-1 g, D = Hutchinson Hessian-diagonal estimate"))
register(OptimizerSpec("polyak-adam", _polyak_adam, group_independent=False, **_POLYAK, conformance_lr=0.5,
                       description="hybrid: Polyak magnitude, Adam direction m_hat/(sqrt(v_hat)+eps)"))


# -- the large-learning-rate recipe (nestopt.schedule) -------------------------------------------


def _large_lr_schedule(lr: float, total_steps: int) -> Any:
    from ..schedule import LargeLRConfig

    return LargeLRConfig().schedule(base_lr=lr, total=total_steps)


register(OptimizerSpec(
    "sgd-largelr", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=5e-4), default_lr=0.3,
    lr_grid=(0.01, 0.03, 0.1, 0.3, 0.5, 0.8, 1.0), tune=True, origin="nestopt", schedule=_large_lr_schedule,
    clip_norm=1.0, conformance_lr=2e-4, family="schedule",
    description="the large-LR recipe: SGD(momentum 0.9, wd 5e-4), warmup 0.01->lr over 5% of the budget, "
                "cosine to 1e-5, clip 1.0 (no label smoothing: the task owns its loss)"))


# -- online learning-rate learners: hypergradient descent and the nested optimizer ----------------


def _hd_adam(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.hypergradient import HypergradientAdam

    return HypergradientAdam(params, lr=lr, weight_decay=0.01)


def _hd_sgd(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.hypergradient import HypergradientSGD

    return HypergradientSGD(params, lr=lr)


def _nested_adamw(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.nested import NestedOptimizer

    return NestedOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=0.01, fused=True, per_tensor_groups=True)


register(OptimizerSpec(
    "adamw-hd", _hd_adam, default_lr=1e-3, nonfinite="skip", conformance_lr=0.05, origin="nestopt",
    description="hypergradient descent on AdamW's rate (Baydin et al. 2018, multiplicative rule, beta 0.02)"))
register(OptimizerSpec(
    "sgd-hd", _hd_sgd, default_lr=0.01, nonfinite="skip", conformance_lr=1e-3, origin="nestopt",
    description="hypergradient descent on SGD's rate (Baydin et al. 2018, multiplicative rule, beta 0.02)"))
register(OptimizerSpec(
    "nested-adamw", _nested_adamw, default_lr=1e-3, needs_loss=True, nonfinite="skip", conformance_lr=0.05,
    group_independent=False, origin="nestopt",
    description="NestedOptimizer(AdamW fused, wd 0.01): controller-set lr multiplier per tensor, hindsight signal"))


# -- complex momentum (nestopt.optim.complex) -----------------------------------------------------


def _complex_momentum(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.complex import ComplexMomentum

    return ComplexMomentum(params, lr=lr, beta=0.9, phase=math.pi / 8)


def _complex_adam(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.complex import ComplexAdam

    return ComplexAdam(params, lr=lr, phase=math.pi / 8)


register(OptimizerSpec(
    "complex-momentum", _complex_momentum, default_lr=0.1, lr_grid=LR_GRID_SGD, nonfinite="skip",
    conformance_lr=1e-3, origin="nestopt", family="games",
    description="ComplexMomentum(beta=0.9 e^{i pi/8}): mu <- beta mu - g, theta += lr Re(mu) (Lorraine et al. 2022)"))
register(OptimizerSpec(
    "complex-adam", _complex_adam, default_lr=1e-3, lr_grid=LR_GRID_ADAM, nonfinite="skip", conformance_lr=0.05,
    origin="nestopt", family="games", description="ComplexAdam(beta1=0.9 e^{i pi/8}, beta2=0.999): Adam with a complex first-moment coefficient"))


# -- learned optimizers (nestopt.optim.learned): the shipped pretrained network ---------------------


def _learned(params: Params, lr: float) -> torch.optim.Optimizer:
    from ..optim.learned import LearnedOptimizer

    return LearnedOptimizer(params, net="default", lr=lr)


def _shipped() -> bool:
    from ..nets import SHIPPED

    return SHIPPED.is_file()


if _shipped():
    register(OptimizerSpec(
        "learned", _learned, default_lr=1.0, nonfinite="skip", origin="nestopt", requires="safetensors",
        conformance_lr=1.0, family="learned",
        description="LearnedOptimizer with the shipped meta-trained network (linear in momenta, Adam ratios "
                    "and parameter, per-tensor normalised), untuned"))
