"""Param-group values checked where they enter, and state dicts checked before they load.

Every nestopt optimizer declares, in its class attribute ``group_spec``, the group values that
decide a step and what each may be (:func:`number`, :func:`pair`, :func:`choice`, ...). They are
checked where they enter:

- the constructor and ``add_param_group`` (torch's ``__init__`` adds groups through it);
- ``load_state_dict``, before anything loads (:func:`check_loadable`);
- each ``step``, for values changed since the last check (a scheduler or a user wrote
  ``group["lr"]``): the step compares the host values it reads anyway with the ones last
  checked, which costs a tuple comparison per group.

A bad value raises ``ValueError`` naming the group, the key and the value, e.g.
``param_groups[1]['lr']=-1.0 is invalid: allowed range is [0.0, 1e12]``. A tensor value (a
tensor ``lr``) must hold one real element; its value is checked where it lives on the CPU and
never read from an accelerator (that would be a host sync), and a step re-checks it only when
it is replaced by another object, not when it is written in place.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._checks import _fmt, check_number

Check = Callable[[str, Any], None]
# The largest learning rate a group takes: far above any useful one (these optimizers' rates are
# multipliers near 1 or small steps), and small enough that lr times a gradient, a Polyak step or
# a learned scale stays finite in float32 (a rate of 1e30 made ComplexAdam's parameters inf).
LR_MAX = 1e12


def _scalar(name: str, value: Any) -> Any:
    """The number to check: a CPU tensor's value; ``None`` for a tensor on an accelerator, whose
    shape and dtype are checked but whose value is never read (that would be a host sync)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name}=tensor of shape {tuple(value.shape)} is invalid: expected a number or a "
                             "one-element tensor")
        if value.is_complex():
            raise ValueError(f"{name}={value!r} is invalid: expected a real number")
        return float(value) if value.device.type == "cpu" else None
    return value


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           optional: bool = False) -> Check:
    """A finite real number in the given range (``optional``: ``None`` too)."""

    def check(name: str, value: Any) -> None:
        if optional and value is None:
            return
        v = _scalar(name, value)
        if v is not None or not torch.is_tensor(value):
            check_number(name, v, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)

    return check


def integer(lo: int | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {lo}")

    return check


def pair(lo: float, hi: float, *, hi_open: bool = True) -> Check:
    """A pair of numbers, each in ``[lo, hi)`` (``betas``)."""
    each = number(lo, hi, hi_open=hi_open)

    def check(name: str, value: Any) -> None:
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise ValueError(f"{name}={value!r} is invalid: expected a pair of numbers")
        each(f"{name}[0]", value[0])
        each(f"{name}[1]", value[1])

    return check


def choice(*options: Any) -> Check:
    def check(name: str, value: Any) -> None:
        if not any(value is o or (type(value) is type(o) and value == o) for o in options):
            raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(map(repr, options))}")

    return check


def rate(name: str, value: Any) -> None:
    """A learning rate in ``[0, LR_MAX]`` (a module-level check: an optimizer that keeps its spec
    pickles it)."""
    v = _scalar(name, value)
    if v is not None or not torch.is_tensor(value):
        check_number(name, v, lo=0.0, hi=LR_MAX)


def finite(name: str, value: Any) -> None:
    """A real number, or a tuple or list of them, must be finite; other values are not checked
    (the base optimizer of a nested optimizer checks its own)."""
    values = value if isinstance(value, tuple | list) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        try:
            ok = math.isfinite(float(v))
        except OverflowError:  # an int beyond float's range
            ok = False
        if not ok:
            raise ValueError(f"{name}={_fmt(value)} is invalid: expected finite numbers")


def _real(v: Any) -> float | None:
    """A number to compare (``None``: not a real number, or a tensor on an accelerator, not read)."""
    if torch.is_tensor(v) and v.numel() == 1 and not v.is_complex() and v.device.type == "cpu":
        return float(v)
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None


def decay_within_rate(group: Mapping[str, Any], where: str) -> None:
    """``lr * weight_decay <= 1``: a larger decay (decoupled, ``p *= 1 - lr wd``, or as an L2 term)
    flips the parameters' signs and grows them without bound."""
    lr, wd = _real(group.get("lr")), _real(group.get("weight_decay"))
    if lr is not None and wd is not None and lr * wd > 1.0:
        raise ValueError(f"{where}['weight_decay']={_fmt(group['weight_decay'])} is invalid with lr={_fmt(group['lr'])}: "
                         "lr * weight_decay must be at most 1 (a larger decay flips the parameters' signs)")


