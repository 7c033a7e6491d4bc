r"""Polyak step sizes: ``p <- p - lr * eta * u`` with ``eta`` set so the first-order model of the
loss drops exactly to the target value ``f_star``.

With direction ``u`` and gradient ``g`` the linear model predicts a decrease of ``eta * g^T u``, so

.. math::  \eta = \frac{f(p) - f^\star}{g^\top u}

- ``u = g`` gives the classical rule ``eta = (f - f*) / ||g||^2`` (``precondition=None``);
- ``u = D^{-1} g`` gives the diagonally preconditioned step ``(f - f*) D^{-1} g / (g^T D^{-1} g)``
  with ``D`` the root of a squared-gradient average (``"rms"``), a Hutchinson estimate of the
  Hessian diagonal (``"hutchinson"``), or a function returning it (for known curvature);
- :class:`PolyakAdam` uses Adam's direction ``u = m_hat / (sqrt(v_hat) + eps)`` with the Polyak
  magnitude (the hybrid).

**Scope** says how many step sizes there are. ``"global"`` is one ``eta`` for all parameters (the
research note's rule). ``"tensor"`` and ``"group"`` split the parameters into pieces (tensors, or
param groups, which is how a user expresses layers) with one ``eta_i`` each. Giving every piece
the *whole* gap, as the note's fix does, makes the linear model predict a drop of ``k (f - f*)``
for ``k`` pieces: a ``k``-fold overshoot of the target. So the gap is *shared*:
``eta_i = w_i (f - f*) / s_i`` with ``s_i = g_i^T u_i`` and ``sum_i w_i = 1``, which keeps the
predicted drop at exactly ``f - f*``. Shares (``share=``):

- ``"norm"`` (default): ``w_i`` proportional to ``sqrt(s_i)`` (``||g_i||`` for ``u = g``). Each
  piece's step length becomes ``(f - f*) / sum_j ||g_j||``, independent of its own gradient
  scale, so a piece with a small gradient is not starved. Measured: see ``nestopt study polyak``.
- ``"equal"``: ``w_i = 1/k``;
- ``"whole"``: ``w_i = 1`` (the note's per-tensor fix; overshoots ``k``-fold, kept for the study);
- ``"global"``: ``w_i`` proportional to ``s_i``, which reproduces the global rule.

**Safety.** A non-finite loss or gradient, a zero gradient (``s = 0``), or a loss at or below
``f_star`` takes no step and leaves every parameter and buffer untouched. Steps and skips are
counted as every nestopt optimizer counts them (:mod:`nestopt.optim.counters`), whole-optimizer:
``group["counters"]`` holds ``steps``, ``nonfinite``, ``zero_grad`` and ``at_target``, the same in
every group, and ``opt.counters`` reads them; the last step size of each group is
``group["polyak"]["eta"]``. ``max_lr`` caps ``eta`` (the rule has no cap of its own: with
``f_star`` below the true minimum it grows without bound as the gradient vanishes).

Usage::

    opt = Polyak(model.parameters())                   # lr is a multiplier, default 1
    def closure():
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
    opt.step(closure)                                   # or: loss.backward(); opt.step(loss=loss)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._checks import check_choice, check_int, check_number
from .base import NestoptOptimizer, refuse_sparse
from .counters import bump
from .groups import LR_MAX, integer, number, pair
from .distributed import local, sq_norms, sum_partials, sync_of
from .transaction import commit, evaluate

SCOPES = ("global", "tensor", "group")
SHARES = ("norm", "equal", "whole", "global")
PRECONDITIONS = (None, "rms", "hutchinson")

DiagFn = Callable[[torch.Tensor], torch.Tensor]


_LEGACY = ("steps", "nonfinite", "zero_grad", "at_target")  # what group["polyak"] counted before


class Polyak(NestoptOptimizer):
    """Polyak step size optimizer (see the module docstring for the update).

    Args:
        params: parameters or param-group dicts.
        lr: multiplier on the Polyak step (1 = the rule itself); what a scheduler drives.
        scope: ``"global"``, ``"tensor"`` or ``"group"``: one step size in all, per tensor, or per group.
        share: how pieces share the loss gap when ``scope`` is not global: ``"norm"``, ``"equal"``,
            ``"whole"`` or ``"global"``.
        f_star: the loss value aimed at (a lower bound on the loss; 0 for non-negative losses).
        max_lr: cap on ``eta`` (``None``: no cap).
        eps: added to ``g^T u`` in the denominator (0 keeps the rule exact).
        momentum: heavy-ball coefficient on the step, in ``[0, 1)``.
        precondition: ``None``, ``"rms"``, ``"hutchinson"``, or a function mapping a parameter
            to its diagonal ``D`` (same shape; used by magnitude).
        beta2: averaging coefficient for the ``"rms"`` and ``"hutchinson"`` diagonals (bias-corrected).
        precond_eps: added to ``D``.
        seed: seeds the Hutchinson probe vectors (they are a function of seed and step).
        process_group: ``"auto"``, ``None`` or a ``ProcessGroup``: over which ranks the loss is
            averaged and sharded norms are summed (:mod:`nestopt.optim.distributed`).

    ``"hutchinson"`` needs Hessian-vector products, so the closure must call
    ``loss.backward(create_graph=True)``; it draws one Rademacher vector per step (exact when the
    Hessian is diagonal, since then ``z * (H z) = diag(H)``). Negative
    curvature estimates are used by magnitude (``|D|``).
    """

    counter_reasons = ("zero_grad", "at_target")  # whole-optimizer counts (module docstring)
    needs_loss = True  # step() needs the loss: a closure or loss=
    unsupported_why = {"complex": "its preconditioner reads g * g, which is not |g|^2 for complex g",
                       "float16": "precond_eps underflows and the preconditioned dot product overflows in float16"}
    group_spec = {"lr": number(0.0, LR_MAX), "f_star": number(), "max_lr": number(0.0, lo_open=True, optional=True),
                  "eps": number(0.0), "momentum": number(0.0, 1.0, hi_open=True),
                  "beta2": number(0.0, 1.0, hi_open=True), "precond_eps": number(0.0), "seed": integer(0)}

    def __init__(self, params: Iterable[Any], lr: float = 1.0, *, scope: str = "global", share: str = "norm",
                 f_star: float = 0.0, max_lr: float | None = None, eps: float = 0.0, momentum: float = 0.0,
                 precondition: str | DiagFn | None = None, beta2: float = 0.999, precond_eps: float = 1e-8,
                 seed: int = 0, process_group: Any = "auto") -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        check_choice("scope", scope, SCOPES)
        check_choice("share", share, SHARES)
        check_number("f_star", f_star)
        if max_lr is not None:
            check_number("max_lr", max_lr, lo=0.0, lo_open=True)
        check_number("eps", eps, lo=0.0)
        check_number("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        if not callable(precondition):
            check_choice("precondition", precondition, PRECONDITIONS)
        check_number("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
        check_number("precond_eps", precond_eps, lo=0.0)
        check_int("seed", seed, lo=0)
        self.scope = scope
        self.share = share
        self.precondition = precondition
        self.process_group = process_group
        defaults = {"lr": lr, "f_star": f_star, "max_lr": max_lr, "eps": eps, "momentum": momentum,
                    "beta2": beta2, "precond_eps": precond_eps, "seed": seed}
        super().__init__(params, defaults)

    def supported(self) -> frozenset[str]:
        # the plain rule reads only ||g||^2 (right for complex g); a preconditioner does not
        if self.precondition is None:
            return frozenset({"float16", "bfloat16", "complex"})
        return frozenset({"bfloat16"})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("polyak", {"eta": 0.0})

    @classmethod
    def _migrate_group(cls, group: dict[str, Any]) -> None:
        # before the counters convention, group["polyak"] held the counts next to eta
        old = group.get("polyak")
        if not isinstance(old, dict):
            group["polyak"] = {"eta": 0.0}
            return
        if "counters" not in group:
            group["counters"] = {k: int(old[k]) for k in _LEGACY if k in old}
        group["polyak"] = {"eta": float(old.get("eta", 0.0))}

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups: keep the configuration too, so a
        # deepcopy or an unpickled optimizer can step
        return {**super().__getstate__(), "scope": self.scope, "share": self.share,
                "precondition": self.precondition}

    # -- helpers --------------------------------------------------------------------------------
    def _directions(self, items: list[tuple[dict[str, Any], torch.Tensor]], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``u`` for each item (updates running statistics; only called on a step taken)."""
        pre = self.precondition
        if callable(pre):
            return [g / (pre(p).abs() + group["precond_eps"]) for (group, p), g in zip(items, grads)]
        hvps: list[torch.Tensor] = []
        if pre == "hutchinson":  # one pass for all groups: they share one graph
            params = [p for _, p in items]
            step = self.state[params[0]].get("diag_step", 0) + 1
            hvps = self._hvps(params, grads, step, items[0][0]["seed"])
        commit(self)  # the running statistics update in place from here
        out: list[torch.Tensor] = [grads[0]] * len(items)
        for group, idx in _by_group(items, range(len(items))):
            ps = [items[i][1] for i in idx]
            gs = [grads[i] for i in idx]
            for p in ps:
                st = self.state[p]
                if "diag" not in st:
                    st["diag"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["diag_step"] = 0
                st["diag_step"] += 1
            diags = [self.state[p]["diag"] for p in ps]
            beta2 = group["beta2"]
            torch._foreach_mul_(diags, beta2)
            if pre == "rms":
                torch._foreach_addcmul_(diags, gs, gs, value=1 - beta2)
            else:
                torch._foreach_add_(diags, [hvps[i] for i in idx], alpha=1 - beta2)
            denom = torch._foreach_div(diags, [1 - beta2 ** self.state[p]["diag_step"] for p in ps])
            if pre == "rms":
                torch._foreach_sqrt_(denom)
            else:  # negative curvature estimates are used by magnitude
                torch._foreach_abs_(denom)
            torch._foreach_add_(denom, group["precond_eps"])
            for i, u in zip(idx, torch._foreach_div(gs, denom)):
                out[i] = u
        return out

    def _hvps(self, params: list[torch.Tensor], grads: list[torch.Tensor], step: int, seed: int) -> list[torch.Tensor]:
        if not all(g.requires_grad for g in grads):
            raise RuntimeError("precondition='hutchinson' needs Hessian-vector products: the closure must call "
                               "loss.backward(create_graph=True)")
        # Probe vectors are a pure function of (seed, step, position): no RNG state to checkpoint,
        # and a run resumed from a state_dict draws the same probes as an uninterrupted one.
        zs = []
        for i, g in enumerate(grads):
            gen = torch.Generator(device=g.device)
            gen.manual_seed((seed * 1_000_003 + step * 8_191 + i) % (2**63 - 1))
            z = torch.randint(0, 2, g.shape, generator=gen, device=g.device).to(g.dtype)
            zs.append(z.mul_(2).sub_(1))
        with torch.enable_grad():
            hv = torch.autograd.grad(grads, params, zs, allow_unused=True)
        return [z * (h if h is not None else torch.zeros_like(z)) for z, h in zip(zs, hv)]

    def _pieces(self, items: list[tuple[dict[str, Any], torch.Tensor]]) -> list[list[int]]:
        """Indices into ``items`` of each piece that gets its own step size."""
        if self.scope == "global":
            return [list(range(len(items)))]
        if self.scope == "tensor":
            return [[i] for i in range(len(items))]
        return [idx for _, idx in _by_group(items, range(len(items)))]

    def _shares(self, s: list[float]) -> list[float]:
        k = len(s)
        if self.scope == "global" or k == 1:
            return [1.0] * k
        if self.share == "whole":
            return [1.0] * k
        if self.share == "equal":
            return [1.0 / k] * k
        if self.share == "global":
            tot = sum(s)
            # no piece descends (or one is not finite): every share 0, so no piece steps
            return [x / tot for x in s] if math.isfinite(tot) and tot > 0 else [0.0] * k
        roots = [math.sqrt(max(x, 0.0)) for x in s]
        tot = sum(roots)
        return [r / tot for r in roots] if math.isfinite(tot) and tot > 0 else [0.0] * k

    def _init_state(self, items: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        """The state a first step makes, as zeros (a step then reads it as it reads its own)."""
        for group, p in items:
            st = self.state[p]
            if group["momentum"] > 0 and "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.precondition in ("rms", "hutchinson") and "diag" not in st:
                st["diag"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["diag_step"] = 0

    def _count(self, key: str) -> None:
        bump(self.param_groups, key)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, loss: torch.Tensor | float | None = None):
        """One Polyak step. Needs the loss: ``step(closure)``, ``step(loss=...)`` after ``backward``,
        or :meth:`observe_loss` for each micro-batch (whose mean then wins over the closure's value).

        Without either, a step whose gradients are all ``None`` does nothing (as torch's optimizers
        do), and one whose gradients are all zero only makes the state a step would make (what
        torch's distributed-checkpoint helpers ask of a fresh optimizer); otherwise it raises."""
        if self.precondition == "hutchinson" and sync_of(self) is not None:
            raise NotImplementedError(
                "Polyak(precondition='hutchinson') cannot run data-parallel: it needs loss.backward(create_graph=True), "
                "which DDP does not synchronise (torch refuses it) and FSDP2 does not support; use precondition='rms', "
                "or process_group=None for one optimizer per rank")
        if closure is not None:
            loss = evaluate(self, closure)
        # micro-batch losses recorded since the last step (taken after the closure, whose backward
        # may record the last of them): their mean is the loss the rule reads
        observed = self.take_observed_loss()
        if loss is None and observed is None:
            have = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not have:
                return None
            if not any(bool(local(p.grad).any()) for _, p in have):
                self._init_state(have)
                return None
            raise ValueError(f"{type(self).__name__}.step needs the loss: call step(closure) or step(loss=value)")
        items = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        refuse_sparse(self, [p.grad for _, p in items])
        if items:
            self._step(items, observed if observed is not None else loss)  # type: ignore[arg-type]
        return loss

    def _group_telemetry(self) -> dict[str, list[float]]:
        return {**super()._group_telemetry(), "eta": [float(g["polyak"]["eta"]) for g in self.param_groups]}

    def _step(self, items: list[tuple[dict[str, Any], torch.Tensor]], loss: torch.Tensor | float) -> None:
        grads = [p.grad for _, p in items]
        # ||g_p||^2: one read of the gradients, one host sync (and over several ranks one
        # collective: the loss averaged, sharded norms summed; see nestopt.optim.distributed)
        sq_v, (loss_v,) = sq_norms(self, grads, loss)
        group0 = items[0][0]
        if not (math.isfinite(loss_v) and all(map(math.isfinite, sq_v))):
            return self._count("nonfinite")
        if loss_v <= group0["f_star"]:
            return self._count("at_target")
        total = sum(sq_v)
        if total == 0.0:
            return self._count("zero_grad")
        plain = self.precondition is None and type(self)._directions is Polyak._directions
        gap = loss_v - group0["f_star"]
        if plain and group0 is items[-1][0] and self.scope != "tensor" and group0["momentum"] == 0:
            # The common case (u = g, one step size, no momentum) as one update (see below for the
            # order): measured 0.1-0.4 ms less than the general path on 10M floats (CPU).
            eta = _eta(group0, 1.0, gap, total)
            if eta is None:  # gap / ||g||^2 overflowed: a step of infinite size is not taken
                return self._count("nonfinite")
            commit(self)
            torch._foreach_add_([p for _, p in reversed(items)], grads[::-1], alpha=-group0["lr"] * eta)
            group0["polyak"]["eta"] = eta
            return self._count("steps")
        if plain:
            us, s_p = grads, sq_v  # u = g, so g^T u = ||g||^2, already on the host
        else:
            us = self._directions(items, grads)
            s_p = sum_partials(self, torch.stack([torch.dot(local(g).reshape(-1), local(u).reshape(-1)).to(torch.float64)
                                                  for g, u in zip(grads, us)]), grads).tolist()
        commit(self)  # (the directions may have begun it: they update running statistics)
        pieces = self._pieces(items)
        s = [sum(s_p[i] for i in piece) for piece in pieces]
        shares = self._shares(s)
        stepped = False
        for piece, s_i, w_i in reversed(list(zip(pieces, s, shares))):  # reversed: see below
            eta_i = _eta(items[piece[0]][0], w_i, gap, s_i)
            stepped = stepped or eta_i is not None
            eta = 0.0 if eta_i is None else eta_i
            for group, idx in _by_group(items, piece):
                # Updates run in the reverse order of the norm pass, so the gradients read last
                # (still in cache) are used first: measured 6.5 vs 6.9 ms on 10M floats (CPU).
                ps = [items[i][1] for i in reversed(idx)]
                ds = [us[i] for i in reversed(idx)]
                if group["momentum"] > 0:
                    bufs = []
                    for p in ps:
                        st = self.state[p]
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        bufs.append(st["momentum_buffer"])
                    torch._foreach_mul_(bufs, group["momentum"])
                    if eta != 0.0:
                        torch._foreach_add_(bufs, ds, alpha=eta)
                    torch._foreach_add_(ps, bufs, alpha=-group["lr"])
                elif eta != 0.0:
                    torch._foreach_add_(ps, ds, alpha=-group["lr"] * eta)
                group["polyak"]["eta"] = eta
        if not stepped:
            return self._count("zero_grad")
        self._count("steps")


_STEP_MAX = 1e38  # float32's largest is 3.4e38


def _eta(group: dict[str, Any], w: float, gap: float, s: float) -> float | None:
    """The step size of a piece with share ``w`` of the loss gap and ``s = g^T u``, capped at the
    group's ``max_lr``; ``None`` (no step) where ``s + eps`` is not a positive finite number."""
    eps = group["eps"]
    if not (math.isfinite(s) and s + eps > 0.0):
        return None
    eta = w * gap / (s + eps)
    # a share of 0, or a step that overflows: eta itself, times the rate, or a step whose length
    # (lr eta ||g|| for u = g) would leave float32's range (an f_star of -7.5e38 made one)
    if not (math.isfinite(eta) and eta > 0.0 and eta * group["lr"] * math.sqrt(s + eps) < _STEP_MAX):
        return None
    cap = group["max_lr"]
    return eta if cap is None else min(eta, cap)


def _by_group(items: list[tuple[dict[str, Any], torch.Tensor]], idx: Iterable[int]) -> list[tuple[dict[str, Any], list[int]]]:
    """``idx`` split by param group, in order."""
    if items and items[0][0] is items[-1][0]:  # one group (the common case): no split needed
        return [(items[0][0], list(idx))]
    out: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for i in idx:
        g = items[i][0]
        out.setdefault(id(g), (g, []))[1].append(i)
    return list(out.values())


class PolyakAdam(Polyak):
    """The hybrid: Adam's direction ``m_hat / (sqrt(v_hat) + eps_adam)`` with the Polyak magnitude
    ``eta = (f - f*) / (g^T u)``. A piece whose direction does not descend (``g^T u <= 0``, possible
    early with momentum) takes no step that iteration, while its moments still update.

    Args: as :class:`Polyak` (no ``precondition``, no ``momentum``: the first moment is Adam's),
    plus ``betas`` and ``adam_eps``.
    """

    group_spec = {**Polyak.group_spec, "betas": pair(0.0, 1.0), "adam_eps": number(0.0, lo_open=True)}
    unsupported_why = {"complex": "Adam's second moment reads g * g, which is not |g|^2 for complex g",
                       "bfloat16": "the pieces' g . u lose their digits in bfloat16 and the Polyak step size "
                                   "blows up",
                       "float16": "adam_eps (1e-8) rounds to 0 in float16, so a gradient element that is exactly 0 "
                                  "gives 0/0 = NaN"}

    def supported(self) -> frozenset[str]:
        # in bfloat16 the pieces' g . u cancel to near 0 and eta blows up (measured: the loss diverges
        # where float32's falls), so only float32 and float64
        return frozenset()

    def __init__(self, params: Iterable[Any], lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, **kwargs: Any) -> None:
        for bad in ("precondition", "momentum"):
            if bad in kwargs:
                raise ValueError(f"{bad}={kwargs[bad]!r} is invalid for PolyakAdam: its direction is Adam's")
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        check_number("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
        check_number("adam_eps", adam_eps, lo=0.0, lo_open=True)
        self._adam_defaults = {"betas": tuple(betas), "adam_eps": adam_eps}
        super().__init__(params, lr, **kwargs)
        self.defaults.update(self._adam_defaults)
        del self._adam_defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch fills a group's missing keys from ``defaults``; during __init__ they are not there yet
        for k, v in self.__dict__.get("_adam_defaults", {}).items():
            param_group.setdefault(k, v)
        super().add_param_group(param_group)

    def _init_state(self, items: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        for _, p in items:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["adam_step"] = 0

    def _directions(self, items: list[tuple[dict[str, Any], torch.Tensor]], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        commit(self)  # the moments update in place from here
        out: list[torch.Tensor] = [grads[0]] * len(items)
        for group, idx in _by_group(items, range(len(items))):
            b1, b2 = group["betas"]
            ps = [items[i][1] for i in idx]
            gs = [grads[i] for i in idx]
            for p in ps:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["adam_step"] = 0
                st["adam_step"] += 1
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            steps = [self.state[p]["adam_step"] for p in ps]
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            denom = torch._foreach_div(vs, [1 - b2**t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["adam_eps"])
            us = torch._foreach_div(ms, denom)
            torch._foreach_div_(us, [1 - b1**t for t in steps])
            for i, u in zip(idx, us):
                out[i] = u
        return out
