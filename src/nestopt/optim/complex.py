r"""Complex-valued momentum (Lorraine et al., "Complex Momentum for Optimization in Games", 2022).

The momentum coefficient is a complex number ``beta = |beta| e^{i phase}``; the buffer is complex,
the parameter update real:

.. math::

    \mu_{t+1} = \beta\,\mu_t - g_t, \qquad \theta_{t+1} = \theta_t + \alpha\,\mathrm{Re}(\mu_{t+1})

Unrolled, ``mu_t = -sum_k beta^k g_{t-1-k}`` and ``Re(beta^k) = |beta|^k cos(k phase)``: ``|beta|``
sets how fast old gradients decay, the phase how often their sign flips, so the buffer alternates
between adding and subtracting the past. On the rotational dynamics of adversarial games (the
bilinear game's Jacobian has imaginary eigenvalues) a suitable phase damps the rotation that makes
gradient descent-ascent spiral out; phase 0 is heavy-ball momentum.

**Storage.** Real parameters, complex state: ``Optimizer.load_state_dict`` casts floating state
to the parameter's dtype, which would drop an imaginary part, so the buffer is stored as a real
tensor ``state["momentum_buffer"]`` of shape ``(2, *param.shape)`` holding ``[Re, Im]`` of
``m = -mu``. That is torch's sign convention (``torch.optim.SGD`` keeps ``buf = momentum * buf +
g`` and subtracts it): with phase 0, plane 0 is exactly SGD's ``momentum_buffer`` and the
iterates are bitwise those of ``SGD(momentum=beta)``. :meth:`ComplexMomentum.complex_buffer`
returns ``mu`` as a complex tensor.

**Cost.** Per element and step the update reads ``theta, g, Re m, Im m`` and writes three of
them, against heavy ball's three reads and two writes: a floor near 1.4x ``SGD(momentum,
foreach=True)`` for memory-bound kernels. Three passes do it: ``t = g - Im(beta) Im m`` and two
calls of torch's fused SGD kernel (see ``_rotate``). On CPU they run block by block (``_BLOCK``
elements at a time) so a block's operands stay in cache between passes; on other devices as
multi-tensor kernels over all parameters. Measure with ``nestopt overhead``.

**Safety.** If any gradient of a param group holds a non-finite value that group's step is
skipped (its parameters and buffers untouched; the other groups step) and counted per group, as
every nestopt optimizer counts (:mod:`nestopt.optim.counters`, scope ``"group"``):
``param_group["counters"]["nonfinite"]``, next to ``"steps"``; ``opt.counters`` sums the groups.
One extra read of the gradients.

**Capturable steps** (``capturable=``; see :mod:`nestopt.optim.base`): the same per-group rule
with no host read. Each group's "all finite" is a device flag, a skipped group is masked on the
device (its parameters and buffers bitwise as they were: torch's fused SGD kernel's
``found_inf``, or a select against the old values) while the other groups step, and the counts go
to a ``(groups, counters)`` tensor on the device until they are read. :class:`ComplexAdam` keeps
``state["step"]`` on the parameter's device and computes its bias corrections from it there.

Usage::

    opt = ComplexMomentum(model.parameters(), lr=0.1, beta=0.9, phase=math.pi / 8)
    loss.backward(); opt.step()
"""

from __future__ import annotations

import abc
import cmath
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .._checks import check_number
from .distributed import refuse_sharded
from .base import NestoptOptimizer, refuse_sparse
from .counters import bump, outcome
from .groups import LR_MAX, choice, decay_within_rate, number, pair
from .tensors import pick
from .transaction import commit, evaluate

# Elements per block on CPU: 2^18 floats = 1 MB per operand, so the five operands of a block
# (theta, g, Re m, Im m, scratch) fit in a few MB of cache between the passes. Measured on a
# 2-core EPYC (1 MB L2 per core, 8 MB L3), 10M parameters, kernel alone: 13.9 ms with blocks of
# 2^17 or 2^18, 13.3 ms with 2^19, 14.5 ms with 2^20; SGD(momentum=0.9, foreach=True) 12.8 ms.
_BLOCK = 1 << 18


