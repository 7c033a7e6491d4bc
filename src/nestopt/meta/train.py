r"""Meta-training update networks by truncated backpropagation through unrolled training.

For a task sampled from a family (:mod:`nestopt.tasks.families`), the inner loop trains the
task's model with the network's update, written functionally (``torch.func.functional_call``),
so the *meta-loss* — the mean over the unroll of ``log(L_t / L_0)`` (the seed's "sum of losses
along the trajectory", on a log scale, normalised by the task's starting loss) — is a
differentiable function of the network's weights ``Phi``. Every ``unroll`` inner steps the
meta-gradient is taken (truncated backpropagation), clipped, and applied by Adam; the inner
parameters and buffers are detached and carried on, and after ``horizon`` inner steps a new task
is sampled. ``second_order=False`` (default) treats each inner gradient as a constant (no
``create_graph``), the usual first-order truncation; ``True`` differentiates through it too.
``method="surrogate"`` trains instead on the research note's per-step surrogate (cosine to the
negative gradient plus a log-magnitude match to ``surrogate_lr``), the baseline it describes for
``DirectUpdateMLP``. ``method="es"`` estimates the meta-gradient by antithetic evolution
strategies (:func:`es_gradient`) instead of backpropagation. ``method="pes"`` is persistent ES
(Vicol et al. 2021, :class:`PersistentES`): each antithetic pair of particles keeps its own inner
run across truncations and the sum ``xi`` of the perturbations it has used since its task began,
so the per-truncation estimates add up to an unbiased estimate of the gradient of the whole
run's meta-loss (truncated ES and truncated backpropagation only see each truncation's own effect:
the short-horizon bias).

``workers > 1`` spreads the ES/PES unrolls (the particles) over that many processes; every unroll
is a deterministic function of its inputs, so the result does not depend on the worker count.

The loop writes a checkpoint (network, outer optimizer, counters, RNG) every ``checkpoint_every``
outer steps and resumes from one (a resumed run starts a fresh task).
"""

from __future__ import annotations

import copy
import io
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import tasks as task_registry
from .._checks import check_choice, check_int, check_number
from ..nets import UpdateNet


METHODS = ("tbptt", "surrogate", "es", "pes")


@dataclass
class MetaConfig:
    """Meta-training settings (see the module docstring)."""

    families: tuple[str, ...] = ("quadratic", "teacher-mlp")
    unroll: int = 10
    horizon: int = 100
    outer_steps: int = 200
    outer_lr: float = 3e-3
    clip: float = 1.0
    reg: float = 1e-4
    second_order: bool = False
    method: str = "tbptt"
    surrogate_lr: float = 1e-3
    es_sigma: float = 0.01
    es_pairs: int = 8
    checkpoint_every: int = 50
    workers: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for f in self.families:
            task_registry.family(f)  # KeyError naming the valid families
        check_int("unroll", self.unroll, lo=1)
        check_int("horizon", self.horizon, lo=self.unroll)
        check_int("outer_steps", self.outer_steps, lo=1)
        check_number("outer_lr", self.outer_lr, lo=0.0, lo_open=True)
        check_number("clip", self.clip, lo=0.0, lo_open=True)
        check_number("reg", self.reg, lo=0.0)
        check_int("checkpoint_every", self.checkpoint_every, lo=1)
        check_choice("method", self.method, METHODS)
        check_number("surrogate_lr", self.surrogate_lr, lo=0.0, lo_open=True)
        check_number("es_sigma", self.es_sigma, lo=0.0, lo_open=True)
        check_int("es_pairs", self.es_pairs, lo=1)
        check_int("workers", self.workers, lo=1)


