r"""Meta-gradient estimators: how one truncation of an inner run becomes a meta-gradient.

:func:`~nestopt.meta.meta_train` drives every estimator through :class:`GradientEstimator`:

- :meth:`~GradientEstimator.new_task` starts the inner run of a sampled task (and resets any
  per-task state the estimator keeps);
- :meth:`~GradientEstimator.estimate` runs one truncation of ``steps`` inner steps and returns an
  :class:`Estimate`. The meta-gradient is ``d estimate.meta_loss / d Phi`` (autograd, when the
  meta-loss carries a graph to the network's weights ``Phi``) plus ``estimate.grad`` (an explicit
  flat vector, in ``parameters_to_vector`` order). The trainer adds the L2 penalty to the
  meta-loss, backpropagates once, adds ``grad``, clips and applies the outer optimizer; a
  non-finite meta-loss drops the task;
- :meth:`~GradientEstimator.state_dict` / :meth:`~GradientEstimator.load_state_dict` hold what it
  keeps between calls (saved in the trainer's checkpoint).

The built-in ones (:data:`ESTIMATORS`, the names ``MetaConfig.method`` takes):

- :class:`TruncatedBackprop` (``"tbptt"``): backpropagation through the unroll; first order by
  default (each inner gradient a constant), ``second_order=True`` differentiates through it too.
- :class:`Surrogate` (``"surrogate"``): the research note's per-step surrogate (cosine to the
  negative gradient plus a log-magnitude match to ``step_size``), the baseline it describes for
  ``DirectUpdateMLP``.
- :class:`ES` (``"es"``): antithetic evolution strategies (:func:`~nestopt.meta.unrolls.es_gradient`);
  no backpropagation through the unroll.
- :class:`PersistentES` (``"pes"``): persistent ES (Vicol et al. 2021): each antithetic pair of
  particles keeps its own inner run across truncations and the sum ``xi`` of the perturbations it
  has used since its task began, so the per-truncation estimates add up to an unbiased estimate of
  the gradient of the whole run's meta-loss (truncated ES and truncated backpropagation only see
  each truncation's own effect: the short-horizon bias).

A user's estimator subclasses :class:`GradientEstimator` and is passed as ``MetaConfig(method=...)``::

    class Frozen(GradientEstimator):
        def estimate(self, net, task, steps, gen, unrolls=None):
            _, losses = task.unroll(net, steps, False)
            n = sum(p.numel() for p in net.parameters())
            return Estimate(torch.tensor(0.0), losses, grad=torch.zeros(n))

    meta_train(net, MetaConfig(method=Frozen(), reg=0.0))  # leaves net as it was
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._checks import check_int, check_number
from .inner import _ControllerInner, _Inner, make_inner
from .unrolls import Unrolls, es_gradient

Task = _Inner | _ControllerInner


@dataclass
class Estimate:
    """One truncation's meta-gradient estimate (see the module docstring)."""

    meta_loss: torch.Tensor
    """Scalar meta-loss of the truncation (reported; ``nan``/``inf`` drops the task). If it requires
    grad, its gradient w.r.t. the network's weights is (part of) the estimate."""
    losses: list[float]
    """Inner losses along the truncation (the last one is reported as ``last_loss``)."""
    grad: torch.Tensor | None = None
    """An explicit flat meta-gradient (``parameters_to_vector`` order), added to the backpropagated one."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else the estimator wants to report."""


