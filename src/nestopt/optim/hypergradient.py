r"""Hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation with hypergradient
descent"): the learning rate follows the derivative of the loss with respect to itself.

After an update ``p_t = p_{t-1} - a u_{t-1}``, the derivative of ``f(p_t)`` with respect to the
rate ``a`` is ``-g_t . u_{t-1}``: successive gradients that agree (positive dot product) say the
step was too short, ones that disagree say it overshot. Two rules for the rate:

- ``"multiplicative"`` (default): ``s <- s (1 + beta cos(g_t, u_{t-1}))``, which is scale-free:
  the same ``beta`` works whatever the size of the gradients (the paper's normalised variant);
- ``"additive"``: ``s <- s + (beta / lr) g_t . u_{t-1}`` (the paper's Algorithm 1; ``beta`` then
  has the units of a rate per unit of ``g . u`` and must be set per problem).

``s`` is a per-group *scale* on top of the group's ``lr`` (stored as ``group["hd_scale"]``, clipped
to ``[scale_min, scale_max]``), so a torch ``LRScheduler`` still owns ``lr`` and ``lr = 0`` stops
the parameters. Each group learns its own scale from its own dot product.

:class:`HypergradientAdam` uses Adam's direction ``u = m_hat / (sqrt(v_hat) + eps)`` (with
decoupled weight decay, AdamW-style); :class:`HypergradientSGD` uses ``u = g``.

A non-finite gradient in a group skips the whole step: no parameter, moment or scale changes.
Steps and skips are counted as every nestopt optimizer counts them (:mod:`nestopt.optim.counters`,
whole-optimizer): ``group["counters"]`` (``"steps"``, ``"nonfinite"``) in every param group, read
as ``opt.counters``. :class:`HypergradientSGD` keeps the previous step's ``||g||^2`` of each group
in ``group["hd_prev_gsq"]``.

**Capturable steps** (``capturable=``; see :mod:`nestopt.optim.base`): the statistics, the new
scale (both rules, the clip, "no previous update yet: keep the scale") and the skip decision are
computed as tensors on the parameters' device, the scales (and SGD's ``||g||^2``) stay there as
``live_keys`` until they are read, and a step with a non-finite statistic is masked on the device
by torch's fused kernels' ``found_inf`` (parameters, moments, scales and step counts bitwise as
they were; counted as ``"nonfinite"``). :class:`HypergradientAdam` then keeps ``state["step"]`` on
the parameter's device (torch's fused CUDA kernel wants it there) and computes its statistics with
a few multi-tensor kernels over all groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as _adamw

from .._checks import check_choice, check_number
from .base import NestoptOptimizer, refuse_sparse
from .counters import bump, outcome
from .groups import LR_MAX, choice, decay_within_rate, number, pair, scale_bounds
from .distributed import is_dtensor, local, locals_, sq_each, sum_partials
from .tensors import adamw_masked_, device_sq_norms, fused_ok, host_sq_norms
from .transaction import commit, current, evaluate

RULES = ("multiplicative", "additive")


class _Hypergradient(NestoptOptimizer):
    group_spec = {"rule": choice(*RULES), "beta": number(0.0), "scale_min": number(0.0, lo_open=True),
                  "scale_max": number(0.0, lo_open=True)}
    group_rules: tuple = (scale_bounds,)
    supports = frozenset({"bfloat16"})
    unsupported_why = {"complex": "its hypergradient g . u takes no complex conjugate",
                       "float16": "its dot products and norms overflow float16 (65504) and eps underflows"}

    live_keys = ((("hd_scale",), 1.0),)  # what a capturable step keeps on the device

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, rule: str, beta: float, process_group: Any,
                 scale_min: float, scale_max: float, capturable: bool | None = None) -> None:
        check_choice("rule", rule, RULES)
        check_number("beta", beta, lo=0.0)
        check_number("scale_min", scale_min, lo=0.0, lo_open=True)
        check_number("scale_max", scale_max, lo=0.0, lo_open=True)
        if scale_max < scale_min:
            raise ValueError(f"scale_min={scale_min!r} and scale_max={scale_max!r} are invalid: expected "
                             "scale_min <= scale_max")
        defaults = {**defaults, "rule": rule, "beta": beta, "scale_min": scale_min, "scale_max": scale_max}
        self.process_group = process_group
        self.capturable = capturable
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("hd_scale", 1.0)

    @classmethod
    def _migrate_group(cls, group: dict[str, Any]) -> None:
        # before the counters convention group["hd"] held the counts and SGD's previous ||g||^2
        old = group.pop("hd", None)
        if isinstance(old, dict):
            group.setdefault("counters", {k: int(old[k]) for k in ("steps", "nonfinite") if k in old})
            if "prev_gsq" in old:
                group.setdefault("hd_prev_gsq", old["prev_gsq"])

    def _group_telemetry(self) -> dict[str, list[float]]:
        return {**super()._group_telemetry(), "scale": [float(g["hd_scale"]) for g in self.param_groups]}

    @staticmethod
    def _new_scale(group: dict[str, Any], dot: float, gsq: float, usq: float) -> float:
        """The scale after this step's hypergradient ``-g_t . u_{t-1}``."""
        s = group["hd_scale"]
        if usq > 0.0 and gsq > 0.0:  # no previous update yet: keep the scale
            if group["rule"] == "multiplicative":
                s = s * (1.0 + group["beta"] * dot / math.sqrt(gsq * usq))
            elif group["lr"] > 0:
                s = s + group["beta"] * dot / group["lr"]
            s = min(max(s, group["scale_min"]), group["scale_max"])
        return s

    @staticmethod
    def _new_scale_device(group: dict[str, Any], s: torch.Tensor, dot: torch.Tensor, gsq: torch.Tensor,
                          usq: torch.Tensor) -> torch.Tensor:
        """:meth:`_new_scale` on float64 device scalars, in the same order of operations (so the
        same doubles)."""
        if group["rule"] == "multiplicative":
            new = s * (1.0 + group["beta"] * dot / torch.sqrt(gsq * usq))
        elif group["lr"] > 0:
            new = s + group["beta"] * dot / group["lr"]
        else:
            new = s
        new = torch.clamp(new, group["scale_min"], group["scale_max"])
        return torch.where((usq > 0.0) & (gsq > 0.0), new, s)  # no previous update yet: keep the scale

    def _device_work(self, ps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, int]]:
        """The ``live_keys`` tensor on ``ps``' device and each group's column in it (a capturable
        step; it does not sync over ranks, so it takes no sharded parameters)."""
        if any(map(is_dtensor, ps)):
            raise NotImplementedError(f"{type(self).__name__}(capturable=True) does not step sharded (DTensor) "
                                      "parameters: use capturable=False")
        return self.live(ps[0].device), {id(g): i for i, g in enumerate(self.param_groups)}