class _Loss(nn.Module):
    """``task.loss(model, batch)`` as a module, so ``functional_call`` can swap in the parameters."""

    def __init__(self, task: Any, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


class _Inner:
    """One task's inner training run, carried across truncations."""

    def __init__(self, net: UpdateNet, family: str, seed: int) -> None:
        self.family, self.seed = family, seed
        self.task = task_registry.family(family).sample(seed)
        model = self.task.init(seed)
        self.module = _Loss(self.task, model)
        self.params = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
        self.state = {k: net.init_state(v) for k, v in self.params.items()}
        self.next_batch = self.task.sampler(seed)
        self.t = 0
        self.loss0: float | None = None
        self.name = getattr(self.task, "name", family)

    def surrogate(self, net: UpdateNet, steps: int, step_size: float) -> tuple[torch.Tensor, list[float]]:
        """The research note's surrogate for ``DirectUpdateMLP``: at each step, ``1 - cos(delta,
        -g)`` plus ``(log rms(delta) - log step_size)^2``, through that step's update only (no
        backpropagation through the trajectory); the inner run follows the network's own updates."""
        terms, losses = [], []
        for _ in range(steps):
            params = {k: v.requires_grad_() for k, v in self.params.items()}
            batch = self.next_batch(self.t)
            loss = functional_call(self.module, params, (batch,))
            if self.loss0 is None:
                self.loss0 = max(float(loss.detach()), 1e-12)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self.t += 1
            step_terms = []
            for (k, p), g in zip(params.items(), grads):
                g = torch.zeros_like(p) if g is None else g
                delta, self.state[k] = net.update(p.detach(), g, self.state[k], self.t)
                self.state[k] = {n: b.detach() for n, b in self.state[k].items()}
                cos = (delta.reshape(-1) @ -g.reshape(-1)) / (delta.norm() * g.norm() + 1e-12)
                mag = torch.log(delta.pow(2).mean().add(1e-30).sqrt()) - math.log(step_size)
                step_terms.append(1.0 - cos + mag * mag)
                self.params[k] = (p + delta).detach()
            terms.append(torch.stack(step_terms).mean())
            losses.append(float(loss.detach()))
        return torch.stack(terms).mean(), losses

    def draw(self, steps: int) -> list[Any]:
        """The next ``steps + 1`` batches, so several unrolls can see the same ones (ES pairs)."""
        return [self.next_batch(self.t + i) for i in range(steps + 1)]

    def snapshot(self) -> tuple[Any, ...]:
        return dict(self.params), {k: dict(v) for k, v in self.state.items()}, self.t, self.loss0

    def restore(self, snap: tuple[Any, ...]) -> None:
        params, state, self.t, self.loss0 = snap
        self.params = {k: v.detach() for k, v in params.items()}
        self.state = {k: dict(v) for k, v in state.items()}

    def unroll(self, net: UpdateNet, steps: int, second_order: bool, batches: list[Any] | None = None
               ) -> tuple[torch.Tensor, list[float]]:
        params = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        state = self.state
        terms, losses = [], []
        for j in range(steps):
            batch = batches[j] if batches is not None else self.next_batch(self.t)
            loss = functional_call(self.module, params, (batch,))
            if self.loss0 is None:
                self.loss0 = max(float(loss.detach()), 1e-12)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order,
                                        retain_graph=True, allow_unused=True)
            self.t += 1
            new_params, new_state = {}, {}
            for (k, p), g in zip(params.items(), grads):
                g = torch.zeros_like(p) if g is None else (g if second_order else g.detach())
                delta, new_state[k] = net.update(p, g, state[k], self.t)
                new_params[k] = p + delta
            params, state = new_params, new_state
            terms.append(torch.log(loss / self.loss0 + 1e-12))
            losses.append(float(loss.detach()))
        # the loss after the last update closes the unroll
        batch = batches[steps] if batches is not None else self.next_batch(self.t)
        last = functional_call(self.module, params, (batch,))
        terms.append(torch.log(last / self.loss0 + 1e-12))
        self.params = {k: v.detach() for k, v in params.items()}
        self.state = {k: {n: b.detach() for n, b in s.items()} for k, s in state.items()}
        return torch.stack(terms).mean(), losses