class GradientEstimator(abc.ABC):
    """A meta-gradient estimator for :func:`~nestopt.meta.meta_train` (see the module docstring)."""

    name: ClassVar[str] = "custom"
    """The ``MetaConfig.method`` name (written to checkpoints)."""
    backprop: ClassVar[bool] = False
    """Whether the estimate needs the inner run to be differentiable in the network (a nested
    controller's is not)."""
    parallel: ClassVar[bool] = False
    """Whether :meth:`estimate` runs its unrolls through ``unrolls`` (``MetaConfig.workers`` processes)."""

    @classmethod
    def from_config(cls, cfg: Any) -> GradientEstimator:
        """The estimator ``MetaConfig(method=cls.name)`` stands for, with that config's settings."""
        return cls()

    def new_task(self, net: nn.Module, family: str, seed: int) -> Task:
        """The inner run of task ``seed`` of ``family`` (:func:`~nestopt.meta.inner.make_inner`);
        an estimator with per-task state resets it here."""
        return make_inner(net, family, seed)

    @abc.abstractmethod
    def estimate(self, net: nn.Module, task: Task, steps: int, gen: torch.Generator,
                 unrolls: Unrolls | None = None) -> Estimate:
        """Advance ``task`` by one truncation of ``steps`` inner steps and estimate the meta-gradient.

        ``net`` must be left with the weights it had (perturb copies or restore them); ``gen`` is the
        trainer's generator (draw every random number from it, for reproducible runs); ``unrolls``
        runs batches of unrolls, in worker processes when ``parallel`` and ``workers > 1``.
        """

    def state_dict(self) -> dict[str, Any]:
        """What the estimator keeps between calls (empty for a stateless one)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TruncatedBackprop(GradientEstimator):
    """Truncated backpropagation through the unrolled inner steps (``"tbptt"``)."""

    name, backprop = "tbptt", True

    def __init__(self, second_order: bool = False) -> None:
        self.second_order = bool(second_order)

    @classmethod
    def from_config(cls, cfg: Any) -> TruncatedBackprop:
        return cls(second_order=cfg.second_order)

    def estimate(self, net: nn.Module, task: Task, steps: int, gen: torch.Generator,
                 unrolls: Unrolls | None = None) -> Estimate:
        check_int("steps", steps, lo=1)
        meta_loss, losses = task.unroll(net, steps, self.second_order)
        return Estimate(meta_loss, losses)

    def __repr__(self) -> str:
        return f"TruncatedBackprop(second_order={self.second_order})"


class Surrogate(GradientEstimator):
    """The research note's per-step surrogate for ``DirectUpdateMLP`` (``"surrogate"``): ``1 - cos(delta,
    -g)`` plus ``(log rms(delta) - log step_size)^2`` through each step's update only."""

    name, backprop = "surrogate", True

    def __init__(self, step_size: float = 1e-3) -> None:
        self.step_size = check_number("step_size", step_size, lo=0.0, lo_open=True)

    @classmethod
    def from_config(cls, cfg: Any) -> Surrogate:
        return cls(step_size=cfg.surrogate_lr)

    def estimate(self, net: nn.Module, task: Task, steps: int, gen: torch.Generator,
                 unrolls: Unrolls | None = None) -> Estimate:
        check_int("steps", steps, lo=1)
        if not hasattr(task, "surrogate"):
            raise ValueError("the surrogate needs an update network's inner run (a nested controller has none)")
        meta_loss, losses = task.surrogate(net, steps, self.step_size)
        return Estimate(meta_loss, losses)

    def __repr__(self) -> str:
        return f"Surrogate(step_size={self.step_size:g})"


class ES(GradientEstimator):
    """Antithetic evolution strategies over one truncation (``"es"``): ``pairs`` perturbations
    ``e ~ N(0, sigma^2)``, every unroll from the same inner state on the same batches; the inner run
    then advances with the unperturbed network."""

    name, parallel = "es", True

    def __init__(self, sigma: float = 0.01, pairs: int = 8) -> None:
        self.sigma = check_number("sigma", sigma, lo=0.0, lo_open=True)
        self.pairs = check_int("pairs", pairs, lo=1)

    @classmethod
    def from_config(cls, cfg: Any) -> ES:
        return cls(sigma=cfg.es_sigma, pairs=cfg.es_pairs)

    def estimate(self, net: nn.Module, task: Task, steps: int, gen: torch.Generator,
                 unrolls: Unrolls | None = None) -> Estimate:
        check_int("steps", steps, lo=1)
        batches = task.draw(steps)
        grad = es_gradient(task, net, steps, self.sigma, self.pairs, gen, batches, unrolls)
        meta_loss, losses = task.unroll(net, steps, False, batches)  # advance with Phi itself
        return Estimate(meta_loss.detach(), losses, grad)  # the ES estimate replaces backpropagation

    def __repr__(self) -> str:
        return f"ES(sigma={self.sigma:g}, pairs={self.pairs})"


