"""What the nested optimizer checks of its base optimizer: the dtypes the base can serve, and a
base value changed between steps, by the base's own rules.

torch checks an optimizer's hyperparameters only when it is built, so a changed value is checked
by building a throwaway base with the new values (only when one of them changed; the keys the
base's constructor takes are found once, by :func:`constructor_keys`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer


def base_supports(base: Optimizer | None) -> frozenset[str]:
    """The controller reads host norms; the step is the base's. float16 needs a base whose eps
    survives in float16 (torch's Adam family at eps=1e-8 gives 0/0 = NaN there) or a fused one."""
    eps = None if base is None else base.defaults.get("eps")
    fused = base is not None and bool(base.defaults.get("fused"))
    ok = {"bfloat16", "complex"}
    if fused or not isinstance(eps, float) or eps >= 2.0 ** -24:
        ok.add("float16")
    return frozenset(ok)


def base_unsupported_why(base: Optimizer) -> dict[str, str]:
    eps = base.defaults.get("eps")
    return {"float16": f"the base optimizer's eps={eps} rounds to 0 in float16, so a gradient element that is "
                       "exactly 0 gives 0/0 = NaN; pass eps >= 6e-8 or fused=True to the base"}


def constructor_keys(base: Optimizer) -> tuple[str, ...]:
    """The base's hyperparameters (other than lr) that its constructor takes."""
    try:
        takes = inspect.signature(type(base).__init__).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(k for k in base.defaults if k != "lr" and k in takes)


def check_base_values(base: Optimizer, group: dict[str, Any], where: str, seen: dict[str, tuple[Any, ...]],
                      keys: tuple[str, ...]) -> None:
    """Refuse ``group``'s base values if the base would (``ValueError`` naming the changed keys and
    values); ``seen`` keeps each group's last accepted values, so an unchanged group costs a tuple
    comparison."""
    if not keys:
        return
    now = tuple(group.get(k) for k in keys)
    before = seen.get(where)
    if before is not None and before == now:
        return
    if torch.compiler.is_compiling():  # a compiled step cannot build a probe optimizer: its eager steps check
        return
    probe = torch.zeros(1, requires_grad=True)
    try:
        type(base)([probe], **{k: group[k] for k in keys if k in group})
        bad: BaseException | None = None
    except Exception as e:  # torch raises several types for a bad hyperparameter
        bad = e
    if bad is None:
        for i, k in enumerate(keys):  # a value of another type than the base's own default (amsgrad=-1.0)
            d = base.defaults[k]
            v = group.get(k)
            if isinstance(d, bool) and before is not None and before[i] != v and base.state:
                bad = ValueError(f"a switch cannot change once the base has state (it was {before[i]!r}): "
                                 "set it when the optimizer is built")
                break
            if isinstance(d, bool) and not isinstance(v, bool):
                bad = ValueError(f"expected True or False, as the base's default {d!r}")
                break
            if isinstance(d, tuple) and not (isinstance(v, tuple | list) and len(v) == len(d)):
                bad = ValueError(f"expected {len(d)} values, as the base's default {d!r}")
                break
    if bad is not None:
        ref = before if before is not None else tuple(base.defaults[k] for k in keys)
        changed = [k for i, k in enumerate(keys) if ref[i] is not now[i] and ref[i] != now[i]]
        shown = ", ".join(f"[{k!r}]={group.get(k)!r}" for k in changed) or "its values"
        raise ValueError(f"{where}{shown} is invalid for the base {type(base).__name__}: {bad}") from None
    seen[where] = now