class _ControllerInner:
    """A task trained by ``NestedOptimizer(AdamW, signal="frozen", controller=net)``, one group per
    tensor, at a base rate drawn log-uniformly from ``CONTROLLER_LRS`` (1e-4 to 1) by the task's
    seed: rates far too small and far too large for every family, so a controller that helps
    across them has to correct in both directions. Same interface as :class:`_Inner` for ES and
    PES (its meta-loss is not differentiable in ``net``)."""

    def __init__(self, net: Any, family: str, seed: int) -> None:
        from ..optim.nested import NestedOptimizer

        self.family, self.seed = family, seed
        self.task = task_registry.family(family).sample(seed)
        self.model = self.task.init(seed)
        lo, hi = (math.log(x) for x in CONTROLLER_LRS)
        u = torch.rand((), generator=torch.Generator().manual_seed(seed + 1)).item()
        self.lr = math.exp(lo + (hi - lo) * u)
        self.opt = NestedOptimizer(self.model.parameters(), torch.optim.AdamW, controller=net, signal="frozen",
                                   features=net.features, per_tensor_groups=True, lr=self.lr)
        self.next_batch = self.task.sampler(seed)
        self.t = 0
        self.loss0: float | None = None
        self.name = f"{getattr(self.task, 'name', family)} lr {self.lr:.1e}"

    draw = _Inner.draw

    def snapshot(self) -> tuple[Any, ...]:
        return ({k: v.clone() for k, v in self.model.state_dict().items()}, _without_controller(self.opt.state_dict()),
                self.t, self.loss0)

    def restore(self, snap: tuple[Any, ...]) -> None:
        model, opt, self.t, self.loss0 = snap
        self.model.load_state_dict(model)
        weights = {k: v.clone() for k, v in self.opt.controller.state_dict().items()}
        opt = {**opt, "nested": {**opt["nested"], "controller": weights,
                                 "controller_opt": self.opt.controller_opt.state_dict()}}
        self.opt.load_state_dict(opt)  # the controller's weights are the ones set now, not the snapshot's

    def unroll(self, net: Any, steps: int, second_order: bool, batches: list[Any] | None = None
               ) -> tuple[torch.Tensor, list[float]]:
        if second_order:
            raise ValueError("a nested controller is meta-trained by ES or PES: its runs are not differentiable")
        terms, losses = [], []

        def loss_at(j: int) -> torch.Tensor:
            return self.task.loss(self.model, batches[j] if batches is not None else self.next_batch(self.t))

        for j in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = loss_at(j)
            if self.loss0 is None:
                self.loss0 = max(float(loss.detach()), 1e-12)
            loss.backward()
            self.opt.step(loss=loss)
            self.t += 1
            terms.append(math.log(float(loss.detach()) / self.loss0 + 1e-12))
            losses.append(float(loss.detach()))
        with torch.no_grad():
            last = float(loss_at(steps))
        terms.append(math.log(last / self.loss0 + 1e-12) if math.isfinite(last) else math.nan)
        return torch.tensor(sum(terms) / len(terms)), losses


CONTROLLER_LRS = (1e-4, 1.0)


def _without_controller(sd: dict[str, Any]) -> dict[str, Any]:
    nested = {k: v for k, v in sd["nested"].items() if k not in ("controller", "controller_opt")}
    return copy.deepcopy({**sd, "nested": nested})


def make_inner(net: Any, family: str, seed: int) -> _Inner | _ControllerInner:
    """The inner run a network is meta-trained on: an update network's own, or a nested optimizer's
    for a :class:`~nestopt.nets.Controller`."""
    from ..nets import Controller

    return _ControllerInner(net, family, seed) if isinstance(net, Controller) else _Inner(net, family, seed)


def _unroll_one(net: nn.Module, inner: _Inner | _ControllerInner, flat: torch.Tensor, snap: tuple[Any, ...], steps: int,
                batches: list[Any], keep_end: bool) -> tuple[float, list[float], tuple[Any, ...] | None]:
    """One unroll of ``inner`` from ``snap`` with the network's weights set to ``flat``; the end
    snapshot only when ``keep_end`` (persistent particles need it, plain ES does not)."""
    torch.nn.utils.vector_to_parameters(flat, list(net.parameters()))
    inner.restore(snap)
    meta_loss, losses = inner.unroll(net, steps, False, batches)
    return float(meta_loss.detach()), losses, inner.snapshot() if keep_end else None


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_WORKER_INNER: dict[tuple[str, int], _Inner | _ControllerInner] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _unroll_job(payload: bytes) -> bytes:
    """Worker side of :class:`Unrolls`: rebuilds the task once per (family, seed) and runs one unroll."""
    net, family, seed, flat, snap, steps, batches, keep_end = torch.load(io.BytesIO(payload), weights_only=False)
    inner = _WORKER_INNER.get((family, seed))
    if inner is None:
        _WORKER_INNER.clear()  # one task at a time
        inner = _WORKER_INNER[(family, seed)] = make_inner(net, family, seed)
    return _dump(_unroll_one(net, inner, flat, snap, steps, batches, keep_end))


