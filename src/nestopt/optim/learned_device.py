""":class:`~nestopt.optim.LearnedOptimizer`'s capturable step (``capturable=True``, the default
for CUDA parameters; see :mod:`nestopt.optim.learned`, "Capturable steps"): the same rules as the
host step with nothing read back to the host, and the compiled kernels it runs on large tensors
(the linear network's masked pass, one chunk of the per-element MLP's step). A mixin of the
optimizer: it reads the optimizer's network, state, ``compile`` setting and compile cache."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..nets import DirectUpdateMLP, HybridAdamNet, LinearUpdate
from .distributed import refuse_sharded
from .tensors import adamw_masked_, contiguous_with_grad as _contiguous, device_sq_norms, flat_alias as _flat, pick

_COMPILED_FNS: dict[str, Any] = {}  # the capturable step's compiled kernels by name (successes only)


class DeviceSteps:
    """The capturable step's methods (mixed into ``LearnedOptimizer``)."""

    net: Any
    state: Any
    chunk: int | None
    compile: bool | None

    # -- the capturable step: the same rules as device tensors, masked, no host read ----------------
    def _step_device(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> torch.Tensor:
        """The step on the device (module docstring, "Capturable steps"); returns ``ok``, a device
        bool: every gradient (and, for the hybrid, every learned rate) finite, else nothing moved."""
        if isinstance(self.net, HybridAdamNet):
            return self._hybrid_device(work)
        if isinstance(self.net, LinearUpdate):
            return self._linear_device(work)
        return self._generic_device(work)

    def _scalar(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """The per-tensor float ``state[p][key]`` as a float64 device tensor while capturable
        (made from the float at the first capturable step, advanced in place from then on, and
        written back as a float by :meth:`_flush_device`)."""
        live = self.__dict__.setdefault("_live_scalars", {})
        mine = live.setdefault(p, {})
        t = mine.get(key)
        if t is None:
            t = mine[key] = torch.tensor(float(self.state[p][key]), dtype=torch.float64, device=p.device)
        return t

    def _consts(self, work: list[tuple[dict[str, Any], torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-tensor constants of the hyperparameters (``lr``, ``weight_decay``, sizes) as float64
        device vectors, made once per set of values (so no host data moves in a later step)."""
        key = (device, tuple((g["lr"], g["weight_decay"], p.numel()) for g, p in work))
        cache = self.__dict__.setdefault("_const_cache", {})
        out = cache.get(key)
        if out is None:
            if len(cache) > 64:
                cache.clear()
            lr, wd, n = (_vector(col, device) for col in zip(*key[1]))
            out = cache[key] = {"lr": lr, "wd": wd, "n": n}
        return out

    def _flush_device(self) -> None:
        super()._flush_device()
        live = self.__dict__.get("_live_scalars")
        if live:
            items = [(p, k, t) for p, d in live.items() for k, t in d.items()]
            try:
                vals = torch.stack([t for _, _, t in items]).tolist()
            except RuntimeError:  # on several devices
                vals = [float(t) for _, _, t in items]
            for (p, k, _), v in zip(items, vals):
                if p in self.state:
                    self.state[p][k] = v

    def _has_device_values(self) -> bool:
        return super()._has_device_values() or "_live_scalars" in self.__dict__

    def _drop_device(self) -> None:
        super()._drop_device()
        self.__dict__.pop("_live_scalars", None)

    def _linear_device(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> torch.Tensor:
        """:meth:`_linear` on the device: the nine coefficients of every tensor at once (float64,
        in the host path's order of operations), then one masked elementwise pass per tensor."""
        net = self.net
        assert isinstance(net, LinearUpdate)
        ps = [p for _, p in work]
        n, dev = len(ps), ps[0].device
        sq = device_sq_norms([p.grad for p in ps] + ps)
        ok = torch.isfinite(sq[:n]).all()
        lin = self._net_on(dev).net
        w = lin.weight.detach().reshape(-1).double()
        b = lin.bias.detach().reshape(()).double()
        c = self._consts(work, dev)
        steps = [self.state[p]["step"] for p in ps]
        t = torch.stack(steps).double() + 1
        vbars = [self._scalar(p, "v_bar") for p in ps]
        vbar_old = torch.stack(vbars)
        a = c["lr"] * net.step_mult
        dec = 1 - a * c["wd"]
        vbar, r, r_p = net.tensor_scales(sq[:n] / c["n"], vbar_old, sq[n:] * dec * dec / c["n"], t)
        k = torch.stack([dec * (1 - a * w[3] / r_p), a * w[0] / r, a * w[1] / r, a * w[2] / r, a * b,
                         a * w[4] / (1 - 0.9**t), a * w[5], 1 / (1 - 0.999**t), torch.full_like(t, 1e-8)], 1)
        torch._foreach_copy_(vbars, list(torch.where(ok, vbar, vbar_old).unbind()))
        torch._foreach_add_(steps, [ok.to(torch.float32)] * n)  # (a tensor list: no host read)
        ks = {dt: k.to(dt) for dt in {p.dtype for p in ps}}
        for i, p in enumerate(ps):
            st = self.state[p]
            args = (p, p.grad, st["m"], st["m_slow"], st["v"], ks[p.dtype][i], ok)
            if _contiguous(p) and self._compiled(p) is not None:
                self._run_compiled_fn(_linear_pass_masked, *(_flat(x) for x in args[:5]), *args[5:])
            else:
                _linear_pass_masked(*args)
        return ok

    def _hybrid_device(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> torch.Tensor:
        """:meth:`_hybrid` on the device: the per-tensor sums and learned rates of every tensor at
        once, then torch's fused AdamW kernel per tensor at its rate (a tensor) with ``found_inf``
        set where the step is skipped (the kernel then leaves everything as it was)."""
        net = self.net
        assert isinstance(net, HybridAdamNet)
        b1, b2 = net.betas
        ps = [p for _, p in work]
        n, dev = len(ps), ps[0].device
        gs = [p.grad for p in ps]
        ms = [self.state[p]["exp_avg"] for p in ps]
        rows = torch.stack([torch.stack([torch.dot(g.reshape(-1), m.reshape(-1)), torch.dot(g.reshape(-1), g.reshape(-1)),
                                         torch.dot(p.reshape(-1), p.reshape(-1))]).double() for g, m, p in zip(gs, ms, ps)])
        c = self._consts(work, dev)
        steps = [self.state[p]["step"] for p in ps]
        t = torch.stack(steps).double() + 1
        m_sqs, v_sums = [self._scalar(p, "m_sq") for p in ps], [self._scalar(p, "v_sum") for p in ps]
        m_sq, v_sum = torch.stack(m_sqs), torch.stack(v_sums)
        dnet = self._net_on(dev)
        assert isinstance(dnet, HybridAdamNet)
        s, mm, vs = dnet.tensor_scale_from_sums(rows[:, 0], rows[:, 1], rows[:, 2], m_sq, v_sum, c["n"], t)
        lr = c["lr"] * torch.exp(dnet.base.detach().double()) * torch.exp(s.double())
        ok = torch.isfinite(rows).all() & torch.isfinite(lr).all()
        torch._foreach_copy_(m_sqs + v_sums, list(torch.where(ok, torch.cat([mm, vs]), torch.cat([m_sq, v_sum])).unbind()))
        skip = (~ok).to(torch.float32)
        lr = torch.where(ok, lr, 0.0)
        if dev.type != "cpu":
            lr = lr.float()
        torch._foreach_add_(steps, 1.0)  # as torch's fused AdamW does: the kernel reads the advanced count,
        for i, ((group, p), g, m) in enumerate(zip(work, gs, ms)):
            adamw_masked_([p], [g], [m], [self.state[p]["exp_avg_sq"]], [steps[i]], lr=lr[i], beta1=b1, beta2=b2,
                          weight_decay=group["weight_decay"], eps=net.eps, skip=skip)
        torch._foreach_sub_(steps, [skip] * n)  # and a skipped step takes it back
        return ok

    def _generic_device(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> torch.Tensor:
        """:meth:`_generic` on the device: the step count a tensor, every write masked by ``ok``."""
        refuse_sharded(self, [p for _, p in work], f"with net={type(self.net).__name__} (its per-element network "
                       "normalises over whole tensors)")
        gs = [p.grad for _, p in work]
        ok = torch.isfinite(torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in gs])).all()
        okf = ok.to(torch.float32)
        for group, p in work:
            st = self.state[p]
            t = st["step"].double() + 1
            st["step"].add_(okf)
            net = self._net_on(p.device)
            bufs = {k: st[k] for k in self.net.buffers}
            c = getattr(net, "step_mult", 1.0)
            if group["weight_decay"]:
                p.mul_(pick(ok, 1 - group["lr"] * c * group["weight_decay"], 1.0, p))
            if isinstance(net, DirectUpdateMLP):
                chunk = self.chunk or (1 << 15 if p.device.type == "cpu" else 1 << 62)
                self._mlp_device(net, p, p.grad, bufs, t, chunk, group["lr"], ok)
                continue
            delta, new = net.update(p, p.grad, bufs, t)
            p.copy_(torch.where(ok, torch.add(p, delta, alpha=group["lr"]), p))
            for k, v in new.items():
                st[k].copy_(torch.where(ok, v, st[k]))
        return ok

    def _mlp_device(self, net: DirectUpdateMLP, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor],
                    t: torch.Tensor, chunk: int, alpha: float, ok: torch.Tensor) -> None:
        """:func:`_mlp_apply_` masked by ``ok``: the buffers advance where it holds; each chunk's
        step is one compiled kernel (:func:`_mlp_chunk`) where ``compile`` allows, else the
        reference's operations."""
        new = {"m": torch.lerp(state["m"], g, 0.1)}  # net.advance(inplace=True)'s arithmetic, aside
        if net.feature_set == "extended":
            new["m_slow"] = torch.lerp(state["m_slow"], g, 0.01)
            new["v"] = (state["v"] * 0.999).addcmul_(g, g, value=0.001)
        for k, v in new.items():
            state[k].copy_(torch.where(ok, v, state[k]))
        norms = net.normalisers(p, g, state)
        flat = p.view(-1) if p.is_contiguous() else None
        if flat is None:
            step = net.step_from_rows(net.rows(p, g, state, norms, t)).reshape(p.shape).to(p.dtype)
            p.copy_(torch.where(ok, torch.add(p, step, alpha=alpha), p))
            return
        n = flat.numel()
        if self._compiled_mlp(net, p):
            self._mlp_chunks_compiled(net, p, g, state, norms, torch.stack([1 - 0.9**t, 1 - 0.999**t]), ok, chunk, alpha)
            return
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            x = flat[sl]
            step = net.step_from_rows(net.rows(p, g, state, norms, t, sl)).to(p.dtype)
            x.copy_(torch.where(ok, torch.add(x, step, alpha=alpha), x))

    def _compiled_mlp(self, net: DirectUpdateMLP, p: torch.Tensor) -> bool:
        """Whether the MLP's chunks run compiled (:func:`_mlp_chunk`): ``"extended"`` features, a
        contiguous parameter and gradient, and ``compile`` asking for it (``None``: tensors of at
        least 65536 elements until compiling fails here; ``True``: all)."""
        return net.feature_set == "extended" and _contiguous(p) and self._compiled(p) is not None

    def _mlp_chunks_compiled(self, net: DirectUpdateMLP, p: torch.Tensor, g: torch.Tensor,
                             state: dict[str, torch.Tensor], norms: list[torch.Tensor], bc: torch.Tensor,
                             ok: torch.Tensor, chunk: int, alpha: float) -> None:
        """The MLP's step after its buffers advanced: one compiled kernel per chunk."""
        lin = [x.detach() for layer in net.net if isinstance(layer, torch.nn.Linear) for x in (layer.weight, layer.bias)]
        flats = [_flat(x) for x in (p, g, state["m"], state["m_slow"], state["v"])]
        norm = torch.stack(norms)
        n = p.numel()
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            self._run_compiled_fn(_mlp_chunk, *(x[sl] for x in flats), norm, bc, ok, *lin, net.step_mult,
                                  net.exp_mult, alpha)

    def _run_compiled_fn(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn`` compiled, as :meth:`_run_compiled` runs :func:`_linear_pass`: one kernel per
        process once one has run, a failure (with ``compile=None``) warned about once and this
        instance eager from then on."""
        kernels = self.__dict__.setdefault("_kernels", {})
        kernel = _COMPILED_FNS.get(fn.__name__) or kernels.get(fn.__name__)
        if self.compile:
            if kernel is None:
                kernel = kernels[fn.__name__] = torch.compile(fn, dynamic=True)
            kernel(*args)
        else:
            try:
                if kernel is None:
                    kernel = kernels[fn.__name__] = torch.compile(fn, dynamic=True)
                kernel(*args)
            except Exception as e:  # torch.compile raises many types (no compiler, unsupported platform)
                self._compile_failed = True
                warnings.warn(f"LearnedOptimizer: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); this "
                              "optimizer runs its capturable step as separate torch operations (same result, "
                              "slower). Pass compile=False to skip the attempt.", RuntimeWarning, stacklevel=3)
                fn(*args)
                return
        _COMPILED_FNS.setdefault(fn.__name__, kernel)


def _linear_pass_masked(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, m_slow: torch.Tensor, v: torch.Tensor,
                        k: torch.Tensor, ok: torch.Tensor) -> None:
    """:func:`_linear_pass` where ``ok`` (a device bool) holds, else nothing: the new buffers and
    parameter are computed aside (the same operations in the same order) and selected, so a
    skipped step leaves every tensor bitwise as it was whatever the gradient holds. Compiled, one
    loop per tensor; eager, the capturable step's pass for small tensors."""
    m1 = torch.lerp(m, g, 0.1)
    ms1 = torch.lerp(m_slow, g, 0.01)
    v1 = (v * 0.999).addcmul_(g, g, value=0.001)
    vh = (v1 * k[7]).sqrt() + k[8]
    p1 = (p * k[0]).sub_(k[1] * g + k[2] * m1 + k[3] * ms1 + k[4] + (k[5] * m1 + k[6] * g) / vh)
    m.copy_(torch.where(ok, m1, m))
    m_slow.copy_(torch.where(ok, ms1, m_slow))
    v.copy_(torch.where(ok, v1, v))
    p.copy_(torch.where(ok, p1, p))


def _mlp_chunk(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, m_slow: torch.Tensor, v: torch.Tensor,
               norms: torch.Tensor, bc: torch.Tensor, ok: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, step_mult: float,
               exp_mult: float, alpha: float) -> None:
    """One chunk of :class:`~nestopt.nets.DirectUpdateMLP`'s step (``"extended"`` features) where
    ``ok`` holds: its rows, the network and ``p += alpha * delta``, the source of the capturable
    path's compiled kernel (``bc``: the bias corrections ``1 - 0.9^t``, ``1 - 0.999^t``; the
    buffers have advanced already). The reference's arithmetic, fused: equal to float32 rounding."""
    vh = (v / bc[1]).sqrt() + 1e-8
    x = torch.stack([g / norms[0], m / norms[1], m_slow / norms[2], p / norms[3], (m / bc[0]) / vh, g / vh], 1)
    h = torch.relu(torch.nn.functional.linear(x.to(w1.dtype), w1, b1))
    h = torch.relu(torch.nn.functional.linear(h, w2, b2))
    out = torch.nn.functional.linear(h, w3, b3)
    step = (-step_mult * out[:, 0] * torch.exp(exp_mult * out[:, 1])).to(p.dtype)
    p.copy_(torch.where(ok, torch.add(p, step, alpha=alpha), p))


def _vector(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 vector on ``device``: on a GPU made by fill kernels (no copy from the
    host, which would wait for the device when a scheduler changes a rate every step)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.float64)
    return torch.stack([torch.full((), float(v), dtype=torch.float64, device=device) for v in values])
