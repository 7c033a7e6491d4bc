r"""Step counters: one convention for every nestopt optimizer, saved in ``state_dict``.

**Where.** Every param group carries ``group["counters"]``, a dict of ``int``:

- ``"steps"``: steps taken;
- ``"nonfinite"``: steps skipped because the loss or a gradient was NaN or infinite;
- the optimizer's other skip reasons, named in its docstring (:class:`~nestopt.optim.Polyak`:
  ``"zero_grad"``, ``"at_target"``), and any other event counts it keeps (documented likewise).

Only integer counts go there: no last step size, no algorithm state. Because the dict is a
param-group entry, ``torch.optim.Optimizer.state_dict()`` saves it (under
``state_dict["param_groups"][i]["counters"]``; nothing goes under another top-level key, which
``torch.distributed.checkpoint``'s helpers would drop), ``load_state_dict`` restores it, and
``copy.deepcopy`` and ``pickle`` (which go through ``__getstate__``, i.e. ``param_groups``)
keep it. ``state_dict()`` hands out copies of the dicts, so a saved state dict does not move on
with later steps. A step that sees no gradient at all counts nothing.

**Scope.** An optimizer says, in its class attribute ``counter_scope``, which of two kinds its
counts are:

- ``"optimizer"``: a step is taken or skipped as a whole (Polyak, PolyakAdam, the hypergradient
  optimizers, LearnedOptimizer: one non-finite gradient anywhere skips every group). Each event
  is counted in *every* group, so all groups hold the same numbers, except a group added later
  by ``add_param_group``, which starts at zero. The optimizer's count is group 0's (the oldest
  group, so the whole history).
- ``"group"``: groups are stepped or skipped alone (ComplexMomentum, ComplexAdam skip only a
  group whose gradients are not finite). Each group counts its own steps and skips (a group with
  no gradients at a step counts nothing); the optimizer's count is the sum over groups.

**Reading.** ``counters(opt)``, or the ``opt.counters`` property of a :class:`Counted`
optimizer, is a read-only live view of the optimizer's counts as above:
``opt.counters["nonfinite"]`` is always current (also after ``load_state_dict``), ``dict(opt.counters)``
is a snapshot, and assigning to it raises ``TypeError``. Per-group numbers are in
``opt.param_groups[i]["counters"]``.

**On the device.** A capturable step (``capturable=True``, the default for CUDA parameters; see
:mod:`nestopt.optim.base`) never reads a number back to the host, so it cannot add to these ints:
it adds its outcome to a small integer tensor on the parameters' device instead
(:meth:`Counted._count_on_device`), and the pending counts join the ints in the groups when
someone reads them: ``opt.counters``, ``state_dict()``, ``telemetry()``, ``copy.deepcopy`` and
``pickle`` (one device read each, at that moment). ``param_groups[i]["counters"]`` read directly
lags behind until then.

**Old state dicts.** Loading fills in zeros for a missing ``"counters"`` entry or a missing key
in it; an optimizer that used another layout before converts it (:meth:`Counted._migrate_group`),
so older checkpoints load into the new classes.

**Writing one.** Derive from :class:`Counted` before ``torch.optim.Optimizer`` and set
``counter_scope`` and ``counter_reasons``; count with :func:`bump` (``bump(self.param_groups,
"steps")`` for a whole step, ``bump([group], "nonfinite")`` for one group). The functions take
plain param groups, so an optimizer that cannot use the mixin can call :func:`ensure` on each new
or loaded group and :func:`read` to report.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

KEY = "counters"  # the param-group entry
BASE = ("steps", "nonfinite")  # the keys every optimizer counts
SCOPES = ("optimizer", "group")

Group = dict[str, Any]


def fresh(reasons: Iterable[str] = ()) -> dict[str, int]:
    """A zeroed counters dict: ``"steps"``, ``"nonfinite"`` and ``reasons``."""
    return dict.fromkeys((*BASE, *(r for r in reasons if r not in BASE)), 0)


def ensure(group: Group, reasons: Iterable[str] = (), entry: str = KEY) -> dict[str, int]:
    """Give ``group`` its own ``"counters"`` dict (or ``entry``) with every key (missing ones as 0,
    the rest kept as ints) and return it. Always a new dict object, so two optimizers never share
    one."""
    old = group.get(entry) or {}
    new = fresh(reasons)
    new.update({k: int(v) for k, v in old.items()})
    group[entry] = new
    return new


def bump(groups: Iterable[Group], key: str, n: int = 1, entry: str = KEY) -> None:
    """Add ``n`` to ``key`` in each of ``groups`` (all of an optimizer's for a whole step, one for
    a group's own event)."""
    for g in groups:
        g[entry][key] += n


def read(groups: Sequence[Group], scope: str = "optimizer", entry: str = KEY) -> dict[str, int]:
    """The optimizer's counts as a new dict: group 0's for ``"optimizer"`` scope, the sum over
    groups for ``"group"`` scope (see the module docstring)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: expected one of {SCOPES}")
    if not groups:
        return fresh()
    if scope == "optimizer":
        return dict(groups[0][entry])
    out: dict[str, int] = {}
    for g in groups:
        for k, v in g[entry].items():
            out[k] = out.get(k, 0) + v
    return out


class CounterView(Mapping[str, int]):
    """Read-only live view of an optimizer's counts (:func:`read` on its current param groups at
    every access). Compares equal to a dict with the same items."""

    __slots__ = ("_opt", "_scope")

    def __init__(self, opt: torch.optim.Optimizer, scope: str | None = None) -> None:
        self._opt = opt
        self._scope = scope or getattr(opt, "counter_scope", "optimizer")
        if self._scope not in SCOPES:
            raise ValueError(f"counter_scope={self._scope!r} is invalid: expected one of {SCOPES}")

    def _now(self) -> dict[str, int]:
        flush = getattr(self._opt, "_flush_device", None)
        if flush is not None:  # counts a capturable step left on the device
            flush()
        return read(self._opt.param_groups, self._scope, getattr(self._opt, "counter_entry", KEY))

    def __getitem__(self, key: str) -> int:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __repr__(self) -> str:
        return repr(self._now())


def counters(opt: torch.optim.Optimizer, scope: str | None = None) -> CounterView:
    """The live view of ``opt``'s counts (scope: ``opt.counter_scope``, default ``"optimizer"``)."""
    return CounterView(opt, scope)