class HypergradientSGD(_Hypergradient):
    """SGD whose per-group rate follows hypergradient descent (``u = g``).

    Args: ``lr`` (the base rate a scheduler drives), ``rule``, ``beta`` (hyper learning rate:
    default 0.02 for the multiplicative rule), ``scale_min``/``scale_max`` (bounds on the learned
    scale, default 1e-3 to 1e3), ``capturable`` (``None``: on for CUDA parameters; the step with
    no host read: the statistics and scales as above, on the device, and the update and the copy
    of ``g`` into the previous direction in one pass of torch's fused SGD kernel, masked by its
    ``found_inf``; the same numbers as the default step, bitwise).
    """

    group_spec = {"lr": number(0.0, LR_MAX), **_Hypergradient.group_spec}
    live_keys = ((("hd_scale",), 1.0), (("hd_prev_gsq",), 0.0))

    def __init__(self, params: Iterable[Any], lr: float = 0.01, *, rule: str = "multiplicative",
                 beta: float = 0.02, scale_min: float = 1e-3, scale_max: float = 1e3, process_group: Any = "auto",
                 capturable: bool | None = None) -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        super().__init__(params, {"lr": lr}, rule=rule, beta=beta, scale_min=scale_min, scale_max=scale_max,
                         process_group=process_group, capturable=capturable)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _evaluate(self, closure)
        work, new = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                gs = [p.grad for p in ps]
                for p in ps:
                    if "prev_update" not in self.state[p]:
                        new.append(p)  # the previous update direction u_{t-1} = g_{t-1}
                        self.state[p]["prev_update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                work.append((group, ps, gs, [self.state[p]["prev_update"] for p in ps]))
        if not work:
            return loss
        refuse_sparse(self, [g for _, _, gs, _ in work for g in gs])
        _fresh_state(self, new)
        if self.on_device(work[0][1]):
            self._step_device(work)
            return loss
        # One host sync for every group: g.u_prev and ||g||^2 (||u_prev||^2 = last step's ||g||^2).
        stats = []
        sharded = any(is_dtensor(g) for _, _, gs, _ in work for g in gs)
        for _, _, gs, us in work:
            if sharded:  # this rank's shards: the partial sums are added over the ranks below
                gs, us = locals_(gs), locals_(us)
            dot = torch.stack([torch.dot(g.reshape(-1), u.reshape(-1)) for g, u in zip(gs, us)]).sum()
            gn = torch.stack(torch._foreach_norm(gs)).square().sum()
            stats.append(torch.stack([dot, gn]).to(torch.float64))
        host = torch.stack(stats)
        host = (sum_partials(self, host.reshape(-1), [g for _, _, gs, _ in work for g in gs]).reshape(host.shape)
                if sharded else host).tolist()
        if not all(math.isfinite(v) for row in host for v in row):
            bump(self.param_groups, "nonfinite")
            return loss
        commit(self)
        for (group, ps, gs, us), (dot, gsq) in zip(work, host):
            group["hd_scale"] = self._new_scale(group, dot, gsq, group.get("hd_prev_gsq", 0.0))
            group["hd_prev_gsq"] = gsq
            if sharded:  # elementwise: on this rank's shards (DTensor has no _foreach_copy_)
                ps, gs, us = locals_(ps), locals_(gs), locals_(us)
            torch._foreach_copy_(us, gs)
            a = group["lr"] * group["hd_scale"]
            if a:
                torch._foreach_add_(ps, us, alpha=-a)
        bump(self.param_groups, "steps")
        return loss

    def _step_device(self, work: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor],
                                            list[torch.Tensor]]]) -> None:
        """The capturable step: the host step's arithmetic on the device (the same kernels for the
        statistics, so the same doubles), masked as a whole where a statistic is not finite."""
        live, col = self._device_work([p for _, ps, _, _ in work for p in ps])
        stats = torch.stack([
            torch.stack([torch.stack([torch.dot(g.reshape(-1), u.reshape(-1)) for g, u in zip(gs, us)]).sum(),
                         torch.stack(torch._foreach_norm(gs)).square().sum()]).to(torch.float64)
            for _, _, gs, us in work])
        ok = torch.isfinite(stats).all()
        skip = (~ok).to(torch.float32)
        commit(self)
        for (group, ps, gs, us), (dot, gsq) in zip(work, stats):
            i = col[id(group)]
            s, prev = live[0, i], live[1, i]
            s.copy_(torch.where(ok, self._new_scale_device(group, s, dot, gsq, prev), s))
            prev.copy_(torch.where(ok, gsq, prev))
            _sgd_and_copy(ps, gs, us, group["lr"] * s, skip)
        self._count_on_device(outcome(self.count_keys(), [("nonfinite", ~ok)], "steps"))