def scale_bounds(group: Mapping[str, Any], where: str) -> None:
    """A hypergradient scale's bounds: ``scale_min <= scale_max`` and ``lr * scale_max <= LR_MAX``."""
    lo, hi, lr = _real(group.get("scale_min")), _real(group.get("scale_max")), _real(group.get("lr"))
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{where}['scale_min']={_fmt(group['scale_min'])} and ['scale_max']={_fmt(group['scale_max'])} "
                         "are invalid: expected scale_min <= scale_max")
    if hi is not None and lr is not None and lr * hi > LR_MAX:
        raise ValueError(f"{where}['scale_max']={_fmt(group['scale_max'])} is invalid with lr={_fmt(group['lr'])}: the "
                         f"learned rate lr * scale could reach {lr * hi:g}, above {LR_MAX:g}")


def check_group(group: Mapping[str, Any], where: str, spec: Mapping[str, Check]) -> None:
    """Check every ``spec`` key of one group; ``where`` names it (``"param_groups[0]"``)."""
    for key, check in spec.items():
        if key not in group:
            raise ValueError(f"{where} has no {key!r}: this optimizer's groups need {', '.join(spec)}")
        check(f"{where}[{key!r}]", group[key])


def spec_values(groups: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[tuple[Any, ...]]:
    """The values a step-time check compares (one tuple per group)."""
    return [tuple(map(g.get, keys)) for g in groups]


def unchanged(now: list[tuple[Any, ...]], seen: list[tuple[Any, ...]]) -> bool:
    """``now == seen``, in C: numbers compare by value, a tensor kept in place by identity (its
    value is not read). A tensor of several elements in a group cannot be compared: changed (the
    full check then refuses it)."""
    try:
        return bool(now == seen)
    except RuntimeError:
        return False


# -- state dicts --------------------------------------------------------------------------------
@functools.cache
def _torch_keys() -> dict[str, set[str]]:
    """The hyperparameter names of torch's own optimizers (their constructors' keywords)."""
    out = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            try:
                params = inspect.signature(cls.__init__).parameters
            except (TypeError, ValueError):
                continue
            out[f"torch.optim.{name}"] = {k for k in params if k not in ("self", "params")}
    return out


def likely_source(keys: set[str], known: Mapping[str, set[str]]) -> str | None:
    """The optimizer whose group keys a saved group's keys match best (``None``: no good match)."""
    best, score = None, 0.0
    for name, ks in {**_torch_keys(), **known}.items():
        if not ks:
            continue
        s = len(keys & ks) / len(keys | ks)
        if s > score:
            best, score = name, s
    return best if score >= 0.5 else None


def check_loadable(opt: torch.optim.Optimizer, state_dict: Any, spec: Mapping[str, Check],
                   known: Mapping[str, set[str]], shape_ok: Callable[[str, torch.Tensor, torch.Tensor], bool]) -> None:
    """Refuse a state dict that would load into ``opt`` and fail (or step wrongly) later: a group
    without a key the step needs, a group with another optimizer's keys, bad values, a different
    number of groups or parameters, or per-parameter state whose shape does not fit its
    parameter. The message says what differs."""
    name = type(opt).__name__
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"state_dict is invalid for {name}: expected a dict with 'state' and 'param_groups', got {got}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this {name} has {len(opt.param_groups)}")
    own = set(spec)
    foreign = set().union(*(ks for n, ks in {**_torch_keys(), **known}.items() if n != name)) - own
    for i, (saved, live) in enumerate(zip(saved_groups, opt.param_groups)):
        keys = set(saved) - {"params"}
        missing = sorted(own - keys)
        extra = sorted((keys - set(live)) & foreign)
        if missing or extra:
            src = likely_source(keys, known)
            hint = f"; its keys match {src}'s" if src and src != name else ""
            parts = ([f"lacks {', '.join(map(repr, missing))}"] if missing else []) + \
                    ([f"has {', '.join(map(repr, extra))}, which {name} does not use"] if extra else [])
            raise ValueError(f"state_dict is not a {name} state: param_groups[{i}] {' and '.join(parts)}{hint}")
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(f"state_dict param_groups[{i}] has {len(saved['params'])} parameters, this {name}'s has "
                             f"{len(live['params'])}")
        check_group(saved, f"state_dict['param_groups'][{i}]", spec)
    state = state_dict["state"]
    for saved, live in zip(saved_groups, opt.param_groups):
        for pid, p in zip(saved["params"], live["params"]):
            st = state.get(pid)
            if not isinstance(st, Mapping):
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and not shape_ok(k, v, p):
                    raise ValueError(f"state_dict state[{pid!r}][{k!r}] has shape {tuple(v.shape)}, which does not fit its "
                                     f"parameter of shape {tuple(p.shape)} (was it saved for another model?)")


def shape_fits(key: str, value: torch.Tensor, p: torch.Tensor) -> bool:
    """The default rule for per-parameter state: the parameter's shape, or a stack of buffers of
    that shape (``(k, *p.shape)``, as the complex optimizers keep real and imaginary parts)."""
    if value.shape == p.shape:
        return True
    return value.dim() == p.dim() + 1 and value.shape[1:] == p.shape and value.shape[0] <= 4