class PersistentES(GradientEstimator):
    """Persistent evolution strategies over one task's inner run (Vicol et al. 2021; ``"pes"``).

    ``pairs`` antithetic pairs of particles start from the task's initial state; at each truncation
    pair ``j`` draws ``e_j ~ N(0, sigma^2)``, runs its particles with ``Phi + e_j`` and
    ``Phi - e_j`` from their own states, on the same batches, and adds ``e_j`` to its running sum
    ``xi_j``. The estimate ``sum_j xi_j (L_j^+ - L_j^-) / (2 sigma^2 pairs)`` credits each
    truncation's loss to every perturbation that shaped the particle's state, so the estimates
    summed over a run are unbiased for the gradient of the run's total meta-loss. The reported
    meta-loss is the particles' mean; a particle whose loss is not finite ends the task.

    ``PersistentES(pairs=8, sigma=0.01)`` is the estimator; ``PersistentES(net, family, seed, pairs)``
    also starts that task at once, for driving it by hand with :meth:`step`.
    """

    name, parallel = "pes", True

    def __init__(self, net: nn.Module | None = None, family: str | None = None, seed: int | None = None,
                 pairs: int = 8, *, sigma: float = 0.01) -> None:
        self.pairs = check_int("pairs", pairs, lo=1)
        self.sigma = check_number("sigma", sigma, lo=0.0, lo_open=True)
        self.inner: Task | None = None
        self.snaps: list[tuple[Any, ...]] = []
        self.xi: list[torch.Tensor] = []
        if net is not None:
            if family is None or seed is None:
                raise ValueError("PersistentES(net, family, seed, pairs) needs the task's family and seed with net")
            self.new_task(net, family, seed)

    @classmethod
    def from_config(cls, cfg: Any) -> PersistentES:
        return cls(pairs=cfg.es_pairs, sigma=cfg.es_sigma)

    def new_task(self, net: nn.Module, family: str, seed: int) -> Task:
        self.inner = make_inner(net, family, seed)  # draws the batches; its snapshot starts every particle
        start = self.inner.snapshot()
        self.snaps = [start] * (2 * self.pairs)
        n = sum(p.numel() for p in net.parameters())
        self.xi = [torch.zeros(n) for _ in range(self.pairs)]
        return self.inner

    @property
    def t(self) -> int:
        """The current task's inner step."""
        return self._task().t

    def _task(self) -> Task:
        if self.inner is None:
            raise RuntimeError("PersistentES has no task: call new_task(net, family, seed) first")
        return self.inner

    def estimate(self, net: nn.Module, task: Task, steps: int, gen: torch.Generator,
                 unrolls: Unrolls | None = None) -> Estimate:
        check_int("steps", steps, lo=1)
        if task is not self.inner:
            raise ValueError("PersistentES.estimate needs the task its new_task returned (its particles live on it)")
        out = self.step(net, steps, self.sigma, gen, unrolls)
        if out is None:
            return Estimate(torch.tensor(math.nan), [math.nan], info={"diverged": True})
        grad, value, losses = out
        return Estimate(torch.tensor(value), losses, grad)

    def step(self, net: nn.Module, steps: int, sigma: float, gen: torch.Generator, unrolls: Unrolls | None = None
             ) -> tuple[torch.Tensor, float, list[float]] | None:
        """One truncation: ``(gradient estimate, mean meta-loss of the particles, the first particle's
        losses)``, or ``None`` when a particle's loss is not finite (the run has diverged)."""
        check_int("steps", steps, lo=1)
        check_number("sigma", sigma, lo=0.0, lo_open=True)
        inner = self._task()
        t0 = inner.t
        batches = inner.draw(steps)
        flat = torch.nn.utils.parameters_to_vector(list(net.parameters())).detach()
        pairs = len(self.xi)
        eps = [torch.randn(flat.shape, generator=gen, dtype=flat.dtype) * sigma for _ in range(pairs)]
        specs = [(flat + sign * e, self.snaps[2 * j + k]) for j, e in enumerate(eps)
                 for k, sign in enumerate((1.0, -1.0))]
        results = (unrolls or Unrolls()).run(net, inner, specs, steps, batches)
        inner.t = t0 + steps  # only its clock matters: every unroll restores its particle first
        vals = [r[0] for r in results]
        if not all(map(math.isfinite, vals)):
            return None
        self.snaps = [r[2] for r in results]
        grad = torch.zeros_like(flat)
        for j, e in enumerate(eps):
            self.xi[j] += e
            grad += (vals[2 * j] - vals[2 * j + 1]) / (2 * sigma * sigma * pairs) * self.xi[j]
        return grad, sum(vals) / len(vals), results[0][1]

    def state_dict(self) -> dict[str, Any]:
        """The particles' perturbation sums ``xi`` and their inner-run snapshots (of the current task)."""
        return {"xi": [x.clone() for x in self.xi], "particles": list(self.snaps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"xi", "particles"} <= set(state):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state={keys} is invalid: a PersistentES state holds 'xi' and 'particles' "
                             "(what state_dict() returns)")
        xi, snaps = list(state["xi"]), list(state["particles"])
        if len(xi) != self.pairs or len(snaps) != 2 * self.pairs:
            raise ValueError(f"the state holds {len(xi)} pairs and {len(snaps)} particles; this PersistentES has "
                             f"pairs={self.pairs}")
        self.xi, self.snaps = [x.clone() for x in xi], snaps

    def __repr__(self) -> str:
        return f"PersistentES(pairs={self.pairs}, sigma={self.sigma:g})"


ESTIMATORS: dict[str, type[GradientEstimator]] = {
    c.name: c for c in (TruncatedBackprop, Surrogate, ES, PersistentES)}
"""``MetaConfig.method`` names and the estimator each stands for."""