def _rate(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor learning rate as torch's fused kernels read it: a double on the CPU (the kernel
    takes its value, so the default path's Python float exactly), a float32 on a GPU."""
    return lr.to(torch.float64 if device.type == "cpu" else torch.float32)


def _by_dtype(ps: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``ps`` by dtype (torch's fused kernels take one dtype a call)."""
    kinds: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ps):
        kinds.setdefault(p.dtype, []).append(i)
    return list(kinds.values())


def _sgd_and_copy(ps: list[torch.Tensor], gs: list[torch.Tensor], us: list[torch.Tensor], a: torch.Tensor,
                  skip: torch.Tensor) -> None:
    """``u <- g; p <- p - a u`` unless ``skip`` (a float32 device flag, 1.0 to skip): one pass of
    torch's fused SGD kernel, whose first step with momentum copies the gradient into the buffer
    and steps along it; ``found_inf`` leaves everything bitwise as it was. Under ``torch.compile``
    (no meta kernel for it) and on other devices an element-wise select does the same."""
    dev = ps[0].device
    if dev.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        lr = _rate(a, dev)
        for idx in _by_dtype(ps):
            torch._fused_sgd_([ps[i] for i in idx], [gs[i] for i in idx], [us[i] for i in idx], weight_decay=0.0,
                              momentum=1.0, lr=lr, dampening=0.0, nesterov=False, maximize=False, is_first_step=True,
                              found_inf=skip)
        return
    keep = skip > 0
    for p, g, u in zip(ps, gs, us):
        u.copy_(torch.where(keep, u, g))
        p.copy_(torch.where(keep, p, p - a.to(p.dtype) * u))


class HypergradientAdam(_Hypergradient):
    """Adam (decoupled weight decay) whose per-group rate follows hypergradient descent on Adam's
    direction ``m_hat / (sqrt(v_hat) + eps)``.

    Args: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled, as AdamW), ``rule``, ``beta``
    (default 0.02, multiplicative), ``scale_min``/``scale_max``, ``capturable`` (``None``: on for
    CUDA parameters; the step with no host read: the statistics of every group in a few
    multi-tensor kernels, the scales on the device, then torch's fused AdamW kernel with a tensor
    rate and ``found_inf``, ``state["step"]`` on the parameter's device. Its statistics round
    differently from the default step's per-tensor dot products, so the two agree to float32
    rounding, not bitwise).
    """

    group_spec = {"lr": number(0.0, LR_MAX), "betas": pair(0.0, 1.0), "eps": number(0.0, lo_open=True),
                  "weight_decay": number(0.0), **_Hypergradient.group_spec}
    group_rules = (scale_bounds, decay_within_rate)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rule: str = "multiplicative", beta: float = 0.02,
                 scale_min: float = 1e-3, scale_max: float = 1e3, process_group: Any = "auto",
                 capturable: bool | None = None) -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        check_number("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
        check_number("eps", eps, lo=0.0, lo_open=True)
        check_number("weight_decay", weight_decay, lo=0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         rule=rule, beta=beta, scale_min=scale_min, scale_max=scale_max, process_group=process_group,
                         capturable=capturable)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Adam's step at ``lr * hd_scale``, with the previous direction ``u = m_hat / (sqrt(v_hat)
        + eps)`` recomputed from the moments (no extra buffer), then torch's fused AdamW kernel."""
        loss = _evaluate(self, closure)
        work, new = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                st = self.state[p]
                if not st:
                    new.append(p)
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            work.append((group, ps))
        if not work:
            return loss
        refuse_sparse(self, [p.grad for _, ps in work for p in ps])
        _fresh_state(self, new)
        if self.on_device(work[0][1]):
            self._step_device(work)
            return loss
        pairs = [self._hd_stats(group, ps) for group, ps in work]
        # ||g||^2 of every tensor and each group's (g . u, ||u||^2), with one host sync for all groups
        grads = [p.grad for _, ps in work for p in ps]
        if any(map(is_dtensor, grads)):  # every value a partial sum over this rank's shards: added over the ranks
            flat = [torch.as_tensor(x, dtype=torch.float64) for pair in pairs for x in pair]
            vec = sum_partials(self, torch.cat([sq_each(locals_(grads)), torch.stack(flat).to(grads[0].device)]),
                               grads).tolist()
            gsq_each, vals = vec[:len(grads)], vec[len(grads):]
        else:
            gsq_each, vals = host_sq_norms(grads, *(x for pair in pairs for x in pair))
        host, off = [], 0
        for i, (_, ps) in enumerate(work):
            host.append((vals[2 * i], sum(gsq_each[off:off + len(ps)]), vals[2 * i + 1]))
            off += len(ps)
        if not all(math.isfinite(v) for row in host for v in row):
            bump(self.param_groups, "nonfinite")
            return loss
        commit(self)
        for (group, ps), (dot, gsq, usq) in zip(work, host):
            group["hd_scale"] = self._new_scale(group, dot, gsq, usq)
            st = [self.state[p] for p in ps]
            b1, b2 = group["betas"]
            fused = fused_ok(ps)
            _adamw(ps, [p.grad for p in ps], [x["exp_avg"] for x in st], [x["exp_avg_sq"] for x in st], [],
                   [x["step"] for x in st], foreach=not fused, fused=fused, amsgrad=False, beta1=b1, beta2=b2,
                   lr=group["lr"] * group["hd_scale"], weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=False)
        bump(self.param_groups, "steps")
        return loss

    def _hd_stats(self, group: dict[str, Any], ps: list[torch.Tensor]) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(g . u, ||u||^2)`` for one group as device scalars (``u`` the previous Adam direction,
        recomputed from the moments), left on the device for the step's one sync."""
        eps = group["eps"]
        b1, b2 = group["betas"]
        prev = []  # (flat gradient, exp_avg, exp_avg_sq, c, eps') of tensors stepped before
        for p in ps:
            st = self.state[p]
            t = float(st["step"])
            if t > 0:
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                # u = (m / bc1) / (sqrt(v / bc2) + eps) = c * m / (sqrt(v) + eps sqrt(bc2)), c = sqrt(bc2) / bc1
                prev.append((local(p.grad).reshape(-1), local(st["exp_avg"]), local(st["exp_avg_sq"]), math.sqrt(bc2) / bc1,
                             eps * math.sqrt(bc2)))
        if not prev:
            return 0.0, 0.0
        cs = torch.tensor([c for *_, c, _ in prev], dtype=torch.float64)
        if ps[0].device.type == "cpu" and not is_dtensor(ps[0]):
            # one reused buffer (the largest tensor's size): no allocation and no page faults per step
            dots, usqs = [], []
            for g, m, v, _, e in prev:
                q = self._scratch(m)
                torch.sqrt(v, out=q).add_(e)
                torch.div(m, q, out=q)
                q = q.reshape(-1)
                dots.append(torch.dot(g, q))
                usqs.append(torch.dot(q, q))
            dot, usq = torch.stack(dots).double(), torch.stack(usqs).double()
        else:
            # a few multi-tensor kernels instead of several launches per tensor (a GPU step is
            # bound by launches); the temporaries come from the caching allocator
            qs = torch._foreach_sqrt([v for _, _, v, _, _ in prev])
            torch._foreach_add_(qs, [e for *_, e in prev])
            torch._foreach_reciprocal_(qs)
            torch._foreach_mul_(qs, [m for _, m, _, _, _ in prev])
            usq = torch.stack(torch._foreach_norm(qs)).double().square()
            dot = torch.stack([torch.dot(g, q.reshape(-1)) for (g, *_), q in zip(prev, qs)]).double()
            cs = cs.to(dot.device, non_blocking=True)
        return (cs * dot).sum(), (cs * cs * usq).sum()

    # -- the capturable step ------------------------------------------------------------------------
    def _step_device(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """Statistics, scales and the skip decision on the device; torch's fused AdamW kernel with
        the scaled rate as a tensor and the decision as ``found_inf`` (what torch's own fused Adam
        does under ``GradScaler``: the step counts go up, then back down where it skipped)."""
        ps_all = [p for _, ps in work for p in ps]
        live, col = self._device_work(ps_all)
        for p in ps_all:  # torch's fused CUDA kernel reads the step counts on the device
            st = self.state[p]
            if st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
        stats = self._hd_stats_device(work)
        ok = torch.isfinite(stats).all()
        skip = (~ok).to(torch.float32)
        commit(self)
        for (group, ps), (dot, gsq, usq) in zip(work, stats):
            i = col[id(group)]
            s = live[0, i]
            s.copy_(torch.where(ok, self._new_scale_device(group, s, dot, gsq, usq), s))
            lr = _rate(group["lr"] * s, ps[0].device)
            b1, b2 = group["betas"]
            for idx in _by_dtype(ps):
                sub = [ps[j] for j in idx]
                st = [self.state[p] for p in sub]
                steps = [x["step"] for x in st]
                torch._foreach_add_(steps, 1)
                adamw_masked_(sub, [p.grad for p in sub], [x["exp_avg"] for x in st], [x["exp_avg_sq"] for x in st],
                              steps, lr=lr, beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"],
                              skip=skip)
                torch._foreach_sub_(steps, [skip] * len(steps))
        self._count_on_device(outcome(self.count_keys(), [("nonfinite", ~ok)], "steps"))

    def _hd_stats_device(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> torch.Tensor:
        """Each group's ``(g . u, ||g||^2, ||u||^2)`` as a float64 ``(groups, 3)`` tensor on the
        device, ``u`` recomputed from the moments as in :meth:`_hd_stats` with the step counts
        read on the device, in multi-tensor kernels over every tensor of every group (a GPU step is
        bound by launches). A dot product with no multi-tensor kernel: the sum of ``x = g u`` is
        ``2 sum max(x, 0) - sum |x|``, two 1-norms (its rounding error is float32's on
        ``sum |x| <= ||g|| ||u||``, as a plain sum's)."""
        ps = [p for _, group_ps in work for p in group_ps]
        sts = [self.state[p] for p in ps]
        t = torch.stack([st["step"] for st in sts]).to(torch.float64)
        cs, es, off = [], [], 0
        for group, group_ps in work:  # u = c m / (sqrt(v) + e): c = sqrt(bc2) / bc1, e = eps sqrt(bc2)
            b1, b2 = group["betas"]
            tg = t[off:off + len(group_ps)]
            off += len(group_ps)
            root = torch.sqrt(1 - torch.pow(b2, tg))
            fresh = tg == 0  # never stepped: no previous update, no contribution
            cs.append(torch.where(fresh, 0.0, root / (1 - torch.pow(b1, tg))))
            es.append(torch.where(fresh, 1.0, group["eps"] * root))
        c, e = torch.cat(cs), torch.cat(es)
        qs = torch._foreach_sqrt([st["exp_avg_sq"] for st in sts])
        torch._foreach_add_(qs, list(e.unbind()))
        qs = torch._foreach_div([st["exp_avg"] for st in sts], qs)
        usq = _norms(qs, 2).square()
        torch._foreach_mul_(qs, [p.grad for p in ps])
        l1 = _norms(qs, 1)
        torch._foreach_clamp_min_(qs, 0.0)
        dot = 2 * _norms(qs, 1) - l1
        per = torch.stack([c * dot, device_sq_norms([p.grad for p in ps]), c * c * usq], 1)
        rows, off = [], 0
        for _, group_ps in work:
            rows.append(per[off:off + len(group_ps)].sum(0))
            off += len(group_ps)
        return torch.stack(rows)

    def _drop_device(self) -> None:
        super()._drop_device()
        for st in self.__dict__.get("state", {}).values():  # the default step keeps its counts on the host
            if torch.is_tensor(st.get("step")) and st["step"].device.type != "cpu":
                st["step"] = st["step"].cpu()

    def _scratch(self, p: torch.Tensor) -> torch.Tensor:
        buf = self.__dict__.get("_buf")
        if buf is None or buf.numel() < p.numel() or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
            self.__dict__["_buf"] = buf
        return buf[: p.numel()].view(p.shape)


def _norms(ts: list[torch.Tensor], order: int) -> torch.Tensor:
    """Each tensor's ``order``-norm as a float64 vector (float16/bfloat16 ones accumulated in float32)."""
    low = [i for i, x in enumerate(ts) if x.dtype in (torch.float16, torch.bfloat16)]
    if not low:
        return torch.stack(torch._foreach_norm(ts, order)).to(torch.float64)
    out = [torch.empty(0)] * len(ts)
    rest = [i for i in range(len(ts)) if i not in set(low)]
    for idx, kw in ((rest, {}), (low, {"dtype": torch.float32})):
        if idx:
            for i, v in zip(idx, torch._foreach_norm([ts[i] for i in idx], order, **kw)):
                out[i] = v.to(torch.float64)
    return torch.stack(out)


def _evaluate(opt: NestoptOptimizer, closure: Any) -> Any:
    return None if closure is None else evaluate(opt, closure)


def _fresh_state(opt: NestoptOptimizer, new: list[torch.Tensor]) -> None:
    """State made for ``new`` parameters this step is dropped again if the step fails."""
    txn = current(opt)
    if new and txn is not None:
        txn.on_rollback(lambda: [opt.state.pop(p, None) for p in new])
