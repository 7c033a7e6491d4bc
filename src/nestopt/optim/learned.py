r"""``LearnedOptimizer``: a drop-in ``torch.optim.Optimizer`` whose update comes from an update
network (:mod:`nestopt.nets`).

    ``p <- p * (1 - lr * c * weight_decay) + lr * delta``,  ``delta, state = net.update(p, g, state, t)``

where ``c`` is the network's own step size (decay is decoupled and scaled like the step, as in
AdamW). ``lr`` is a plain multiplier (default 1: the network's learned step sizes as they are), so
torch schedulers work; ``step()`` needs no closure; the optimizer holds only the per-parameter
buffers the network names (``state_dict`` round-trips them), never the network's weights.

``net`` is ``"default"`` (the shipped meta-trained :class:`~nestopt.nets.LinearUpdate`),
``"mlp"`` (the shipped per-element MLP, slower), an :class:`~nestopt.nets.UpdateNet`, or a
path to a ``.safetensors`` file written by :func:`save_net`. A missing, unreadable or mismatched
file raises ``ValueError`` naming the file and what was expected; nothing falls back silently.

Fast paths (each tested against the network's reference ``update``): the linear network reads
each tensor's gradient and parameter once for two dot products (one host sync for all tensors),
then runs one elementwise pass: compiled by ``torch.compile`` into a single fused loop per large
tensor (see ``compile``), and as multi-tensor kernels over batches of the others; the hybrid network runs torch's fused AdamW kernel per tensor
at the learned rate, with its per-tensor statistics kept by exact recursions (one extra read of
gradients, momenta and parameters); the per-element MLP is evaluated in chunks so the hidden
activations stay in cache, each chunk of a large tensor by one compiled function (its features,
network and update; equal to the eager operations to float32 rounding, and faster on the CPU:
measured 0.6 of the eager time on one 1M-element tensor, 0.9 on a 1M-parameter MLP, 2 cores).

A non-finite gradient skips the whole step. Steps and skips are counted as every nestopt
optimizer counts them (:mod:`nestopt.optim.counters`, whole-optimizer): ``group["counters"]``
(``"steps"``, ``"nonfinite"``) in every param group, saved by ``state_dict``, read as
``opt.counters["nonfinite"]``.

**Capturable steps** (``capturable=True``, the default for CUDA parameters; see
:mod:`nestopt.optim.base`): the same rules with nothing read back to the host. The step counts are
tensors on the parameters' device, the per-tensor floats (``v_bar``, ``m_sq``, ``v_sum``) are
float64 device tensors while capturable (written back into ``state`` as floats whenever
``state_dict()``, ``opt.counters``, ``telemetry()``, a copy or ``sync_host()`` reads them, so a state
dict is the same either way), the linear network's nine coefficients and the hybrid's learned rates
are computed on the device for every tensor at once, and a non-finite gradient skips the whole
step by masking: each new buffer and parameter is selected with ``torch.where`` (the hybrid: torch's
fused AdamW kernel with a tensor rate and ``found_inf``), so a skipped step leaves every tensor
bitwise as it was and counts ``"nonfinite"`` on the device. Large tensors (``compile``, below) run
compiled kernels: the linear network's masked pass, and each chunk of the per-element MLP's step
(features, network, update) as one compiled function instead of tens of operations. The results
are the default path's: bitwise for the linear network and the MLP run eagerly, to float32 rounding
for the hybrid (its per-tensor network runs batched over tensors) and the compiled kernels (tested).

Compiling is per instance: an instance whose ``torch.compile`` fails warns once and runs the
eager pass from then on, while other instances still compile. The compiled function is shared
across the process once it has run successfully (a cache of successes only), so the normal case
compiles once per process and dtype.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.optim.adamw import adamw as _adamw

from .._checks import check_number
from ..nets import DirectUpdateMLP, HybridAdamNet, LinearUpdate, UpdateNet
from ..nets.weights import SHIPPED_NETS, load_net
from .base import NestoptOptimizer, refuse_sparse
from .counters import bump, outcome
from .groups import LR_MAX, decay_within_rate, number
from .distributed import is_dtensor, locals_, refuse_sharded, sq_norms, sum_partials
from .learned_device import DeviceSteps
from .tensors import flat_alias as _flat, fused_ok
from .transaction import commit, evaluate

def _resolve(net: UpdateNet | str | Path) -> UpdateNet:
    if isinstance(net, UpdateNet):
        return net
    if isinstance(net, str) and net in SHIPPED_NETS:
        path = SHIPPED_NETS[net]
        if not path.is_file():
            raise ValueError(f"net={net!r} is invalid in this installation: its weights file {str(path)!r} is "
                             "missing; reinstall nestopt, or pass an UpdateNet or a path written by save_net")
        return load_net(path)
    if isinstance(net, str | Path):
        loaded = load_net(net)
        if not isinstance(loaded, UpdateNet):
            raise ValueError(f"net file {str(net)!r} holds a {loaded.config()['kind']}, not an update network: "
                             "pass it to NestedOptimizer(controller=...)")
        return loaded
    raise ValueError(f"net={net!r} is invalid: expected 'default', 'mlp', a path to a .safetensors file, or an UpdateNet")


class LearnedOptimizer(DeviceSteps, NestoptOptimizer):
    """See the module docstring.

    Args:
        params: parameters or param-group dicts.
        net: ``"default"`` (the shipped linear network), ``"mlp"`` (the shipped per-element MLP), a
            path, or an :class:`~nestopt.nets.UpdateNet`.
        lr: multiplier on the network's update (what a scheduler drives).
        weight_decay: decoupled decay, scaled by ``lr`` and the network's step size.
        chunk: elements per chunk for the per-element MLP's evaluation (default: 32768 on the
            CPU, where the hidden activations then stay in cache; whole tensors on a GPU, where
            each chunk costs kernel launches).
        compile: how the linear network's elementwise pass runs. ``None`` (default): compiled by
            ``torch.compile`` into one fused pass for tensors of at least 65536 elements
            (compiled once per process and dtype, a few seconds on the first step; where
            compiling fails, for example with no C++ compiler, a warning says so and this
            instance runs the same arithmetic as separate torch operations from then on);
            ``True``: compiled for every tensor, errors raised; ``False``: never compiled. The
            per-element MLP's chunks and the capturable step's kernels follow the same rule.
        capturable: ``None`` (on for CUDA parameters), ``True`` or ``False``: the step with no
            host read (module docstring).
    """

    group_spec = {"lr": number(0.0, LR_MAX), "weight_decay": number(0.0)}
    group_rules = (decay_within_rate,)
    supports = frozenset({"bfloat16"})
    unsupported_why = {"complex": "its networks read g * g and |g| as real features"}

    def _check_param(self, p: torch.Tensor, where: str) -> None:
        super()._check_param(p, where)
        if p.dim() == 0:
            raise ValueError(f"{where} is a 0-d tensor, which LearnedOptimizer does not support: its networks keep "
                             "per-tensor statistics beside per-element ones; give it shape (1,) instead")
    _PICKLED = ("net", "chunk", "compile")  # configuration kept by deepcopy and pickle (not the caches)

    def __init__(self, params: Iterable[Any], net: UpdateNet | str | Path = "default", lr: float = 1.0,
                 weight_decay: float = 0.0, *, chunk: int | None = None, compile: bool | None = None,
                 process_group: Any = "auto", capturable: bool | None = None) -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        check_number("weight_decay", weight_decay, lo=0.0)
        if compile not in (None, True, False):
            raise ValueError(f"compile={compile!r} is invalid: expected None, True or False")
        self.net = _resolve(net)
        self.net.requires_grad_(False)
        self.chunk = chunk
        self.compile = compile
        self._kernel: Callable[..., None] | None = None  # this instance's torch.compile'd pass
        self._compile_failed = False  # set once compiling failed here (compile=None): eager from then on
        self.process_group = process_group
        self.capturable = capturable
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups: keep the configuration too, so a
        # deepcopy or an unpickled optimizer can step (compiled kernels and device copies are caches)
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_kernel", None)
        self.__dict__.setdefault("_compile_failed", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        loss = None
        if closure is not None:
            loss = evaluate(self, closure)
        # a zero-element tensor has nothing to update (and no mean to take)
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None and p.numel()]
        if not work:
            return loss
        refuse_sparse(self, [p.grad for _, p in work])
        on_device = self.on_device([p for _, p in work])
        commit(self)
        for _, p in work:
            st = self.state[p]
            if not st:
                st.update(self.net.init_state(p))
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else None)
                for k, v in list(st.items()):
                    if k != "step" and v.dim() == 0:
                        # per-tensor scalars as Python floats: Optimizer.load_state_dict would cast a
                        # float64 tensor to the parameter's dtype and lose the round trip (a
                        # capturable step keeps them on the device and writes them here when read)
                        if on_device:
                            self.__dict__.setdefault("_live_scalars", {}).setdefault(p, {})[k] = \
                                v.to(p.device, torch.float64)
                            st[k] = math.nan  # (until _flush_device writes the value)
                        else:
                            st[k] = float(v)
            elif on_device and st["step"].device != p.device:  # a host-path or loaded counter: once
                st["step"] = st["step"].to(p.device)
        if on_device:
            ok = self._step_device(work)
            self._count_on_device(outcome(self.count_keys(), [("nonfinite", ~ok)], "steps"))
            return loss
        if isinstance(self.net, HybridAdamNet):
            ok = self._hybrid(work)
        elif isinstance(self.net, LinearUpdate):
            ok = self._linear(work)
        else:
            ok = self._generic(work)
        bump(self.param_groups, "steps" if ok else "nonfinite")
        return loss

    # -- the hybrid network on torch's fused AdamW kernel -------------------------------------------
    def _hybrid(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        net = self.net
        assert isinstance(net, HybridAdamNet)
        b1, b2 = net.betas
        ps = [p for _, p in work]
        gs = [p.grad for p in ps]
        ms = [self.state[p]["exp_avg"] for p in ps]
        # One read of gradients, momenta and parameters for every tensor, one host sync.
        # (under FSDP2 each rank's shards give partial sums, added over the ranks in one collective)
        rows = [torch.stack([torch.dot(g.reshape(-1), m.reshape(-1)), torch.dot(g.reshape(-1), g.reshape(-1)),
                             torch.dot(p.reshape(-1), p.reshape(-1))]).double()
                for g, m, p in zip(locals_(gs), locals_(ms), locals_(ps))]
        host = sum_partials(self, torch.stack(rows).reshape(-1), ps).reshape(len(rows), 3).tolist()
        if not all(math.isfinite(v) for row in host for v in row):
            return False
        base = math.exp(float(net.base))
        plan = []
        for (group, p), (gm, gg, pp) in zip(work, host):
            st = self.state[p]
            s, mm, vs = net.scale_from_sums(gm, gg, pp, float(st["m_sq"]), float(st["v_sum"]), p.numel(),
                                            int(st["step"]) + 1)
            plan.append((group["lr"] * base * math.exp(float(s)), mm, vs))
        if not all(math.isfinite(lr_i) for lr_i, _, _ in plan):
            return False  # a degenerate feature: nothing has been touched yet
        for (group, p), g, m, (lr_i, mm, vs) in zip(work, gs, ms, plan):
            st, fused = self.state[p], fused_ok([p])
            # torch's AdamW kernel at this tensor's rate (it advances st["step"] itself)
            _adamw([p], [g], [m], [st["exp_avg_sq"]], [], [st["step"]], foreach=not fused,
                   fused=fused, amsgrad=False, beta1=b1, beta2=b2, lr=lr_i,
                   weight_decay=group["weight_decay"], eps=net.eps, maximize=False)
            st["m_sq"], st["v_sum"] = mm, vs
        return True

    # -- the linear network: two dot products per tensor and one fused elementwise pass ----------
    def _linear(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        net = self.net
        assert isinstance(net, LinearUpdate)
        ps = [p for _, p in work]
        sq, _ = sq_norms(self, [p.grad for p in ps] + ps)  # ||g||^2, ||p||^2: one read each, one sync
        n = len(ps)
        if not all(map(math.isfinite, sq[:n])):
            return False
        w = net.net.weight.detach().reshape(-1).tolist()
        b = float(net.net.bias.detach())
        batch: list[tuple[torch.Tensor, dict[str, Any], list[float]]] = []  # for the multi-tensor pass
        size = 0
        for (group, p), g_sq, p_sq in zip(work, sq[:n], sq[n:]):
            st = self.state[p]
            st["step"] += 1
            t = int(st["step"])
            a = group["lr"] * net.step_mult
            dec = 1 - a * group["weight_decay"]  # decoupled decay first, as in the reference
            st["v_bar"], r, r_p = net.scales(g_sq / p.numel(), st["v_bar"], p_sq * dec * dec / p.numel(), t)
            k = [dec * (1 - a * w[3] / r_p), a * w[0] / r, a * w[1] / r, a * w[2] / r, a * b,
                 a * w[4] / (1 - 0.9**t), a * w[5], 1 / (1 - 0.999**t), 1e-8]
            compiled = self._compiled(p)
            if compiled is not None:
                compiled(*(_flat(x) for x in (p, p.grad, st["m"], st["m_slow"], st["v"])),
                         torch.tensor(k, dtype=p.dtype, device=p.device))
                continue
            batch.append((p, st, k))
            size += p.numel()
            if size >= _BATCH:  # bounds the pass's temporaries to a few batches' worth of floats
                _linear_foreach(batch)
                batch, size = [], 0
        if batch:
            _linear_foreach(batch)
        return True

    def _compiled(self, p: torch.Tensor) -> Callable[..., None] | None:
        """The compiled elementwise pass for ``p`` where ``compile`` asks for it; ``None``: the
        multi-tensor eager pass."""
        if self.compile is False or is_dtensor(p) or \
                (self.compile is None and (p.numel() < _COMPILE_MIN or self._compile_failed)):
            return None
        return self._run_compiled

    def _run_compiled(self, *args: torch.Tensor) -> None:
        """:func:`_linear_pass` compiled: the process-wide kernel once one has run, else this
        instance's own attempt, published for the others when it succeeds. With ``compile=None`` a
        failure warns once, marks this instance only, and runs the eager pass (same result)."""
        global _COMPILED
        kernel = _COMPILED if _COMPILED is not None else self._kernel
        if self.compile:  # True: errors are the caller's to see
            if kernel is None:
                kernel = self._kernel = torch.compile(_linear_pass, dynamic=True)
            kernel(*args)
        else:
            try:
                if kernel is None:
                    kernel = self._kernel = torch.compile(_linear_pass, dynamic=True)
                kernel(*args)
            except Exception as e:  # torch.compile raises many types (no compiler, unsupported platform)
                self._compile_failed = True
                warnings.warn(f"LearnedOptimizer: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); this "
                              "optimizer runs the linear network's step as separate torch operations (same result, "
                              "slower). Pass compile=False to skip the attempt.", RuntimeWarning, stacklevel=3)
                _linear_pass(*args)
                return
        if _COMPILED is None:
            _COMPILED = kernel  # a cache of successes only

    def _net_on(self, device: torch.device) -> UpdateNet:
        """The network on ``device`` (a copy per device, made once; the CPU original is kept)."""
        if device.type == "cpu":
            return self.net
        cache = self.__dict__.setdefault("_device_nets", {})
        if device not in cache:
            cache[device] = copy.deepcopy(self.net).to(device)
        return cache[device]

    # -- any network through its reference update (the MLP chunked) --------------------------------
    def _generic(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        refuse_sharded(self, [p for _, p in work], f"with net={type(self.net).__name__} (its per-element network "
                       "normalises over whole tensors)")
        gs = [p.grad for _, p in work]
        if not all(math.isfinite(v) for v in torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in gs]).tolist()):
            return False
        for group, p in work:
            st = self.state[p]
            st["step"] += 1
            t = int(st["step"])
            net = self._net_on(p.device)
            bufs = {k: st[k] for k in self.net.buffers}
            c = getattr(net, "step_mult", 1.0)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * c * group["weight_decay"])
            if isinstance(net, DirectUpdateMLP):
                chunk = self.chunk or (1 << 15 if p.device.type == "cpu" else 1 << 62)
                if self._compiled_mlp(net, p):  # large tensors: one compiled kernel per chunk (faster)
                    new = net.advance(p.grad, bufs, inplace=True)
                    bc = torch.tensor([1 - 0.9**t, 1 - 0.999**t], dtype=torch.float64, device=p.device)
                    self._mlp_chunks_compiled(net, p, p.grad, new, net.normalisers(p, p.grad, new), bc,
                                              torch.ones((), dtype=torch.bool, device=p.device), chunk, group["lr"])
                    continue
                _mlp_apply_(net, p, p.grad, bufs, t, chunk, group["lr"])
                continue
            delta, new = net.update(p, p.grad, bufs, t)
            p.add_(delta, alpha=group["lr"])
            for k, v in new.items():
                st[k].copy_(v)
        return True


def _mlp_apply_(net: DirectUpdateMLP, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: int,
                chunk: int, alpha: float) -> None:
    """``p += alpha * delta`` with ``delta`` from ``net.update``, evaluated ``chunk`` elements at a
    time so the hidden activations stay in cache, and the buffers advanced in place (same
    arithmetic as the reference; the per-tensor normalisers are computed over the whole tensor
    first)."""
    new = net.advance(g, state, inplace=True)
    norms = net.normalisers(p, g, new)
    flat = p.view(-1) if p.is_contiguous() else None
    if flat is None:  # rare: a non-contiguous parameter
        p.add_(net.step_from_rows(net.rows(p, g, new, norms, t)).reshape(p.shape).to(p.dtype), alpha=alpha)
        return
    n = flat.numel()
    for i in range(0, n, chunk):
        sl = slice(i, min(i + chunk, n))
        flat[sl].add_(net.step_from_rows(net.rows(p, g, new, norms, t, sl)).to(p.dtype), alpha=alpha)


_COMPILE_MIN = 1 << 16
_BATCH = 1 << 22
_COMPILED: Any = None  # torch.compile(_linear_pass) once a call of it has succeeded (successes only)


def _linear_pass(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, m_slow: torch.Tensor, v: torch.Tensor,
                 k: torch.Tensor) -> None:
    """:class:`~nestopt.nets.LinearUpdate`'s step with its per-tensor scalars folded into
    ``k`` (see ``LearnedOptimizer._linear``): the buffers advance and ``p`` moves in place. The
    source of the compiled kernel; :func:`_linear_foreach` is the same arithmetic, in the same
    order, over many tensors at once."""
    m.lerp_(g, 0.1)
    m_slow.lerp_(g, 0.01)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
    vh = (v * k[7]).sqrt() + k[8]
    p.mul_(k[0]).sub_(k[1] * g + k[2] * m + k[3] * m_slow + k[4] + (k[5] * m + k[6] * g) / vh)


def _linear_foreach(batch: list[tuple[torch.Tensor, dict[str, Any], list[float]]]) -> None:
    """:func:`_linear_pass` for each ``(p, state, k)`` in ``batch``, by multi-tensor kernels: a
    dozen launches for the whole batch instead of a dozen per tensor (small tensors are bound by
    launches, not memory)."""
    ps = [p for p, _, _ in batch]
    gs = [p.grad for p in ps]
    ms, mss, vs = ([st[key] for _, st, _ in batch] for key in ("m", "m_slow", "v"))
    ks = [[k[j] for _, _, k in batch] for j in range(9)]
    torch._foreach_lerp_(ms, gs, 0.1)
    torch._foreach_lerp_(mss, gs, 0.01)
    torch._foreach_mul_(vs, 0.999)
    torch._foreach_addcmul_(vs, gs, gs, value=0.001)
    vh = torch._foreach_mul(vs, ks[7])
    torch._foreach_sqrt_(vh)
    torch._foreach_add_(vh, ks[8])
    adam = torch._foreach_mul(ms, ks[5])
    torch._foreach_add_(adam, torch._foreach_mul(gs, ks[6]))
    torch._foreach_div_(adam, vh)
    d = torch._foreach_mul(gs, ks[1])
    torch._foreach_add_(d, torch._foreach_mul(ms, ks[2]))
    torch._foreach_add_(d, torch._foreach_mul(mss, ks[3]))
    torch._foreach_add_(d, ks[4])
    torch._foreach_add_(d, adam)
    torch._foreach_mul_(ps, ks[0])
    torch._foreach_sub_(ps, d)