class Unrolls:
    """Runs a batch of unrolls (weights, starting snapshot) of one task, in this process or spread
    over ``workers`` spawned processes (each one thread). Use as a context manager, or ``close()``."""

    def __init__(self, workers: int = 1) -> None:
        check_int("workers", workers, lo=1)
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None

    def run(self, net: nn.Module, inner: _Inner | _ControllerInner, specs: list[tuple[torch.Tensor, tuple[Any, ...]]], steps: int,
            batches: list[Any], keep_end: bool = True) -> list[tuple[float, list[float], tuple[Any, ...] | None]]:
        """``(meta_loss, losses, end snapshot or None)`` of each ``(flat weights, snapshot)`` in
        ``specs``. Leaves the network's weights as they were; ``inner`` ends in an unspecified snapshot."""
        params = list(net.parameters())
        base = torch.nn.utils.parameters_to_vector(params).detach().clone()
        try:
            if self.pool is None:
                return [_unroll_one(net, inner, f, s, steps, batches, keep_end) for f, s in specs]
            jobs = [_dump((net, inner.family, inner.seed, f, s, steps, batches, keep_end)) for f, s in specs]
            return [torch.load(io.BytesIO(r), weights_only=False) for r in self.pool.map(_unroll_job, jobs)]
        finally:
            torch.nn.utils.vector_to_parameters(base, params)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> Unrolls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def es_gradient(inner: _Inner | _ControllerInner, net: nn.Module, steps: int, sigma: float, pairs: int, gen: torch.Generator,
                batches: list[Any], unrolls: Unrolls | None = None) -> torch.Tensor:
    """Antithetic evolution-strategies estimate of d(meta-loss)/d(Phi) over one truncation:
    ``mean_i (L(Phi + e_i) - L(Phi - e_i)) / (2 sigma^2) e_i``, ``e_i ~ N(0, sigma^2)``, every
    unroll from the same inner state and on the same batches. Needs no backpropagation through
    the unroll, so its cost does not grow with the unroll's memory. Leaves ``inner`` and ``net``
    as they were."""
    snap = inner.snapshot()
    flat = torch.nn.utils.parameters_to_vector(list(net.parameters())).detach()
    eps = [torch.randn(flat.shape, generator=gen, dtype=flat.dtype) * sigma for _ in range(pairs)]
    specs = [(flat + sign * e, snap) for e in eps for sign in (1.0, -1.0)]
    try:
        results = (unrolls or Unrolls()).run(net, inner, specs, steps, batches, keep_end=False)
    finally:
        inner.restore(snap)
    grad = torch.zeros_like(flat)
    for j, e in enumerate(eps):
        plus, minus = results[2 * j][0], results[2 * j + 1][0]
        if math.isfinite(plus) and math.isfinite(minus):
            grad += (plus - minus) / (2 * sigma * sigma * pairs) * e
    return grad


class PersistentES:
    """Persistent evolution strategies over one task's inner run (Vicol et al. 2021).

    ``pairs`` antithetic pairs of particles start from the task's initial state; at each truncation
    pair ``j`` draws ``e_j ~ N(0, sigma^2)``, runs its particles with ``Phi + e_j`` and
    ``Phi - e_j`` from their own states, on the same batches, and adds ``e_j`` to its running sum
    ``xi_j``. The estimate ``sum_j xi_j (L_j^+ - L_j^-) / (2 sigma^2 pairs)`` credits each
    truncation's loss to every perturbation that shaped the particle's state, so the estimates
    summed over a run are unbiased for the gradient of the run's total meta-loss.
    """

    def __init__(self, net: nn.Module, family: str, seed: int, pairs: int) -> None:
        check_int("pairs", pairs, lo=1)
        self.inner = make_inner(net, family, seed)  # draws the batches; its snapshot starts every particle
        start = self.inner.snapshot()
        self.snaps = [start] * (2 * pairs)
        n = sum(p.numel() for p in net.parameters())
        self.xi = [torch.zeros(n) for _ in range(pairs)]
        self.name = self.inner.name

    @property
    def t(self) -> int:
        return self.inner.t

    def step(self, net: nn.Module, steps: int, sigma: float, gen: torch.Generator, unrolls: Unrolls | None = None
             ) -> tuple[torch.Tensor, float, list[float]] | None:
        """One truncation: ``(gradient estimate, mean meta-loss of the particles, the first particle's
        losses)``, or ``None`` when a particle's loss is not finite (the run has diverged)."""
        t0 = self.inner.t
        batches = self.inner.draw(steps)
        flat = torch.nn.utils.parameters_to_vector(list(net.parameters())).detach()
        pairs = len(self.xi)
        eps = [torch.randn(flat.shape, generator=gen, dtype=flat.dtype) * sigma for _ in range(pairs)]
        specs = [(flat + sign * e, self.snaps[2 * j + k]) for j, e in enumerate(eps)
                 for k, sign in enumerate((1.0, -1.0))]
        results = (unrolls or Unrolls()).run(net, self.inner, specs, steps, batches)
        self.inner.t = t0 + steps  # only its clock matters: every unroll restores its particle first
        vals = [r[0] for r in results]
        if not all(map(math.isfinite, vals)):
            return None
        self.snaps = [r[2] for r in results]
        grad = torch.zeros_like(flat)
        for j, e in enumerate(eps):
            self.xi[j] += e
            grad += (vals[2 * j] - vals[2 * j + 1]) / (2 * sigma * sigma * pairs) * self.xi[j]
        return grad, sum(vals) / len(vals), results[0][1]


