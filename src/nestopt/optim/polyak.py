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
from .counters import outcome
from .distributed import local, sq_norms, sum_partials, sync_of
from .tensors import device_sq_norms, masked_sub_, pick
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
        capturable: ``None`` (on for CUDA parameters), ``True`` or ``False``: the step with no host
            read (:mod:`nestopt.optim.base`): ``eta``, the skip decisions and the counts stay on
            the device, a skipped step is masked there (torch's fused SGD kernel with a tensor
            rate and ``found_inf``), and ``group["polyak"]["eta"]`` is written back when read
            (``opt.telemetry()``, ``state_dict()``, ``opt.sync_host()``). Not with
            ``precondition="hutchinson"``, whose probe vectors are seeded by the host's count of
            steps taken.

    ``"hutchinson"`` needs Hessian-vector products, so the closure must call
    ``loss.backward(create_graph=True)``; it draws one Rademacher vector per step (exact when the
    Hessian is diagonal, since then ``z * (H z) = diag(H)``). Negative
    curvature estimates are used by magnitude (``|D|``).
    """

    counter_reasons = ("zero_grad", "at_target")  # whole-optimizer counts (module docstring)
    live_keys = ((("polyak", "eta"), 0.0),)  # what a capturable step keeps on the device
    needs_loss = True  # step() needs the loss: a closure or loss=
    unsupported_why = {"complex": "its preconditioner reads g * g, which is not |g|^2 for complex g",
                       "float16": "precond_eps underflows and the preconditioned dot product overflows in float16"}
    group_spec = {"lr": number(0.0, LR_MAX), "f_star": number(), "max_lr": number(0.0, lo_open=True, optional=True),
                  "eps": number(0.0), "momentum": number(0.0, 1.0, hi_open=True),
                  "beta2": number(0.0, 1.0, hi_open=True), "precond_eps": number(0.0), "seed": integer(0)}

    def __init__(self, params: Iterable[Any], lr: float = 1.0, *, scope: str = "global", share: str = "norm",
                 f_star: float = 0.0, max_lr: float | None = None, eps: float = 0.0, momentum: float = 0.0,
                 precondition: str | DiagFn | None = None, beta2: float = 0.999, precond_eps: float = 1e-8,
                 seed: int = 0, process_group: Any = "auto", capturable: bool | None = None) -> None:
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
        self.capturable = capturable  # (checked first: what follows reads it)
        if capturable and precondition == "hutchinson":
            raise ValueError("capturable=True is invalid with precondition='hutchinson': its probe vectors are seeded "
                             "by the number of steps taken, a host count; use precondition='rms' or capturable=False")
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
        # (the Hutchinson probes need the host's count: capturable=None keeps the host step for them)
        if not (self.precondition == "hutchinson" and self.capturable is None) and self.on_device([items[0][1]]):
            if self.precondition == "hutchinson":
                raise ValueError("capturable=True is invalid with precondition='hutchinson' (see Polyak's docstring): "
                                 "set opt.capturable = False")
            return self._step_device(items, loss)
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


    # -- the capturable step: the same rule as tensors on the device, masked, no host read ----------
    def _step_device(self, items: list[tuple[dict[str, Any], torch.Tensor]], loss: torch.Tensor | float) -> None:
        grads = [p.grad for _, p in items]
        dev = grads[0].device
        sq = device_sq_norms(grads)
        lv = (loss.detach().reshape(()).to(dev, torch.float64) if torch.is_tensor(loss)
              else torch.tensor(float(loss), dtype=torch.float64, device=dev))
        group0 = items[0][0]
        finite = torch.isfinite(lv) & torch.isfinite(sq).all()
        at = lv <= group0["f_star"]
        total = sq.sum()
        zero = total == 0.0
        gap = lv - group0["f_star"]
        live = self.live(dev)
        gidx = {id(g): i for i, g in enumerate(self.param_groups)}
        keys = self.count_keys()
        plain = self.precondition is None and type(self)._directions is Polyak._directions
        if plain and group0 is items[-1][0] and self.scope != "tensor" and group0["momentum"] == 0:
            eta, valid = _eta_device(group0, 1.0, gap, total)
            ok = finite & ~at & ~zero & valid
            commit(self)
            masked_sub_([p for _, p in reversed(items)], grads[::-1], eta * group0["lr"], ~ok)
            i = gidx[id(group0)]
            live[0, i] = torch.where(ok, eta, live[0, i])
            self._count_on_device(outcome(keys, [("nonfinite", ~finite), ("at_target", at), ("zero_grad", zero),
                                                 ("nonfinite", ~valid)], "steps"))
            return
        go = finite & ~at & ~zero  # the checks passed: the direction's statistics update
        if plain:
            us, s_p = grads, sq
        else:
            safe = [torch.where(go, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g in grads]
            us = self._directions_device(items, safe, go)
            s_p = torch.stack([torch.dot(g.reshape(-1), u.reshape(-1)).to(torch.float64) for g, u in zip(safe, us)])
        commit(self)
        pieces = self._pieces(items)
        s = torch.stack([s_p[piece[0]:piece[-1] + 1].sum() for piece in pieces])  # (pieces are runs of items)
        shares = self._shares_device(s)
        stepped = torch.zeros((), dtype=torch.bool, device=dev)
        for j in reversed(range(len(pieces))):
            piece = pieces[j]
            eta_i, valid_i = _eta_device(items[piece[0]][0], shares[j], gap, s[j])
            take = go & valid_i
            stepped = stepped | valid_i
            for group, idx in _by_group(items, piece):
                ps = [items[i][1] for i in reversed(idx)]
                ds = [us[i] for i in reversed(idx)]
                if group["momentum"] > 0:
                    bufs = []
                    for p in ps:
                        st = self.state[p]
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        bufs.append(st["momentum_buffer"])
                    torch._foreach_mul_(bufs, pick(go, group["momentum"], 1.0, bufs[0]))
                    masked_sub_(bufs, ds, -eta_i, ~take)
                    masked_sub_(ps, bufs, torch.full_like(eta_i, group["lr"]), ~go)
                else:
                    masked_sub_(ps, ds, eta_i * group["lr"], ~take)
                i = gidx[id(group)]
                live[0, i] = torch.where(go, torch.where(valid_i, eta_i, 0.0), live[0, i])
        self._count_on_device(outcome(keys, [("nonfinite", ~finite), ("at_target", at), ("zero_grad", zero),
                                             ("zero_grad", ~stepped)], "steps"))

    def _shares_device(self, s: torch.Tensor) -> torch.Tensor:
        """:meth:`_shares` on the device."""
        k = s.numel()
        if self.scope == "global" or k == 1 or self.share == "whole":
            return torch.ones_like(s)
        if self.share == "equal":
            return torch.full_like(s, 1.0 / k)
        x = s if self.share == "global" else torch.sqrt(torch.clamp(s, min=0.0))
        tot = x.sum()
        good = torch.isfinite(tot) & (tot > 0)
        return torch.where(good, x / torch.where(good, tot, 1.0), 0.0)

    def _device_steps(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """The per-parameter step count ``state[p][key]`` as an int64 tensor on ``p``'s device, kept
        in the state while capturable (as torch's capturable optimizers keep ``state["step"]``)."""
        st = self.state[p]
        t = st.get(key, 0)
        if not torch.is_tensor(t) or t.device != p.device:
            t = st[key] = torch.tensor(int(t), dtype=torch.int64).to(p.device)
        return t

    def _advance(self, ps: list[torch.Tensor], key: str, go: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's device step count ``key``, one up where ``go`` holds (in place)."""
        steps = [self._device_steps(p, key) for p in ps]
        taken = go.to(torch.int64)
        for t in steps:
            t.add_(taken)
        return steps

    def _drop_device(self) -> None:
        super()._drop_device()
        for st in self.__dict__.get("state", {}).values():  # the host step counts in Python ints
            for key in ("diag_step", "adam_step"):
                if torch.is_tensor(st.get(key)):
                    st[key] = int(st[key])

    def _directions_device(self, items: list[tuple[dict[str, Any], torch.Tensor]], grads: list[torch.Tensor],
                           go: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_directions` on the device: the statistics advance only where ``go`` holds
        (``grads`` are zero elsewhere)."""
        pre = self.precondition
        if callable(pre):
            return [g / (pre(p).abs() + group["precond_eps"]) for (group, p), g in zip(items, grads)]
        commit(self)
        out: list[torch.Tensor] = [grads[0]] * len(items)
        for group, idx in _by_group(items, range(len(items))):
            ps = [items[i][1] for i in idx]
            gs = [grads[i] for i in idx]
            self._init_state([(group, p) for p in ps])
            steps = self._advance(ps, "diag_step", go)
            diags = [self.state[p]["diag"] for p in ps]
            beta2 = group["beta2"]
            torch._foreach_mul_(diags, pick(go, beta2, 1.0, diags[0]))
            torch._foreach_addcmul_(diags, gs, gs, value=1 - beta2)
            denom = [d / (1 - beta2 ** t.double()) for d, t in zip(diags, steps)]
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["precond_eps"])
            for i, u in zip(idx, torch._foreach_div(gs, denom)):
                out[i] = u
        return out


_STEP_MAX = 1e38  # float32's largest is 3.4e38


def _eta_device(group: dict[str, Any], w: torch.Tensor | float, gap: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_eta` on the device: ``(eta, valid)`` with ``eta`` 0 where it is not valid."""
    se = s + group["eps"]
    eta = w * gap / se
    valid = torch.isfinite(s) & (se > 0.0) & torch.isfinite(eta) & (eta > 0.0) & \
        (eta * group["lr"] * torch.sqrt(torch.clamp(se, min=0.0)) < _STEP_MAX)
    cap = group["max_lr"]
    if cap is not None:
        eta = torch.clamp(eta, max=cap)
    return torch.where(valid, eta, 0.0), valid


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

    def _directions_device(self, items: list[tuple[dict[str, Any], torch.Tensor]], grads: list[torch.Tensor],
                           go: torch.Tensor) -> list[torch.Tensor]:
        commit(self)
        out: list[torch.Tensor] = [grads[0]] * len(items)
        for group, idx in _by_group(items, range(len(items))):
            b1, b2 = group["betas"]
            ps = [items[i][1] for i in idx]
            gs = [grads[i] for i in idx]
            self._init_state([(group, p) for p in ps])
            steps = self._advance(ps, "adam_step", go)
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            w1 = pick(go, 1 - b1, 0.0, ms[0])
            for m, g in zip(ms, gs):
                m.lerp_(g, w1)
            torch._foreach_mul_(vs, torch.where(go, b2, 1.0).to(vs[0].dtype))
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            ts = [t.double() for t in steps]
            denom = [v / (1 - b2**t) for v, t in zip(vs, ts)]
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["adam_eps"])
            us = torch._foreach_div(ms, denom)
            us = [u / (1 - b1**t) for u, t in zip(us, ts)]
            for i, u in zip(idx, us):
                out[i] = u
        return out

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
