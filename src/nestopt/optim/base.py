"""What every nestopt optimizer keeps, in one base class: counters (:mod:`.counters`), validated
param groups and checked state dicts (:mod:`.groups`), transactional steps
(:mod:`.transaction`), and the parameter kinds it supports.

A subclass declares:

- ``group_spec``: the group values that decide its step and what each may be;
- ``supports``: the parameter dtypes it can step beyond float32 and float64 (``"float16"``,
  ``"bfloat16"``, ``"complex"``), or :meth:`supported` where that depends on its settings; a
  parameter of another dtype is refused when its group is added, with an error naming the
  parameter, its dtype, why, and what is supported (the README's support table lists them);
- ``state_shape_ok(key, value, p)`` where its per-parameter state is not the parameter's shape.

and writes ``step`` as usual, calling ``evaluate(self, closure)`` for the closure and
``commit(self)`` right before its first in-place update (see :mod:`.transaction`).

**Capturable steps.** ``capturable=`` (every nestopt optimizer takes it; ``None``, the default,
means on for CUDA parameters and off elsewhere, and off while the optimizer syncs over ranks)
chooses the step that never reads a number back to the host: its step sizes, skip decisions and
counters stay tensors on the parameters' device, a skipped step is masked on the device (as
``GradScaler``'s ``found_inf`` masks torch's fused Adam), and nothing branches in Python on a
value the step computed, so the step can run under ``torch.compile`` and inside a CUDA graph
(``torch.cuda.graph``), as torch's own ``capturable=True`` optimizers do. The group values such a
step keeps on the device (``live_keys``: Polyak's ``eta``, the hypergradient scale) and its counts
(:mod:`.counters`) are written back into the param groups when they are read: ``opt.counters``,
``state_dict()``, ``telemetry()``, ``copy.deepcopy``, ``pickle`` or :meth:`NestoptOptimizer.sync_host`.
On the CPU the host path is the default because it is faster there (a Python branch costs less
than masked arithmetic); both paths give the same results (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from .counters import Counted
from .groups import Check, check_group, check_loadable, shape_fits, spec_values, unchanged
from .distributed import AUTO, check_process_group, group_from_token, group_token
from .transaction import transactional

KINDS = ("float16", "bfloat16", "complex")
_HALF_WHY = "its eps (1e-8) rounds to 0 in float16, so a gradient element that is exactly 0 gives 0/0 = NaN"


def param_kind(p: torch.Tensor) -> str:
    """``"real"`` (float32, float64), ``"float16"``, ``"bfloat16"``, ``"complex"`` or ``"other"``."""
    if p.is_complex():
        return "complex"
    if p.dtype == torch.float16:
        return "float16"
    if p.dtype == torch.bfloat16:
        return "bfloat16"
    if p.dtype in (torch.float32, torch.float64):
        return "real"
    return "other"


def refuse_sparse(opt: Optimizer, grads: list[torch.Tensor]) -> None:
    """A clear error for sparse gradients, which no nestopt optimizer steps."""
    if any(g.is_sparse for g in grads):
        raise ValueError(f"{type(opt).__name__} does not support sparse gradients: use dense ones (for example "
                         "nn.Embedding(..., sparse=False)) or torch.optim.SparseAdam for those parameters")


class NestoptOptimizer(Counted, Optimizer):
    group_spec: ClassVar[Mapping[str, Check]] = {}
    supports: ClassVar[frozenset[str]] = frozenset()
    # why a kind is refused (in the error); a subclass may say more
    unsupported_why: ClassVar[Mapping[str, str]] = {}
    # checks of several values of a group together (module-level functions: ``f(group, where)``)
    group_rules: ClassVar[tuple[Any, ...]] = ()
    _known: ClassVar[dict[str, set[str]]] = {}  # every subclass's group keys: to name a state dict's source

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "transactional", False):
            cls.step = transactional(step)  # type: ignore[method-assign]
        if cls.group_spec:
            NestoptOptimizer._known[cls.__name__] = set(cls.group_spec)

    # -- groups -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        self._check_params(param_group, where)
        for key, check in self.group_spec.items():  # the values given; the defaults were checked as arguments
            if key in param_group:
                check(f"{where}[{key!r}]", param_group[key])
        super().add_param_group(param_group)
        self.__dict__["_seen"] = None
        try:  # torch filled in the defaults: the whole group now (a default was checked as an argument)
            check_group({k: v for k, v in self.param_groups[-1].items() if k in self.group_spec}, where,
                        {k: c for k, c in self.group_spec.items() if k in self.param_groups[-1]})
            for rule in self.group_rules:
                rule(self.param_groups[-1], where)
        except ValueError:
            self.param_groups.pop()
            raise

    def supported(self) -> frozenset[str]:
        """The dtypes beyond float32/float64 this optimizer steps (its class's ``supports``)."""
        return self.supports

    def _check_params(self, param_group: dict[str, Any], where: str) -> None:
        """Each parameter of a group being added (its ``params`` made a list, as torch does)."""
        params = param_group.get("params")
        if params is None or isinstance(params, set):  # a set: torch's own error
            return
        plist = [params] if torch.is_tensor(params) else list(params)
        param_group["params"] = plist  # torch keeps the caller's dict and lists its params too
        for j, p in enumerate(plist):
            if torch.is_tensor(p):
                self._check_param(p, f"{where}['params'][{j}]")

    def _check_param(self, p: torch.Tensor, where: str) -> None:
        kind = param_kind(p)
        ok = self.supported()
        if kind == "real" or kind in ok:
            return
        name = type(self).__name__
        allowed = ["float32", "float64"] + [k for k in ("float16", "bfloat16") if k in ok] + \
                  (["complex64", "complex128"] if "complex" in ok else [])
        why = self.unsupported_why.get(kind, _HALF_WHY if kind == "float16" else "")
        raise ValueError(f"{where} has dtype {p.dtype}, which {name} does not support{': ' + why if why else ''}; "
                         f"supported: {', '.join(allowed)} (keep float32 master weights, e.g. with torch.autocast)")

    def _check_step_groups(self) -> None:
        """At each step: re-check the groups whose values changed since they were last checked."""
        spec = self.step_spec()
        keys = tuple(spec)
        if not keys:
            return
        now = spec_values(self.param_groups, keys)
        seen = self.__dict__.get("_seen")
        if seen is not None and unchanged(now, seen):
            return
        for i, g in enumerate(self.param_groups):
            if seen is None or i >= len(seen) or not unchanged([now[i]], [seen[i]]):
                self.check_changed_group(g, f"param_groups[{i}]", spec)
        self.__dict__["_seen"] = now

    def step_spec(self) -> Mapping[str, Check]:
        """The group values a step re-checks when they change (``group_spec``)."""
        return self.group_spec

    def check_changed_group(self, group: dict[str, Any], where: str, spec: Mapping[str, Check]) -> None:
        check_group(group, where, spec)
        for rule in self.group_rules:
            rule(group, where)

    # -- state -------------------------------------------------------------------------------------
    def state_shape_ok(self, key: str, value: torch.Tensor, p: torch.Tensor) -> bool:
        return shape_fits(key, value, p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_loadable(self, state_dict, self.group_spec, self._known, self.state_shape_ok)
        super().load_state_dict(state_dict)
        self._drop_device()  # the loaded groups' values, from the next step on

    # -- mixed precision -------------------------------------------------------------------------
    # ``torch.amp.GradScaler.step(opt)`` then hands this optimizer the scale and whether the scaled
    # gradients hold an inf or a NaN (``opt.grad_scale``, ``opt.found_inf``) instead of unscaling
    # them itself; the step unscales them (see :meth:`_from_grad_scaler`)
    _step_supports_amp_scaling = True

    def _from_grad_scaler(self, closure: Any) -> bool:
        """A step driven by ``GradScaler.step``: refuse a closure (its backward would leave the
        gradients scaled), skip where the scaler found an inf or a NaN (``True``), else unscale the
        gradients in place as ``GradScaler.unscale_`` would (put back if the step fails)."""
        if closure is not None:
            raise ValueError(f"{type(self).__name__}: GradScaler.step(opt, closure) would step on scaled gradients "
                             "(the closure's backward runs after the scaler unscaled them): call "
                             "scaler.scale(loss).backward(), opt.observe_loss(loss), then scaler.step(opt) without a closure")
        found, scale = self.__dict__.get("found_inf"), self.__dict__.get("grad_scale")
        if found is not None and bool(found):  # (GradScaler's own step reads it to the host the same way)
            from .counters import bump

            self.take_observed_loss()
            bump(self.param_groups, "nonfinite", 1, getattr(self, "counter_entry", "counters"))
            return True
        if scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                inv = scale.double().reciprocal().float()  # torch's unscale_ uses this very factor
                torch._foreach_mul_(grads, inv.to(grads[0].device))
                from .transaction import current

                txn = current(self)
                if txn is not None:
                    back = scale.float().to(grads[0].device)
                    txn.on_rollback(lambda: torch._foreach_mul_(grads, back))
        return False

    # -- the capturable (device) path ----------------------------------------------------------
    # group values a capturable step reads and writes on the device: paths into a group (("hd_scale",),
    # ("polyak", "eta")) and the value a group without one starts from
    live_keys: ClassVar[tuple[tuple[tuple[str, ...], float], ...]] = ()

    @property
    def capturable(self) -> bool | None:
        """``True``, ``False`` or ``None`` (on for CUDA parameters): whether ``step`` takes the path
        with no host read (module docstring). Settable between steps."""
        return self.__dict__.get("_capturable")

    @capturable.setter
    def capturable(self, value: bool | None) -> None:
        if not (value is None or isinstance(value, bool)):
            raise ValueError(f"capturable={value!r} is invalid: expected None (on for CUDA parameters), True or False")
        self._flush_device()
        self._drop_device()
        self.__dict__["_capturable"] = value

    def on_device(self, params: list[torch.Tensor] | None = None) -> bool:
        """Whether this step takes the capturable path (``capturable``, or for ``None`` whether the
        parameters are on a CUDA device and no sync over ranks is active)."""
        from .distributed import sync_of

        value = self.__dict__.get("_capturable")
        if value is None:
            if params is None:
                params = [p for g in self.param_groups for p in g["params"]][:1]
            value = bool(params) and params[0].device.type == "cuda" and sync_of(self) is None
        elif value and sync_of(self) is not None:
            raise NotImplementedError(f"{type(self).__name__}(capturable=True) does not sync over ranks (its step "
                                      "reads no number back, and the collective combines host values): use "
                                      "capturable=None or False under DDP/FSDP, or process_group=None")
        if not value and self._has_device_values():  # the host path from here: it reads the groups
            self._flush_device()
            self._drop_device()
        return value

    def _has_device_values(self) -> bool:
        return "_live" in self.__dict__ or "_pending" in self.__dict__

    def _drop_device(self) -> None:
        """Forget the device copies (after :meth:`_flush_device`, or when a load replaces the groups)."""
        self.__dict__.pop("_live", None)

    def live(self, device: torch.device) -> torch.Tensor:
        """The ``live_keys`` values of every group as one float64 tensor of shape ``(L, G)`` on
        ``device``, made from the groups' values at the first capturable step and updated in place
        by the step from then on."""
        t = self.__dict__.get("_live")
        if t is None or t.device != device or t.shape[1] != len(self.param_groups):
            if t is not None:
                self._flush_device()
            rows = [[float(_get(g, path, default)) for g in self.param_groups] for path, default in self.live_keys]
            t = self.__dict__["_live"] = torch.tensor(rows, dtype=torch.float64, device=device).reshape(
                len(self.live_keys), len(self.param_groups))
        return t

    def _flush_device(self) -> None:
        """Write what a capturable step left on the device (counts, ``live_keys`` values) into the
        param groups: one read each, only when someone reads them."""
        super()._flush_device()
        t = self.__dict__.get("_live")
        if t is not None:
            for (path, _), row in zip(self.live_keys, t.tolist()):
                for g, v in zip(self.param_groups, row):
                    _set(g, path, v)

    def sync_host(self) -> None:
        """Bring the param groups' counters and the values a capturable step keeps on the device
        (``group["polyak"]["eta"]``, ``group["hd_scale"]``...) up to date: one device read. Reading
        ``opt.counters``, ``telemetry()`` or ``state_dict()`` does it too."""
        self._flush_device()

    # -- the loss from outside the step ------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor | float, weight: float = 1.0) -> None:
        """Record one micro-batch's loss (as the model computed it, before any division for
        gradient accumulation) for the next step: an optimizer whose rule reads the loss (Polyak's,
        the nested optimizer's features and proxy signal) then uses the ``weight``-ed mean of the
        losses recorded since its last step, whatever the closure returns, and forgets them. This is
        how a loop that accumulates gradients, Lightning or Hugging Face's ``Trainer`` (see
        :mod:`nestopt.integrations`) hands it the loss of the whole batch. No host sync: the values
        stay on their device until the step reads them with its own."""
        if not (isinstance(weight, int | float) and weight > 0 and weight < float("inf")):
            raise ValueError(f"weight={weight!r} is invalid: expected a positive finite number")
        v = loss.detach() if torch.is_tensor(loss) else torch.tensor(float(loss), dtype=torch.float64)
        if v.numel() != 1:
            raise ValueError(f"loss has {v.numel()} elements: observe_loss takes the scalar loss of a micro-batch")
        self.__dict__.setdefault("_observed", []).append((v.reshape(()), float(weight)))

    def take_observed_loss(self) -> torch.Tensor | None:
        """The weighted mean of the losses recorded since the last step (a float64 tensor), or
        ``None``; they are forgotten (and put back if the running step fails)."""
        seen = self.__dict__.pop("_observed", None)
        if not seen:
            return None
        from .transaction import current

        txn = current(self)
        if txn is not None:
            txn.on_rollback(lambda: self.__dict__.__setitem__("_observed", seen))
        dev = seen[0][0].device
        total = sum(w for _, w in seen)
        return torch.stack([v.to(dev, torch.float64) * (w / total) for v, w in seen]).sum()

    # -- what a logger reads ---------------------------------------------------------------------
    def telemetry(self) -> dict[str, float]:
        """The values worth watching, by name, as Python floats (read when called, never by the
        step): the counters (``steps``, ``nonfinite`` and the optimizer's own), each group's ``lr``,
        and what the optimizer sets itself (Polyak's ``eta``, the nested multipliers, the
        hypergradient scale). A name gets ``/i`` for group ``i`` where there are several groups.
        :mod:`nestopt.integrations` writes them to TensorBoard, CSV, Lightning and Hugging Face."""
        self._flush_device()
        out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        for key, values in self._group_telemetry().items():
            if len(values) == 1:
                out[key] = float(values[0])
            else:
                out.update({f"{key}/{i}": float(v) for i, v in enumerate(values)})
        return out

    def _group_telemetry(self) -> dict[str, list[float]]:
        """Per-group values for :meth:`telemetry` (a subclass adds its own)."""
        return {"lr": [float(g["lr"]) for g in self.param_groups]}

    # -- processes ---------------------------------------------------------------------------------
    @property
    def process_group(self) -> Any:
        """``"auto"``, ``None`` or a ``ProcessGroup``: what this optimizer syncs over (see
        :mod:`nestopt.optim.distributed`). Set it with the constructor's ``process_group=``."""
        return self.__dict__.get("_process_group", AUTO)

    @process_group.setter
    def process_group(self, value: Any) -> None:
        self.__dict__["_process_group"] = check_process_group(value)
        self.__dict__.pop("_sync", None)

    def __getstate__(self) -> dict[str, Any]:
        self._flush_device()  # a copy or a pickle carries the device values in its groups
        state = super().__getstate__()
        state["_capturable"] = self.__dict__.get("_capturable")
        # a ProcessGroup cannot be copied or pickled: it travels as a token of this process
        state["_process_group"] = group_token(self.__dict__.get("_process_group", AUTO))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        # (load_state_dict comes through here too, without the entry: the group in use stays)
        token = state.pop("_process_group", self.__dict__.get("_process_group", AUTO))
        capturable = state.pop("_capturable", self.__dict__.get("_capturable"))
        super().__setstate__(state)
        self.__dict__["_process_group"] = group_from_token(token, type(self).__name__)
        self.__dict__["_capturable"] = capturable
        self._drop_device()
        self.__dict__.pop("_sync", None)
        self.__dict__.pop("_sync_for", None)
        self.__dict__["_seen"] = None
        self.__dict__["_txn"] = None


def _get(group: dict[str, Any], path: tuple[str, ...], default: float) -> Any:
    v: Any = group
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return default
        v = v[k]
    return v


def _set(group: dict[str, Any], path: tuple[str, ...], value: float) -> None:
    d = group
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value