class Counted:
    """Mixin for ``torch.optim.Optimizer`` subclasses (list it first: ``class X(Counted,
    Optimizer)``) that keeps the convention: every group gets its counters when added or loaded
    (torch's ``__init__`` adds groups through ``add_param_group``), ``state_dict()`` copies them
    out, and ``counters`` reads them."""

    counter_scope: str = "optimizer"
    counter_reasons: tuple[str, ...] = ()
    # the param-group entry; an optimizer whose groups are another optimizer's own dicts (the
    # nested optimizer and its base) takes another name, so the two never count into one dict
    counter_entry: str = KEY

    @property
    def counters(self) -> CounterView:
        """Live read-only view of the counts (module docstring of :mod:`nestopt.optim.counters`)."""
        return CounterView(self)  # type: ignore[arg-type]

    @classmethod
    def _migrate_group(cls, group: Group) -> None:
        """Convert a group loaded in an older layout, in place (before :func:`ensure` fills it in)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._flush_device()  # pending device counts belong to the groups there were
        self.__dict__.pop("_pending", None)
        super().add_param_group(param_group)  # type: ignore[misc]
        ensure(self.param_groups[-1], self.counter_reasons, self.counter_entry)  # type: ignore[attr-defined]

    # -- counts a capturable step keeps on the device (module docstring) ---------------------------
    def count_keys(self) -> tuple[str, ...]:
        """The counter names in their fixed order (``"steps"``, ``"nonfinite"``, the reasons)."""
        return tuple(fresh(self.counter_reasons))

    def _count_on_device(self, counts: torch.Tensor) -> None:
        """Add ``counts`` (integer tensor: shape ``(K,)`` over :meth:`count_keys` for scope
        ``"optimizer"``, ``(G, K)`` for scope ``"group"``) to the pending counts, on the device and
        in place (what a CUDA graph replays)."""
        pending = self.__dict__.get("_pending")
        if pending is None or pending.shape != counts.shape or pending.device != counts.device:
            self._flush_counts()
            pending = self.__dict__["_pending"] = torch.zeros(counts.shape, dtype=torch.int64, device=counts.device)
        pending.add_(counts)

    def _flush_device(self) -> None:
        """Write what a capturable step left on the device into the groups (a subclass adds its own)."""
        self._flush_counts()

    def _flush_counts(self) -> None:
        """Move the pending device counts into the groups' ints (one device read)."""
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        host = pending.tolist()
        pending.zero_()  # in place: a captured graph keeps adding into the same memory
        keys = self.count_keys()
        entry = self.counter_entry
        groups = self.param_groups  # type: ignore[attr-defined]
        rows = [host] * len(groups) if pending.dim() == 1 else host
        for g, row in zip(groups, rows):
            for k, n in zip(keys, row):
                g[entry][k] += int(n)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict, pickle and deepcopy all come through here (a copy's counts were read out
        # by its __getstate__; a loaded state replaces the counts)
        self.__dict__.pop("_pending", None)
        super().__setstate__(state)  # type: ignore[misc]
        for g in self.param_groups:  # type: ignore[attr-defined]
            self._migrate_group(g)
            ensure(g, self.counter_reasons, self.counter_entry)

    def state_dict(self) -> dict[str, Any]:
        self._flush_device()
        sd = super().state_dict()  # type: ignore[misc]
        for g in sd["param_groups"]:  # torch's groups are shallow copies: detach nested dicts too
            for k, v in g.items():
                if isinstance(v, dict):
                    g[k] = dict(v)
        return sd


def outcome(keys: tuple[str, ...], conditions: list[tuple[str, torch.Tensor]], otherwise: str) -> torch.Tensor:
    """A step's outcome as counts over ``keys`` (an int64 one-hot on the conditions' device): the
    first of ``conditions`` (``(key, bool tensor)``, in order of precedence) that holds, else
    ``otherwise``. No host read: what a capturable step hands :meth:`Counted._count_on_device`."""
    taken = torch.zeros((), dtype=torch.bool, device=conditions[0][1].device)
    hits: dict[str, torch.Tensor] = {}
    for key, cond in conditions:
        hit = cond & ~taken
        hits[key] = hits[key] | hit if key in hits else hit
        taken = taken | hit
    hits[otherwise] = hits[otherwise] | ~taken if otherwise in hits else ~taken
    zero = torch.zeros((), dtype=torch.bool, device=taken.device)
    return torch.stack([hits.get(k, zero) for k in keys]).to(torch.int64)