def _beta(magnitude: float, phase: float) -> tuple[float, float]:
    """``(Re beta, Im beta)``; phase 0 gives an exact ``(magnitude, 0.0)``."""
    if phase == 0.0:
        return magnitude, 0.0
    # cmath.rect's own arithmetic (r cos, r sin), which torch.compile can trace and cmath it cannot
    return magnitude * math.cos(phase), magnitude * math.sin(phase)


def _finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether the gradients' sums (in float32 at least) are all finite, as a device flag (what
    :func:`_all_finite` reads)."""
    sums = [g.sum(dtype=torch.float32) if g.element_size() < 4 else g.sum() for g in grads]
    return torch.stack(sums).isfinite().all()


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """One read of the gradients: their sums (in float32 at least) are finite. A NaN or infinity
    makes its sum non-finite; so would finite values whose sum overflows float32 (above 3e38),
    which are treated the same way (such a step would overflow the parameters anyway). A sum
    reads faster than ``aminmax`` (1.9 vs 2.4 ms on 10M floats) and a float64 sum costs 15 ms."""
    if not grads:
        return True
    return bool(_finite(grads))


# torch's fused SGD kernel (what ``SGD(fused=True)`` calls): ``buf = momentum * buf + grad + wd *
# param; param -= lr * buf`` in one pass. Two calls carry the complex update: the imaginary plane
# as a momentum-free "parameter" with ``lr = -Im(beta)`` and ``wd = -(1 - Re(beta)) / Im(beta)``
# (``b - lr (a + wd b) = Re(beta) b + Im(beta) a``), and the real plane as heavy ball on ``t``.
# It is a private op: without it, or if ``_USE_FUSED`` is turned off, plain element-wise ops do
# the same arithmetic (a test checks the two paths agree).
_USE_FUSED = hasattr(torch, "_fused_sgd_")


def _fused(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
           lr: float, momentum: float, weight_decay: float) -> None:
    torch._fused_sgd_(params, grads, bufs, weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=0.0,
                      nesterov=False, maximize=False, is_first_step=False)


def _fused_ok() -> bool:
    """The fused kernel is there and usable: not under ``torch.compile`` (it has no meta kernel)."""
    return _USE_FUSED and not torch.compiler.is_compiling()


def _fusable(beta_re: float, beta_im: float) -> bool:
    """The fused trick's ``wd = -(1 - Re beta) / Im beta`` stays far from float32's range (a tiny
    ``Im beta`` makes it overflow, and ``inf * 0`` NaN: beta = 1e-76 did)."""
    return abs((1.0 - beta_re) / beta_im) < 1e15


def _rotate(re: list[torch.Tensor], im: list[torch.Tensor], t: list[torch.Tensor], params: list[torch.Tensor],
            *, lr: float, beta_re: float, beta_im: float, fused: bool | None = None) -> None:
    """``Im m <- Re(beta) Im m + Im(beta) Re m;  Re m <- Re(beta) Re m + t;  theta -= lr Re m``
    (``t = g - Im(beta) Im m`` was computed from the old imaginary plane). The fused kernel takes
    lists of one device and dtype and tensors laid out alike (the caller sees to both)."""
    if (_fused_ok() and _fusable(beta_re, beta_im)) if fused is None else fused:
        _fused(im, re, [], lr=-beta_im, momentum=0.0, weight_decay=-(1.0 - beta_re) / beta_im)
        _fused(params, t, re, lr=lr, momentum=beta_re, weight_decay=0.0)
        return
    torch._foreach_mul_(im, beta_re)
    torch._foreach_add_(im, re, alpha=beta_im)
    torch._foreach_mul_(re, beta_re)
    torch._foreach_add_(re, t)
    torch._foreach_add_(params, re, alpha=-lr)


def complex_momentum_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
                          lr: float, beta_re: float, beta_im: float, weight_decay: float = 0.0,
                          foreach: bool = False, scratch: dict[Any, torch.Tensor] | None = None) -> None:
    """The kernel, in torch's sign (``m = -mu``), on ``bufs[i] = [Re m, Im m]`` in place::

        t = g - Im(beta) Im(m);  Im(m) <- Re(beta) Im(m) + Im(beta) Re(m)
        Re(m) <- Re(beta) Re(m) + t;  theta <- theta - lr Re(m)

    which is ``m <- beta m + g, theta <- theta - lr Re(m)``. With ``Im(beta) == 0`` it is
    heavy ball, computed in SGD's order (``Re m * beta + g``) so the result is bitwise SGD's.
    ``scratch`` caches the CPU path's block-sized work buffer across calls (keyed by dtype and
    device; a fresh buffer each step costs page faults)."""
    if weight_decay != 0.0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    re = [b[0] for b in bufs]
    im = [b[1] for b in bufs]
    if beta_im == 0.0:
        if foreach:
            torch._foreach_mul_(re, beta_re)
            torch._foreach_add_(re, grads)
            torch._foreach_mul_(im, beta_re)
            torch._foreach_add_(params, re, alpha=-lr)
        else:
            for p, g, a, b in zip(params, grads, re, im):
                a.mul_(beta_re).add_(g)
                b.mul_(beta_re)
                p.add_(a, alpha=-lr)
        return
    if foreach:
        kinds: dict[tuple[Any, Any], list[int]] = {}
        for i, p in enumerate(params):
            kinds.setdefault((p.device, p.dtype), []).append(i)
        for idx in kinds.values():  # one multi-tensor call per device and dtype
            ps, gs, rs, js = ([x[i] for i in idx] for x in (params, grads, re, im))
            plain = not all(p.is_contiguous() and g.is_contiguous() for p, g in zip(ps, gs))
            t = torch._foreach_sub(gs, js, alpha=beta_im)
            _rotate(rs, js, t, ps, lr=lr, beta_re=beta_re, beta_im=beta_im, fused=False if plain else None)
        return
    cache: dict[Any, torch.Tensor] = {} if scratch is None else scratch
    wd_im, lr_im = -(1.0 - beta_re) / beta_im, -beta_im
    fused = _fused_ok() and _fusable(beta_re, beta_im)
    for p, g, a, b in zip(params, grads, re, im):
        if not p.is_contiguous():  # a strided parameter (a transposed view): whole-tensor plain ops
            _rotate([a], [b], [g.sub(b, alpha=beta_im)], [p], lr=lr, beta_re=beta_re, beta_im=beta_im, fused=False)
            continue
        key = (p.dtype, p.device)
        work = cache.get(key)
        if work is None or work.numel() < min(_BLOCK, p.numel()):
            work = cache[key] = torch.empty(min(_BLOCK, max(x.numel() for x in params)), dtype=p.dtype,
                                            device=p.device)
        pf, gf, af, bf = p.view(-1), g.reshape(-1), a.view(-1), b.view(-1)
        n = pf.numel()
        # narrow() is a cheap C++ view: Python overhead per block is what limits how small a
        # block can be
        for i in range(0, n, _BLOCK):
            k = min(_BLOCK, n - i)
            pb, gb, ab, bb = pf.narrow(0, i, k), gf.narrow(0, i, k), af.narrow(0, i, k), bf.narrow(0, i, k)
            t = work if k == work.numel() else work.narrow(0, 0, k)
            torch.sub(gb, bb, alpha=beta_im, out=t)
            if fused:
                torch._fused_sgd_([bb], [ab], [], weight_decay=wd_im, momentum=0.0, lr=lr_im, dampening=0.0,
                                  nesterov=False, maximize=False, is_first_step=False)
                torch._fused_sgd_([pb], [t], [ab], weight_decay=0.0, momentum=beta_re, lr=lr, dampening=0.0,
                                  nesterov=False, maximize=False, is_first_step=False)
            else:
                _rotate([ab], [bb], [t], [pb], lr=lr, beta_re=beta_re, beta_im=beta_im)


class _SkippingOptimizer(NestoptOptimizer, metaclass=abc.ABCMeta):
    """What both optimizers share: per-group counters (``group["counters"]``, scope ``"group"``),
    a block buffer cache, and :meth:`_groups`, which yields each group's parameters and
    gradients after skipping (and counting) a group whose gradients are not all finite; a group
    yielded counts as a step taken."""

    counter_scope = "group"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], process_group: Any = "auto",
                 capturable: bool | None = None) -> None:
        self.process_group = process_group
        self.capturable = capturable
        super().__init__(params, defaults)
        self._scratch: dict[Any, torch.Tensor] = {}  # the CPU kernels' block buffers (not state)

    @classmethod
    def _migrate_group(cls, group: dict[str, Any]) -> None:
        # before the counters convention a group counted its skips in group["skipped"]
        if "skipped" in group:
            skipped = int(group.pop("skipped"))
            group.setdefault("counters", {"nonfinite": skipped})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})  # not pickled: a deepcopy or unpickled copy starts empty

    def _groups(self) -> Iterator[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            refuse_sparse(self, grads)
            refuse_sharded(self, params, "(its momentum state has shape (2, *param.shape), real and imaginary planes)")
            if not _all_finite(grads):
                bump([group], "nonfinite")
                continue
            commit(self)
            yield group, params, grads
            bump([group], "steps")

    @abc.abstractmethod
    def _update(self) -> None:
        """Update every group that :meth:`_groups` yields (called by :meth:`step` under ``no_grad``)."""

    @abc.abstractmethod
    def _update_group_device(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                             ok: torch.Tensor) -> None:
        """The capturable update of one group, masked where ``ok`` (a device bool) does not hold:
        then every parameter and buffer of the group stays bitwise as it was."""

    def _update_device(self) -> None:
        """The capturable step: :meth:`_groups`' rule with each group's decision on the device."""
        items = []
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                refuse_sparse(self, grads)
                refuse_sharded(self, params, "(its momentum state has shape (2, *param.shape), real and imaginary planes)")
                items.append((i, group, params, grads))
        if not items:
            return
        keys = self.count_keys()
        zero = torch.zeros(len(keys), dtype=torch.int64, device=items[0][2][0].device)
        rows = [zero] * len(self.param_groups)  # a group with no gradients counts nothing
        commit(self)
        for i, group, params, grads in items:
            ok = _finite(grads)
            self._update_group_device(group, params, grads, ok)
            rows[i] = outcome(keys, [("nonfinite", ~ok)], "steps")
        self._count_on_device(torch.stack(rows))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            loss = evaluate(self, closure)
        if self.on_device():
            self._update_device()
        else:
            self._update()
        return loss


class ComplexMomentum(_SkippingOptimizer):
    """Gradient descent with complex momentum ``beta = beta e^{i phase}`` (module docstring).

    Args:
        params: parameters or param-group dicts.
        lr: ``alpha``, the (real) step size.
        beta: ``|beta|`` in ``[0, 1)``.
        phase: ``arg(beta)`` in radians, in ``[-pi, pi]`` (0: heavy ball; pi: negative momentum).
        weight_decay: L2 penalty added to the gradient (as in ``torch.optim.SGD``).
        foreach: multi-tensor kernels (default: on for non-CPU parameters, off on CPU where the
            blocked per-tensor path is faster).
        capturable: ``None`` (on for CUDA parameters), ``True`` or ``False``: the step with no
            host read (module docstring). With a phase that is not 0 it is the default step's two
            fused SGD passes over whole tensors, masked by their ``found_inf``; at phase 0 (heavy
            ball) the default step's kernel with the group's old values put back where it skipped
            (a copy of each tensor: slower). Bitwise the default step's numbers.

    The default ``phase = pi/8`` is an "almost positive" momentum, which the paper suggests as a
    first guess when the game's spectrum is unknown. For a constant gradient the buffer settles at
    ``-g / (1 - beta)``, so the effective step is ``lr * Re(1 / (1 - beta))`` (10 lr for heavy ball
    0.9, about 1.15 lr for ``0.9 e^{i pi/8}``).

    Example::

        >>> import math, torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = ComplexMomentum([w], lr=0.1, beta=0.9, phase=math.pi / 8)
        >>> (w ** 2).sum().backward(); opt.step()
        >>> opt.complex_buffer(w).dtype
        torch.complex64
    """

    group_spec = {"lr": number(0.0, LR_MAX), "beta": number(0.0, 1.0, hi_open=True), "phase": number(-math.pi, math.pi),
                  "weight_decay": number(0.0), "foreach": choice(None, True, False)}
    group_rules = (decay_within_rate,)
    supports = frozenset({"float16", "bfloat16"})
    unsupported_why = {"complex": "its momentum is complex for real parameters (store a complex parameter as "
                                  "real pairs with torch.view_as_real)"}

    def __init__(self, params: Iterable[Any], lr: float = 0.1, beta: float = 0.9, phase: float = math.pi / 8,
                 *, weight_decay: float = 0.0, foreach: bool | None = None, process_group: Any = "auto",
                 capturable: bool | None = None) -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        check_number("beta", beta, lo=0.0, hi=1.0, hi_open=True)
        check_number("phase", phase, lo=-math.pi, hi=math.pi)
        check_number("weight_decay", weight_decay, lo=0.0)
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach={foreach!r} is invalid: expected None, True or False")
        super().__init__(params, {"lr": lr, "beta": beta, "phase": phase, "weight_decay": weight_decay,
                                  "foreach": foreach}, process_group, capturable)

    def complex_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """``mu`` of the paper (``-m``) for parameter ``p`` as a complex tensor."""
        buf = self.state[p]["momentum_buffer"]
        return torch.complex(-buf[0], -buf[1])

    def _update(self) -> None:
        for group, params, grads in self._groups():
            bufs = self._buffers(params)
            foreach = group["foreach"]
            if foreach is None:
                foreach = params[0].device.type != "cpu"
            beta_re, beta_im = _beta(group["beta"], group["phase"])
            complex_momentum_step(params, grads, bufs, lr=group["lr"], beta_re=beta_re, beta_im=beta_im,
                                  weight_decay=group["weight_decay"], foreach=foreach, scratch=self._scratch)

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros((2, *p.shape), dtype=p.dtype, device=p.device)
            bufs.append(st["momentum_buffer"])
        return bufs

    def _update_group_device(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                             ok: torch.Tensor) -> None:
        bufs = self._buffers(params)
        beta_re, beta_im = _beta(group["beta"], group["phase"])
        lr, wd = group["lr"], group["weight_decay"]
        skip = (~ok).to(torch.float32)
        kinds: dict[tuple[Any, Any], list[int]] = {}
        for i, p in enumerate(params):
            kinds.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in kinds.items():
            ps, gs, bs = ([x[i] for i in idx] for x in (params, grads, bufs))
            # the default step's two fused passes, masked by found_inf (bitwise the same where the
            # default step takes them; heavy ball's fused pass rounds a tensor's tail differently)
            fused = (_USE_FUSED and beta_im != 0.0 and _fusable(beta_re, beta_im) and device.type in ("cpu", "cuda")
                     and not torch.compiler.is_compiling()
                     and all(p.is_contiguous() and g.is_contiguous() for p, g in zip(ps, gs)))
            if not fused:  # the default kernel, then the old values back where the group skipped
                old = [x.clone() for x in ps + bs]
                foreach = group["foreach"]
                if foreach is None:
                    foreach = device.type != "cpu"
                complex_momentum_step(ps, gs, bs, lr=lr, beta_re=beta_re, beta_im=beta_im, weight_decay=wd,
                                      foreach=foreach, scratch=self._scratch)
                for x, o in zip(ps + bs, old):
                    torch.where(ok, x, o, out=x)
                continue
            if wd != 0.0:
                gs = torch._foreach_add(gs, ps, alpha=wd)
            re, im = [b[0] for b in bs], [b[1] for b in bs]
            t = torch._foreach_sub(gs, im, alpha=beta_im)  # from the old imaginary plane (see _rotate)
            torch._fused_sgd_(im, re, [], weight_decay=-(1.0 - beta_re) / beta_im, momentum=0.0, lr=-beta_im,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False, found_inf=skip)
            torch._fused_sgd_(ps, t, re, weight_decay=0.0, momentum=beta_re, lr=lr, dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False, found_inf=skip)


def _complex_adam_blocks(p: torch.Tensor, g: torch.Tensor, re: torch.Tensor, im: torch.Tensor, v: torch.Tensor,
                         cache: dict[Any, torch.Tensor], *, b_re: float, b_im: float, beta2: float, c: complex,
                         bc2_sqrt: float, lr: float, eps: float) -> None:
    """One complex Adam update of one tensor, block by block with two cached work buffers (no
    allocation, operands in cache between the passes; see ``_BLOCK``)::

        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr Re(c m) / (sqrt(v) / bc2_sqrt + eps),   c = 1 / (1 - beta1^t)
    """
    key = (p.dtype, p.device)
    work = cache.get(key)
    if work is None or work.shape[1] < min(_BLOCK, p.numel()):
        work = cache[key] = torch.empty((2, min(_BLOCK, max(p.numel(), 1))), dtype=p.dtype, device=p.device)
    pf, gf, af, bf, vf = p.view(-1), g.view(-1), re.view(-1), im.view(-1), v.view(-1)
    n = pf.numel()
    for i in range(0, n, _BLOCK):
        k = min(_BLOCK, n - i)
        pb, gb, ab, bb, vb = (x.narrow(0, i, k) for x in (pf, gf, af, bf, vf))
        t1, t2 = work[0, :k], work[1, :k]
        torch.mul(ab, b_re, out=t1)  # new Re m = Re(beta) Re m - Im(beta) Im m + (1 - Re beta) g
        t1.add_(bb, alpha=-b_im).add_(gb, alpha=1 - b_re)
        bb.mul_(b_re).add_(ab, alpha=b_im).add_(gb, alpha=-b_im)  # Im m: Im(beta) Re m + Re(beta) Im m - Im(beta) g
        ab.copy_(t1)
        vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
        torch.sqrt(vb, out=t2)
        t2.div_(bc2_sqrt).add_(eps)
        torch.mul(ab, c.real, out=t1)
        t1.add_(bb, alpha=-c.imag)  # Re(c m)
        pb.addcdiv_(t1, t2, value=-lr)


class ComplexAdam(_SkippingOptimizer):
    r"""Adam whose first moment is a complex moving average, ``beta1 = |beta1| e^{i phase}``.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2

        \theta_t = \theta_{t-1} - \mathrm{lr}\,\frac{\mathrm{Re}\big(m_t / (1 - \beta_1^t)\big)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    The paper reports a complex Adam variant that trained BigGAN to better inception scores; this
    is our reading of it, not a transcription. The complex coefficient ``(1 - beta1)`` makes the
    average pass a constant gradient unchanged at every phase (its gain at frequency 0 is 1), and
    the complex bias correction ``1 - beta1^t`` makes that exact from the first step, so the step
    size means what it means for Adam while the phase makes the average oscillate on rotating
    gradients. Phase 0 is exactly ``torch.optim.Adam`` (a test checks it bitwise).
    ``weight_decay`` is decoupled (AdamW). ``state["exp_avg"]`` has shape ``(2, *param.shape)``:
    ``[Re m, Im m]``, stored real for the reason given in the module docstring. Non-finite
    gradients skip the group's step (counted in ``group["counters"]["nonfinite"]``).

    ``capturable`` (``None``: on for CUDA parameters) takes the step with no host read (module
    docstring): ``state["step"]`` on the parameter's device, the bias corrections from it there
    (the complex one, ``1 / (1 - beta1^t e^{i t phase})``, in real arithmetic from ``cos`` and
    ``sin`` of ``t phase``), the new moments selected against the old ones where the group skips.
    At phase 0 its numbers are the default step's bitwise; at other phases to float32 rounding (the
    complex bias correction and ``Re(c m)`` round differently).

    Example::

        >>> import math, torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = ComplexAdam([w], lr=1e-3, betas=(0.9, 0.999), phase=math.pi / 8)
        >>> (w ** 2).sum().backward(); opt.step()
    """

    group_spec = {"lr": number(0.0, LR_MAX), "betas": pair(0.0, 1.0), "phase": number(-math.pi, math.pi),
                  "eps": number(0.0), "weight_decay": number(0.0)}
    group_rules = (decay_within_rate,)
    supports = frozenset({"bfloat16"})
    unsupported_why = {"complex": "its second moment reads g * g and its first moment is complex for real "
                                  "parameters (store a complex parameter as real pairs with torch.view_as_real)"}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 phase: float = math.pi / 8, eps: float = 1e-8, *, weight_decay: float = 0.0,
                 process_group: Any = "auto", capturable: bool | None = None) -> None:
        check_number("lr", lr, lo=0.0, hi=LR_MAX)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        check_number("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
        check_number("phase", phase, lo=-math.pi, hi=math.pi)
        check_number("eps", eps, lo=0.0)
        check_number("weight_decay", weight_decay, lo=0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "phase": phase, "eps": eps,
                                  "weight_decay": weight_decay}, process_group, capturable)

    def _update(self) -> None:
        for group, params, grads in self._groups():
            beta1, beta2 = group["betas"]
            b_re, b_im = _beta(beta1, group["phase"])
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p, g in zip(params, grads):
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros((2, *p.shape), dtype=p.dtype, device=p.device)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                re, im = st["exp_avg"][0], st["exp_avg"][1]
                if wd != 0.0:
                    p.mul_(1 - lr * wd)
                v = st["exp_avg_sq"]
                if b_im == 0.0:  # Adam's own arithmetic, so phase 0 is bitwise Adam
                    re.lerp_(g, 1 - beta1)
                    im.mul_(b_re)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                    p.addcdiv_(re, denom, value=-lr / (1 - beta1 ** t))
                    continue
                c = 1 / (1 - cmath.rect(beta1 ** t, t * group["phase"]))  # complex bias correction
                strided = not (p.is_contiguous() and v.is_contiguous())  # channels_last, a transposed view
                pc, vc = (p.contiguous(), v.contiguous()) if strided else (p, v)
                _complex_adam_blocks(pc, g.contiguous(), re, im, vc, self._scratch, b_re=b_re, b_im=b_im,
                                     beta2=beta2, c=c, bc2_sqrt=math.sqrt(1 - beta2 ** t), lr=lr, eps=eps)
                if strided:
                    p.copy_(pc)
                    v.copy_(vc)

    def _update_group_device(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                             ok: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        phase = group["phase"]
        b_re, b_im = _beta(beta1, phase)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        okf = ok.to(torch.float32)
        for p, g in zip(params, grads):
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros((2, *p.shape), dtype=p.dtype, device=p.device)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
            st["step"].add_(okf)
            t = st["step"].to(torch.float64)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            re, im = m[0], m[1]
            if wd != 0.0:
                p.mul_(pick(ok, 1 - lr * wd, 1.0, p))
            # the new moments as the default step computes them, kept only where the group steps
            if b_im == 0.0:
                new_re = torch.lerp(re, g, 1 - beta1)
                im.mul_(pick(ok, b_re, 1.0, im))
            else:
                new_re = torch.mul(re, b_re).add_(im, alpha=-b_im).add_(g, alpha=1 - b_re)
                new_im = torch.mul(im, b_re).add_(re, alpha=b_im).add_(g, alpha=-b_im)
                torch.where(ok, new_im, im, out=im)
            torch.where(ok, new_re, re, out=re)
            torch.where(ok, torch.mul(v, beta2).addcmul_(g, g, value=1 - beta2), v, out=v)
            denom = (v.sqrt() / torch.sqrt(1 - torch.pow(beta2, t))).add_(eps)
            wide = re.float() if re.dtype in (torch.float16, torch.bfloat16) else re  # addcdiv's precision
            if b_im == 0.0:  # p + (-lr / bc1) re / denom, as Adam's addcdiv rounds it
                u = wide * (-lr / (1 - torch.pow(beta1, t)))
            else:  # c = 1 / (1 - r e^{i theta}), r = beta1^t, theta = t phase; p - lr Re(c m) / denom
                r, theta = torch.pow(beta1, t), t * phase
                d_re, d_im = 1 - r * torch.cos(theta), r * torch.sin(theta)  # 1 - beta1^t = d_re - i d_im
                mag = d_re * d_re + d_im * d_im
                u = torch.mul(wide, d_re / mag).addcmul_(im, -d_im / mag).mul_(-lr)  # c = (d_re + i d_im) / |d|^2
            u.div_(denom)
            torch.where(ok, p + u, p, out=p)  # (a skipped step leaves p bitwise, -0.0 too)  # + 0.0 where the group skips: p bitwise as it was

    def _drop_device(self) -> None:
        super()._drop_device()
        for st in self.__dict__.get("state", {}).values():  # the default step counts on the host
            if torch.is_tensor(st.get("step")) and st["step"].device.type != "cpu":
                st["step"] = st["step"].cpu()