def meta_train(net: nn.Module, cfg: MetaConfig, *, checkpoint: str | Path | None = None, resume: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Meta-train ``net`` in place; return the history (one row per outer step). ``net`` is an
    update network, or a nested optimizer's ``Controller`` (``method`` ``"es"`` or ``"pes"``)."""
    cfg.check()
    from ..nets import Controller

    if isinstance(net, Controller):
        if cfg.method not in ("es", "pes"):
            raise ValueError(f"method={cfg.method!r} is invalid for a nested controller: its training runs are "
                             "not differentiable; use 'es' or 'pes'")
        if net.features is None:
            raise ValueError("the controller needs its feature names (Controller(..., features=...)) to be meta-trained")
    outer = torch.optim.Adam(net.parameters(), lr=cfg.outer_lr)
    history: list[dict[str, Any]] = []
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        net.load_state_dict(saved["net"])
        outer.load_state_dict(saved["outer"])
        history, start = saved["history"], saved["step"]
        gen.set_state(saved["generator"])
    with Unrolls(cfg.workers if cfg.method in ("es", "pes") else 1) as unrolls:
        _loop(net, cfg, outer, history, start, gen, ckpt, progress, unrolls)
    return history


def _loop(net: nn.Module, cfg: MetaConfig, outer: torch.optim.Optimizer, history: list[dict[str, Any]], start: int,
          gen: torch.Generator, ckpt: Path | None, progress: Callable[[dict[str, Any]], None] | None,
          unrolls: Unrolls) -> None:
    inner: _Inner | _ControllerInner | PersistentES | None = None
    t0 = time.perf_counter()
    for step in range(start, cfg.outer_steps):
        if inner is None or inner.t >= cfg.horizon:
            family = cfg.families[int(torch.randint(len(cfg.families), (1,), generator=gen))]
            seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            inner = PersistentES(net, family, seed, cfg.es_pairs) if cfg.method == "pes" else make_inner(net, family, seed)
        outer.zero_grad(set_to_none=True)
        es_grad = None
        if isinstance(inner, PersistentES):
            out = inner.step(net, cfg.unroll, cfg.es_sigma, gen, unrolls)
            es_grad, value, losses = out if out is not None else (None, math.nan, [math.nan])
            meta_loss = torch.tensor(value)
        elif cfg.method == "surrogate":
            meta_loss, losses = inner.surrogate(net, cfg.unroll, cfg.surrogate_lr)
        elif cfg.method == "es":
            batches = inner.draw(cfg.unroll)
            es_grad = es_gradient(inner, net, cfg.unroll, cfg.es_sigma, cfg.es_pairs, gen, batches, unrolls)
            meta_loss, losses = inner.unroll(net, cfg.unroll, False, batches)  # advance with Phi itself
            meta_loss = meta_loss.detach()  # the ES estimate replaces backpropagation
        else:
            meta_loss, losses = inner.unroll(net, cfg.unroll, cfg.second_order)
        reg = cfg.reg * sum((p * p).sum() for p in net.parameters())
        total = meta_loss + reg
        row = {"step": step + 1, "task": inner.name, "inner_t": inner.t, "meta_loss": float(meta_loss.detach()),
               "last_loss": losses[-1], "time_s": time.perf_counter() - t0, "skipped": False}
        if torch.isfinite(total):
            if total.requires_grad:  # (with reg 0, an ES step has nothing to backpropagate)
                total.backward()
            if es_grad is not None:
                offset = 0
                for p in net.parameters():
                    n = p.numel()
                    g = es_grad[offset:offset + n].view_as(p)
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)
                    offset += n
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)) if grads else 0.0
            if math.isfinite(norm):
                outer.step()
            else:
                row["skipped"] = True
            row["grad_norm"] = norm
        else:  # a diverging inner run: drop it and start a new task
            row["skipped"] = True
            inner = None
        history.append(row)
        if progress is not None:
            progress(row)
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.outer_steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"net": net.state_dict(), "outer": outer.state_dict(), "history": history, "step": step + 1,
                        "generator": gen.get_state(), "config": json.dumps(asdict(cfg))}, ckpt)
