#!/usr/bin/env python
"""Audit nestopt's handling of bad input: a fixed, enumerated list of bad inputs, each tried against
whatever ``nestopt`` is importable, and its outcome classified.

    python tools/audit.py [--json FILE] [--kind KIND ...] [--no-cli] [--cli-workers N]
    PYTHONPATH=/path/to/old/checkout/src python tools/audit.py --json before.json

Only public APIs are used (``nestopt.optim``, ``nestopt.schedule``, ``nestopt.hyper``, ``nestopt.tasks``,
``nestopt.train``, ``nestopt.guards``, ``nestopt.games``, the ``nestopt`` CLI), so the same list runs
against an older checkout.

Outcomes:

- ``clear``: refused with a ValueError, TypeError or KeyError whose message names the argument (or
  the key, or the value); a project error made for the situation (``HypergradientError``) counts
  too when it does. On the CLI: exit code 2 with exactly one line on stderr and no traceback.
- ``safe``: accepted and handled correctly (a non-finite gradient skipped with the parameters
  unchanged, a step whose closure raised left everything bitwise as it was, a value that trains).
- ``unclear``: a traceback from inside torch/NumPy/the implementation, another exception type, a
  bare ``KeyError: 'key'``, a message naming neither the argument nor the value, or a wrong state
  that is accepted and fails later.
- ``silent``: accepted with a wrong or non-finite result (parameters NaN, a loss that climbs, a
  NaN schedule value, a wrong state dict loaded without a word, a CLI run that starts work or
  overwrites a result instead of refusing).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

KINDS = ("optimizer constructor", "param-group value", "step input (non-finite)", "dtype/shape", "state dict load",
         "schedules", "hypergradients", "other APIs", "CLI")
OUTCOMES = ("clear", "safe", "unclear", "silent")
PROJECT_ERRORS = ("HypergradientError",)  # refusals made for the situation (a diverged unroll or solve)
NAN, INF = math.nan, math.inf
CASE_TIMEOUT = 30  # seconds, for an in-process case


class Huge(int):
    """An int too large for a float, with a short repr for the labels."""

    def __repr__(self) -> str:
        return "10**400"


HUGE = Huge(10 ** 400)


@dataclass
class Out:
    outcome: str
    detail: str
    origin: str | None = None


@dataclass
class Result:
    kind: str
    case: str
    outcome: str
    detail: str
    origin: str | None = None
    seconds: float = 0.0


CASES: list[tuple[str, str, Callable[[], Out]]] = []


def add(kind: str, label: str, fn: Callable[[], Out]) -> None:
    assert kind in KINDS, kind
    CASES.append((kind, label, fn))


# -- classification helpers ------------------------------------------------------------------------------

def _short(path: str) -> str:
    """``torch/optim/adam.py``, ``nestopt/cli.py``: the path from the package down."""
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    return path


def origin_of(e: BaseException) -> str:
    """Where an exception was raised (innermost frame), and the innermost nestopt frame on the way."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    last = f"{_short(tb[-1].filename)}:{tb[-1].lineno}"
    ours = [f for f in tb if "/nestopt/" in f.filename]
    if ours and ours[-1] is not tb[-1]:
        return f"{last} (via {_short(ours[-1].filename)}:{ours[-1].lineno})"
    return last


def _msg(e: BaseException) -> str:
    m = str(e).strip().splitlines()
    return (m[0] if m else "")[:300]


def names_for(args: dict[str, Any]) -> list[str]:
    """What a clear message may name: the argument names, or distinctive values."""
    out = list(args)
    for v in args.values():
        for x in ([v, *v] if isinstance(v, (tuple, list)) else [v]):
            r = repr(x)
            if len(r) >= 3 and not r.startswith("<") and len(r) < 60:
                out.append(r)
    return out


def refused(e: BaseException, names: list[str]) -> Out:
    msg = str(e)
    label = f"{type(e).__name__}: {_msg(e)}"
    if isinstance(e, (ValueError, TypeError, KeyError)) or any(c.__name__ in PROJECT_ERRORS for c in type(e).__mro__):
        if isinstance(e, KeyError) and re.fullmatch(r"'[^' ]*'", msg):
            return Out("unclear", f"bare {label}", origin_of(e))
        if any(n in msg for n in names):
            return Out("clear", label)
        return Out("unclear", f"{label} (names none of {names[:4]})", origin_of(e))
    return Out("unclear", label, origin_of(e))


def attempt(fn: Callable[[], Any], names: list[str], judge: Callable[[Any], Out]) -> Out:
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001
        return refused(e, names)
    return judge(r)


def accepted(detail: str = "accepted") -> Callable[[Any], Out]:
    return lambda _r: Out("silent", detail)


# -- a tiny problem ---------------------------------------------------------------------------------------

def problem(d_in: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, d_in, generator=g)
    return model, x, 0.5 * x.sum(1, keepdim=True)


def closure_for(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(opt: Any, params: list[torch.Tensor]) -> tuple[list, list, list]:
    ps = [bits(p) for p in params]
    gs = [None if p.grad is None else bits(p.grad) for p in params]
    st = []
    for p in params:
        entry = opt.state.get(p)
        if not isinstance(entry, dict):
            continue
        for k in sorted(entry, key=str):
            v = entry[k]
            st.append((k, bits(v) if torch.is_tensor(v) else copy.deepcopy(v)))
    return ps, gs, st


def same_snapshot(a: tuple, b: tuple) -> str | None:
    """``None`` if equal, else what differs."""
    for what, xa, xb in (("parameters", a[0], b[0]), ("gradients", a[1], b[1])):
        if len(xa) != len(xb) or any((u is None) != (v is None) or (u is not None and not torch.equal(u, v))
                                     for u, v in zip(xa, xb)):
            return what
    sa, sb = a[2], b[2]
    if len(sa) != len(sb):
        return "optimizer state"
    for (ka, va), (kb, vb) in zip(sa, sb):
        if ka != kb:
            return "optimizer state"
        if torch.is_tensor(va) and torch.is_tensor(vb):
            if not torch.equal(va, vb):
                return f"state[{ka!r}]"
        elif torch.is_tensor(va) or torch.is_tensor(vb):
            return f"state[{ka!r}]"
    return None


def finite(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


def train_judge(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], steps: int = 20,
                refused_ok: bool = True) -> Out:
    """Accepted: step; non-finite parameters or a climbing loss is silent; a refusal at a step is judged
    like one at construction (the parameters must be as they were before that step)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    closure = closure_for(opt, model, x, y)
    l0 = loss_of(model, x, y)
    for k in range(steps):
        before = [bits(p) for p in params]
        try:
            opt.step(closure)
        except Exception as e:  # noqa: BLE001
            out = refused(e, names)
            if not all(torch.equal(bits(p), b) for p, b in zip(params, before)):
                return Out("silent", f"step {k} raised {type(e).__name__} and left the parameters changed: {_msg(e)}",
                           origin_of(e))
            if out.outcome == "clear":
                out.detail = f"at step {k}: {out.detail}"
                return out if refused_ok else Out("unclear", f"accepted, then step {k}: {out.detail}", origin_of(e))
            out.detail = f"accepted, then step {k} raised {out.detail}"
            return out
        if not finite(params):
            return Out("silent", f"parameters non-finite after step {k}")
    l1 = loss_of(model, x, y)
    if not math.isfinite(l1) or l1 > 1.05 * l0:
        return Out("silent", f"accepted; the loss climbs from {l0:.3g} to {l1:.3g} in {steps} steps")
    return Out("safe", f"accepted; trains ({l0:.3g} -> {l1:.3g})")


# -- optimizers ---------------------------------------------------------------------------------------------

OPT_NAMES = ("Polyak", "PolyakAdam", "LearnedOptimizer", "ComplexMomentum", "ComplexAdam", "HypergradientSGD",
             "HypergradientAdam", "NestedOptimizer")


def O() -> Any:
    import nestopt.optim as opt_mod

    return opt_mod


def make(name: str, params: Any, **kw: Any) -> Any:
    return getattr(O(), name)(params, **kw)


def ctor_case(name: str, kwargs: dict[str, Any]) -> Callable[[], Out]:
    def run() -> Out:
        model, x, y = problem()
        names = names_for(kwargs)
        try:
            opt = make(name, model.parameters(), **kwargs)
        except Exception as e:  # noqa: BLE001
            return refused(e, names)
        return train_judge(opt, model, x, y, names)

    return run


def _label(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, type) else f"{k}={v.__name__}" for k, v in kwargs.items())


def constructor_cases() -> None:
    common = [{"lr": -1.0}, {"lr": NAN}, {"lr": INF}, {"lr": "0.1"}, {"lr": None}, {"lr": HUGE}, {"lr": 1e308}]
    specific: dict[str, list[dict[str, Any]]] = {
        "Polyak": [{"scope": "bogus"}, {"share": "x"}, {"f_star": NAN}, {"max_lr": 0.0}, {"max_lr": -1.0},
                   {"eps": -1.0}, {"momentum": 1.0}, {"momentum": -0.5}, {"precondition": "bogus"}, {"beta2": 1.0},
                   {"precond_eps": -1.0}, {"seed": -1}, {"seed": 1.5}, {"bogus_kw": 1}],
        "PolyakAdam": [{"betas": (0.9,)}, {"betas": (1.0, 0.999)}, {"betas": (NAN, 0.9)}, {"adam_eps": 0.0},
                       {"adam_eps": -1.0}, {"momentum": 0.9}, {"precondition": "rms"}],
        "LearnedOptimizer": [{"net": "bogus"}, {"net": "/nonexistent/net.safetensors"}, {"net": 3},
                             {"weight_decay": -1.0}, {"chunk": 0}, {"chunk": -1}, {"compile": "yes"}],
        "ComplexMomentum": [{"beta": 1.0}, {"beta": -0.1}, {"beta": NAN}, {"phase": 10.0}, {"phase": NAN},
                            {"weight_decay": -1.0}, {"foreach": "yes"}],
        "ComplexAdam": [{"betas": (0.9,)}, {"betas": (1.5, 0.9)}, {"phase": 4.0}, {"eps": -1.0}, {"weight_decay": NAN}],
        "HypergradientSGD": [{"rule": "bogus"}, {"beta": -1.0}, {"beta": NAN}, {"scale_min": 0.0},
                             {"scale_min": 2.0, "scale_max": 1.0}, {"scale_min": 1e30}],
        "HypergradientAdam": [{"betas": (0.9,)}, {"eps": 0.0}, {"eps": -1.0}, {"weight_decay": -1.0}, {"rule": None}],
        "NestedOptimizer": [{"base": int}, {"base": "adamw"}, {"signal": "bogus"}, {"features": ["bogus"]},
                            {"features": []}, {"mult_range": (2.0, 0.5)}, {"mult_range": (0.1,)},
                            {"grid": [0.5, 2.0]}, {"grid": [NAN, 1.0]}, {"window": 0}, {"window": 8, "period": 4},
                            {"stats_every": 0}, {"hidden": 0}, {"scratchpad": -1}, {"label_shift": 0.0},
                            {"follow": 2.0}, {"explore": -1.0}, {"seed": -1}, {"controller": "/nonexistent/c.safetensors"},
                            {"controller_lr": NAN}, {"betas": (1.5, 0.9)}, {"eps": -1.0}, {"weight_decay": -1.0},
                            {"betas": "ab"}, {"betas": [0.1]}, {"eps": torch.tensor([0.1, 0.2])},
                            {"lr": torch.tensor(0.1 + 0.1j)}],
    }
    for name in OPT_NAMES:
        for kw in common + specific[name]:
            add("optimizer constructor", f"{name}({_label(kw)})", ctor_case(name, kw))


# -- param-group values -------------------------------------------------------------------------------------

def group_case(name: str, key: str, value: Any, via: str = "set") -> Callable[[], Out]:
    def run() -> Out:
        model, x, y = problem()
        names = names_for({key: value})
        if via == "add":
            try:
                opt = make(name, model[0].parameters())
                opt.add_param_group({"params": list(model[2].parameters()), key: value})
            except Exception as e:  # noqa: BLE001
                return refused(e, names)
            return train_judge(opt, model, x, y, names)
        opt = make(name, model.parameters())
        opt.step(closure_for(opt, model, x, y))
        if via == "set":
            opt.param_groups[0][key] = value
        elif via == "lambdalr":
            sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 1 else -1.0)
            sch.step()
        elif via == "steplr-nan":
            sch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=NAN)
            sch.step()
        return train_judge(opt, model, x, y, names)

    return run


def group_cases() -> None:
    for name in OPT_NAMES:
        for v in (-1.0, NAN, INF, 1e308, HUGE, "0.1"):
            add("param-group value", f"{name}: group['lr'] = {v!r} between steps", group_case(name, "lr", v))
        add("param-group value", f"{name}: add_param_group(lr=-1.0)", group_case(name, "lr", -1.0, via="add"))
        add("param-group value", f"{name}: add_param_group(lr=nan)", group_case(name, "lr", NAN, via="add"))
    specific = {"Polyak": [("momentum", 1.5), ("f_star", NAN), ("eps", -1.0), ("max_lr", -1.0)],
                "PolyakAdam": [("betas", (1.5, 0.9)), ("adam_eps", 0.0)],
                "LearnedOptimizer": [("weight_decay", -1.0), ("weight_decay", NAN)],
                "ComplexMomentum": [("beta", 1.5), ("phase", NAN)],
                "ComplexAdam": [("betas", (0.9, 1.0)), ("eps", -1.0)],
                "HypergradientSGD": [("beta", NAN), ("scale_max", -1.0)],
                "HypergradientAdam": [("eps", 0.0), ("betas", (NAN, 0.9))],
                "NestedOptimizer": [("eps", -1.0), ("betas", (1.5, 0.9)), ("weight_decay", NAN), ("amsgrad", -1.0),
                                    ("betas", -1.0), ("eps", "0.1")]}
    for name, items in specific.items():
        for key, v in items:
            add("param-group value", f"{name}: group[{key!r}] = {v!r} between steps", group_case(name, key, v))
    for name in ("Polyak", "ComplexMomentum", "HypergradientSGD", "NestedOptimizer"):
        add("param-group value", f"{name}: LambdaLR sets lr = -initial", group_case(name, "lr", -1.0, via="lambdalr"))
    for name in ("PolyakAdam", "ComplexAdam"):
        add("param-group value", f"{name}: StepLR(gamma=nan) sets lr = nan", group_case(name, "lr", NAN, via="steplr-nan"))


# -- step inputs ---------------------------------------------------------------------------------------------

LOSS_BASED = ("Polyak", "PolyakAdam")


def _step_kwargs(opt: Any) -> bool:
    import inspect

    return "loss" in inspect.signature(opt.step).parameters


def step_case(name: str, what: str, ctor: dict[str, Any] | None = None) -> Callable[[], Out]:
    def run() -> Out:
        model, x, y = problem()
        opt = make(name, model.parameters(), **(ctor or {}))
        params = [p for g in opt.param_groups for p in g["params"]]
        good = closure_for(opt, model, x, y)
        for _ in range(2):
            opt.step(good)
        good()  # fresh finite gradients in place
        calls = {"n": 0}

        def bad_closure() -> torch.Tensor:
            calls["n"] += 1
            loss = good()
            if what == "grad-nan":
                params[0].grad.view(-1)[0] = NAN
            elif what == "grad-inf":
                params[0].grad.view(-1)[1] = INF
            elif what == "grad-huge":
                for p in params:
                    p.grad.fill_(3e38)
            elif what == "loss-nan":
                return loss * NAN
            elif what == "loss-inf":
                return loss * INF
            elif what == "raises":
                raise RuntimeError("boom in the closure")
            elif what == "raises-in-replay" and calls["n"] >= 2:
                raise RuntimeError("boom in a replay")
            return loss

        before = snapshot(opt, params)
        try:
            if what == "set-grad-nan":
                good()
                params[0].grad.view(-1)[0] = NAN
                before = snapshot(opt, params)
                opt.step(loss=loss_of(model, x, y)) if _step_kwargs(opt) else opt.step()
            elif what == "loss-kw-nan":
                good()
                before = snapshot(opt, params)
                opt.step(loss=NAN)
            elif what == "raises-in-replay":
                # the nested optimizer replays with the closure every `period` steps: the closure
                # raises on its second call within a step, which only a replay makes
                for _ in range(12):
                    calls["n"] = 0
                    before = snapshot(opt, params)
                    opt.step(bad_closure)
                return Out("unclear", "no replay called the closure a second time in 12 steps")
            else:
                opt.step(bad_closure)
        except Exception as e:  # noqa: BLE001
            diff = same_snapshot(before, snapshot(opt, params))
            if what.startswith("raises"):
                if diff is None and "boom" in str(e):
                    return Out("safe", f"the closure's error propagated; parameters, gradients and state unchanged")
                return Out("silent", f"the step raised {type(e).__name__} and left the {diff} changed", origin_of(e))
            out = refused(e, ["loss", "closure", "grad", "non-finite", "nan"])
            if diff is not None:
                return Out("silent", f"raised {type(e).__name__} and left the {diff} changed", origin_of(e))
            return out
        after = snapshot(opt, params)
        if what.startswith("raises"):
            return Out("unclear", "the closure's exception was swallowed")
        if not finite(params):
            return Out("silent", "a parameter became non-finite")
        moved = same_snapshot(before, after) == "parameters"
        if what in ("grad-nan", "grad-inf", "set-grad-nan") and moved:
            return Out("silent", "stepped on a non-finite gradient (the parameters moved)")
        if what in ("loss-nan", "loss-inf", "loss-kw-nan") and name in LOSS_BASED and moved:
            return Out("silent", "stepped on a non-finite loss (the parameters moved)")
        try:
            for _ in range(3):
                opt.step(good)
        except Exception as e:  # noqa: BLE001
            return Out("unclear", f"the next good step raised {type(e).__name__}: {_msg(e)}", origin_of(e))
        if not finite(params):
            return Out("silent", "skipped, but the next good steps made the parameters non-finite (state poisoned)")
        return Out("safe", "skipped, parameters unchanged" if not moved else "stepped; parameters finite")

    return run


def step_cases() -> None:
    for name in OPT_NAMES:
        for what in ("grad-nan", "grad-inf", "grad-huge", "loss-nan", "loss-inf", "raises", "set-grad-nan"):
            if name == "NestedOptimizer" and what == "set-grad-nan":  # hindsight needs a closure: proxy takes loss=
                add("step input (non-finite)", f"NestedOptimizer(signal='proxy'): {what}",
                    step_case(name, what, {"signal": "proxy"}))
                continue
            add("step input (non-finite)", f"{name}: {what}", step_case(name, what))
    for name in ("Polyak", "PolyakAdam"):
        add("step input (non-finite)", f"{name}: step(loss=nan)", step_case(name, "loss-kw-nan"))
    add("step input (non-finite)", "NestedOptimizer(signal='proxy'): step(loss=nan)",
        step_case("NestedOptimizer", "loss-kw-nan", {"signal": "proxy"}))
    add("step input (non-finite)", "NestedOptimizer(window=2, period=4): the closure raises during a hindsight replay",
        step_case("NestedOptimizer", "raises-in-replay", {"window": 2, "period": 4}))
    add("step input (non-finite)", "Polyak(precondition='rms', scope='tensor'): grad-nan",
        step_case("Polyak", "grad-nan", {"precondition": "rms", "scope": "tensor"}))


# -- dtypes and shapes ---------------------------------------------------------------------------------------

def _dtype_params(what: str, control: bool) -> list[nn.Parameter]:
    """The parameters of a dtype/shape case, or (``control``) the float32 equivalent."""
    g = torch.Generator().manual_seed(0)
    main = nn.Parameter(torch.randn(6, generator=g))
    if what in ("float16", "bfloat16"):
        t = torch.randn(4, 3, generator=g)
        return [nn.Parameter(t if control else t.to(getattr(torch, what)))]
    if what == "complex64":
        re_, im = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        return [nn.Parameter(torch.stack([re_, im]) if control else torch.complex(re_, im))]
    if what == "0-d":
        return [main, nn.Parameter(torch.tensor([2.0]) if control else torch.tensor(2.0))]
    return [main] if control else [main, nn.Parameter(torch.zeros(0, 3))]  # zero-element


def _dtype_loss(params: list[nn.Parameter]) -> Callable[[], torch.Tensor]:
    """The dtype cases' problem: sum |p - 0.5|^2 over ``params``, in float32."""
    target = [torch.full_like(p, 0.5) for p in params]

    def lossf() -> torch.Tensor:
        return sum(((p - t).abs() ** 2).sum().float() for p, t in zip(params, target)) + 0.0

    return lossf


def _closure(opt: Any, lossf: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = lossf()
        loss.backward()
        return loss

    return closure


def _run_dtype(name: str, params: list[nn.Parameter], ctor: dict[str, Any]) -> tuple[Any, float, float, int | None]:
    """Construct and take 30 steps on sum |p - 0.5|^2: (optimizer, first loss, last loss, step that went non-finite)."""
    lossf = _dtype_loss(params)
    opt = make(name, params, **ctor)
    closure = _closure(opt, lossf)
    with torch.no_grad():
        l0 = float(lossf())
    for k in range(30):
        opt.step(closure)
        if not finite(params):
            return opt, l0, NAN, k
    with torch.no_grad():
        return opt, l0, float(lossf()), None


def dtype_case(name: str, what: str, ctor: dict[str, Any] | None = None) -> Callable[[], Out]:
    def run() -> Out:
        params = _dtype_params(what, control=False)
        lossf = _dtype_loss(params)
        names = [what, what.replace("complex64", "complex"), "dtype", "shape", "0-d", "zero-element", "element"]
        try:
            opt = make(name, params, **(ctor or {}))
        except Exception as e:  # noqa: BLE001
            return refused(e, names)
        closure = _closure(opt, lossf)
        with torch.no_grad():
            l0 = float(lossf())
        for k in range(30):
            try:
                opt.step(closure)
            except Exception as e:  # noqa: BLE001
                return Out("unclear", f"accepted, then step {k} raised {type(e).__name__}: {_msg(e)}", origin_of(e))
            if not finite(params):
                return Out("silent", f"parameters non-finite after step {k}")
        with torch.no_grad():
            l1 = float(lossf())
        if not math.isfinite(l1) or l1 > 1.01 * l0 + 1e-6:
            try:  # the same problem in float32 (a 0-d parameter as shape (1,), no zero-element one)
                _o, c0, c1, _k = _run_dtype(name, _dtype_params(what, control=True), ctor or {})
            except Exception:  # noqa: BLE001
                c0, c1 = 1.0, NAN
            if math.isfinite(c1) and c1 > 1.01 * c0 + 1e-6:
                return Out("safe", f"accepted; climbs ({l0:.3g} -> {l1:.3g}) as the float32 problem does "
                                   f"({c0:.3g} -> {c1:.3g}): not the dtype's or the shape's doing")
            return Out("silent", f"accepted; diverges ({l0:.3g} -> {l1:.3g} in 30 steps; float32: {c0:.3g} -> {c1:.3g})")
        return Out("safe", f"accepted; works ({l0:.3g} -> {l1:.3g})")

    return run


def dtype_cases() -> None:
    for name in OPT_NAMES:
        for what in ("float16", "bfloat16", "complex64", "0-d", "zero-element"):
            add("dtype/shape", f"{name}: {what} parameter", dtype_case(name, what))
    add("dtype/shape", "Polyak(precondition='rms'): complex64 parameter", dtype_case("Polyak", "complex64", {"precondition": "rms"}))
    add("dtype/shape", "Polyak(precondition='rms'): float16 parameter", dtype_case("Polyak", "float16", {"precondition": "rms"}))
    add("dtype/shape", "NestedOptimizer(eps=1e-4): float16 parameter", dtype_case("NestedOptimizer", "float16", {"eps": 1e-4}))


# -- state dicts ---------------------------------------------------------------------------------------------

SD_NAMES = ["state_dict", "state dict", "param_groups", "parameter group", "param group", "shape", "optimizer"]


def _trained(name: str, d_in: int = 4, **kw: Any) -> tuple[Any, nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = problem(d_in)
    opt = make(name, model.parameters(), **kw) if isinstance(name, str) else name(model.parameters(), **kw)
    c = closure_for(opt, model, x, y)
    for _ in range(3):
        opt.step(c)
    return opt, model, x, y


def sd_case(target: str, source: Callable[[], Any], names: list[str] | None = None, shapes: bool = False
            ) -> Callable[[], Out]:
    def run() -> Out:
        opt, model, x, y = _trained(target)
        params = [p for g in opt.param_groups for p in g["params"]]
        sd = source()
        if shapes and not any(torch.is_tensor(v) and v.dim() > 0 for st in sd["state"].values()
                              for v in (st.values() if isinstance(st, dict) else [])):
            return Out("safe", "no per-parameter tensor state: nothing in it depends on the shapes")
        before = [bits(p) for p in params]
        try:
            opt.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001
            return refused(e, SD_NAMES + (names or []))
        c = closure_for(opt, model, x, y)
        for k in range(3):
            try:
                opt.step(c)
            except Exception as e:  # noqa: BLE001
                return Out("unclear", f"loaded without a word, then step {k} raised {type(e).__name__}: {_msg(e)}",
                           origin_of(e))
        if not finite(params):
            return Out("silent", "loaded without a word; the parameters are non-finite after 3 steps")
        moved = not all(torch.equal(bits(p), b) for p, b in zip(params, before))
        return Out("silent", f"loaded without a word; steps {'run' if moved else 'do nothing'}")

    return run


def state_dict_cases() -> None:
    other = {"Polyak": "ComplexAdam", "PolyakAdam": "HypergradientAdam", "LearnedOptimizer": "Polyak",
             "ComplexMomentum": "ComplexAdam", "ComplexAdam": "PolyakAdam", "HypergradientSGD": "ComplexMomentum",
             "HypergradientAdam": "Polyak", "NestedOptimizer": "Polyak"}
    for name, src in other.items():
        add("state dict load", f"{name}.load_state_dict({src}'s state dict)",
            sd_case(name, lambda src=src: _trained(src)[0].state_dict(), [src]))
    for name in ("Polyak", "HypergradientSGD", "ComplexMomentum"):
        add("state dict load", f"{name}.load_state_dict(torch AdamW's state dict)",
            sd_case(name, lambda: _trained(torch.optim.AdamW)[0].state_dict(), ["AdamW"]))
    for name in OPT_NAMES:
        add("state dict load", f"{name}.load_state_dict(a state dict saved for a model of other shapes)",
            sd_case(name, lambda name=name: _trained(name, d_in=3)[0].state_dict(), shapes=True))

    def bad_lr(name: str) -> dict:
        sd = _trained(name)[0].state_dict()
        sd = copy.deepcopy(sd)
        groups = sd["param_groups"]
        groups[0]["lr"] = -1.0
        return sd

    for name in OPT_NAMES:
        add("state dict load", f"{name}.load_state_dict(a state dict whose group has lr=-1.0)",
            sd_case(name, lambda name=name: bad_lr(name), ["lr", "-1.0"]))
    garbage = [("{}", lambda: {}), ("None", lambda: None), ("'state'", lambda: "state"),
               ("{'state': {}, 'param_groups': []}", lambda: {"state": {}, "param_groups": []})]
    for name in ("Polyak", "ComplexAdam", "NestedOptimizer"):
        for label, fn in garbage:
            add("state dict load", f"{name}.load_state_dict({label})", sd_case(name, fn))


# -- schedules -------------------------------------------------------------------------------------------------

TS = [0, 0.5, 1, 2, 3, 5, 7.5, 10, 25, 50, 99, 100, 1000]


def sched_judge(s: Any) -> Out:
    for t in TS:
        try:
            v = s(t)
        except Exception as e:  # noqa: BLE001
            return Out("unclear", f"accepted, then s({t}) raised {type(e).__name__}: {_msg(e)}", origin_of(e))
        try:
            fv = float(v)
        except Exception:  # noqa: BLE001
            return Out("silent", f"accepted; s({t}) = {v!r}, not a number")
        if not math.isfinite(fv) or fv < 0:
            return Out("silent", f"accepted; s({t}) = {v!r}")
    return Out("safe", "accepted; finite, non-negative values")


def sched_case(make_s: Callable[[], Any], names: list[str]) -> Callable[[], Out]:
    return lambda: attempt(make_s, names, sched_judge)


def call_case(make_s: Callable[[], Any], t: Any) -> Callable[[], Out]:
    def run() -> Out:
        s = make_s()

        def judge(v: Any) -> Out:
            try:
                fv = float(v)
            except Exception:  # noqa: BLE001
                return Out("silent", f"accepted; returned {v!r}")
            return Out("silent" if not math.isfinite(fv) else "safe", f"accepted; returned {v!r}")

        return attempt(lambda: s(t), ["t", repr(t)], judge)

    return run


def largelr_case(fn: Any, steps_per_epoch: Any = 1, names: tuple[str, ...] = ("schedule", "rate")) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.schedule import LargeLRScheduler

        w = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=0.1)
        try:
            sch = LargeLRScheduler(opt, fn, steps_per_epoch=steps_per_epoch)
            for _ in range(4):
                opt.step()
                sch.step()
        except Exception as e:  # noqa: BLE001
            out = refused(e, list(names) + ["steps_per_epoch"])
            lr = opt.param_groups[0]["lr"]
            if out.outcome == "clear" and not (isinstance(lr, float) and math.isfinite(lr) and lr >= 0):
                return Out("silent", f"refused, but left lr={lr!r}: {out.detail}")
            return out
        lr = opt.param_groups[0]["lr"]
        ok = isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0
        return Out("safe" if ok else "silent", f"accepted; lr = {lr!r}")

    return run


def config_case(kw: dict[str, Any]) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.schedule import LargeLRConfig

        return attempt(lambda: LargeLRConfig(**kw).schedule(), names_for(kw), sched_judge)

    return run


def grid_case(train: Callable[[float], Any], grid: Any, names: list[str], **kw: Any) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.schedule import grid_search

        def judge(res: Any) -> Out:
            best = res.scores.get(res.best_lr, NAN)
            if not math.isfinite(best):
                return Out("silent", f"accepted; best_lr={res.best_lr} with score {best!r}")
            return Out("safe", f"accepted; best_lr={res.best_lr}")

        return attempt(lambda: grid_search(train, grid, **kw), names, judge)

    return run


def schedule_cases() -> None:
    from nestopt import schedule as S

    K = "schedules"
    add(K, "constant(nan)", sched_case(lambda: S.constant(NAN), ["value", "nan"]))
    add(K, "constant(inf)", sched_case(lambda: S.constant(INF), ["value", "inf"]))
    add(K, "constant(-1.0)", sched_case(lambda: S.constant(-1.0), ["value", "-1.0"]))
    add(K, "constant('0.1')", sched_case(lambda: S.constant("0.1"), ["value", "'0.1'"]))
    add(K, "constant(10**400)", sched_case(lambda: S.constant(HUGE), ["value", "10**400"]))
    add(K, "linear(0.0, 1e308, 10) (overflows)", sched_case(lambda: S.linear(0.0, 1e308, 10), ["end", "1e+308"]))
    add(K, "linear(0.1, 1.0, 0)", sched_case(lambda: S.linear(0.1, 1.0, 0), ["steps"]))
    add(K, "linear(nan, 1.0, 10)", sched_case(lambda: S.linear(NAN, 1.0, 10), ["start", "nan"]))
    add(K, "linear(0.0, 1.0, -5)", sched_case(lambda: S.linear(0.0, 1.0, -5), ["steps", "-5"]))
    add(K, "cosine(1.0, 0.0, 0)", sched_case(lambda: S.cosine(1.0, 0.0, 0), ["steps"]))
    add(K, "cosine(1.0, 0.0, -10)", sched_case(lambda: S.cosine(1.0, 0.0, -10), ["steps", "-10"]))
    add(K, "cosine(nan, 0.0, 10)", sched_case(lambda: S.cosine(NAN, 0.0, 10), ["base", "nan"]))
    add(K, "cosine(1.0, 2.0, 10) (min above base)", sched_case(lambda: S.cosine(1.0, 2.0, 10), ["min_value", "2.0"]))
    add(K, "cosine(1e308, 0.0, 10) (overflows)", sched_case(lambda: S.cosine(1e308, 0.0, 10), ["base", "1e+308"]))
    add(K, "step_decay(1.0, [nan], 0.5)", sched_case(lambda: S.step_decay(1.0, [NAN], 0.5), ["milestones", "nan"]))
    add(K, "step_decay(1.0, [20, 10], 0.5)", sched_case(lambda: S.step_decay(1.0, [20, 10], 0.5), ["milestones"]))
    add(K, "step_decay(1.0, [10], -1.0)", sched_case(lambda: S.step_decay(1.0, [10], -1.0), ["factor", "-1.0"]))
    add(K, "step_decay(1.0, [10], nan)", sched_case(lambda: S.step_decay(1.0, [10], NAN), ["factor", "nan"]))
    add(K, "exponential(1.0, 0.0)", sched_case(lambda: S.exponential(1.0, 0.0), ["factor"]))
    add(K, "exponential(1.0, 0.5, every=0)", sched_case(lambda: S.exponential(1.0, 0.5, every=0), ["every"]))
    add(K, "exponential(1.0, -0.5)", sched_case(lambda: S.exponential(1.0, -0.5), ["factor", "-0.5"]))
    c1, c2 = S.constant(1.0), S.constant(0.5)
    add(K, "join([c, c], [nan])", sched_case(lambda: S.join([c1, c2], [NAN]), ["boundaries", "nan"]))
    add(K, "join([c, c], [-1.0])", sched_case(lambda: S.join([c1, c2], [-1.0]), ["boundaries", "-1.0"]))
    add(K, "join([c, c], [])", sched_case(lambda: S.join([c1, c2], []), ["boundaries"]))
    add(K, "join([c, c], [5, 6])", sched_case(lambda: S.join([c1, c2], [5, 6]), ["boundaries"]))
    add(K, "join([c, 'x'], [5])", sched_case(lambda: S.join([c1, "x"], [5]), ["pieces", "'x'"]))
    add(K, "join([c, c, c], [5, 3])", sched_case(lambda: S.join([c1, c2, c1], [5, 3]), ["boundaries"]))
    cos = S.cosine(1.0, 0.0, 10)
    add(K, "warmup_then(cosine, nan, 1.0, 5)", sched_case(lambda: S.warmup_then(cos, NAN, 1.0, 5), ["warmup_start", "start", "nan"]))
    add(K, "warmup_then(cosine, 0.0, 1.0, -1)", sched_case(lambda: S.warmup_then(cos, 0.0, 1.0, -1), ["warmup", "-1"]))
    add(K, "warmup_then('x', 0.0, 1.0, 5)", sched_case(lambda: S.warmup_then("x", 0.0, 1.0, 5), ["decay", "'x'"]))
    add(K, "warmup_then(cosine, 0.0, inf, 5)", sched_case(lambda: S.warmup_then(cos, 0.0, INF, 5), ["base", "inf"]))
    add(K, "cosine(1, 0, 10)(nan)", call_case(lambda: S.cosine(1.0, 0.0, 10), NAN))
    add(K, "cosine(1, 0, 10)(-1)", call_case(lambda: S.cosine(1.0, 0.0, 10), -1))
    add(K, "linear(0, 1, 10)('x')", call_case(lambda: S.linear(0.0, 1.0, 10), "x"))
    add(K, "join(...)(nan)", call_case(lambda: S.join([S.constant(1.0), S.constant(0.5)], [3.0]), NAN))
    add(K, "LargeLRScheduler(opt, lambda t: -1.0)", largelr_case(lambda t: -1.0))
    add(K, "LargeLRScheduler(opt, lambda t: nan)", largelr_case(lambda t: NAN))
    add(K, "LargeLRScheduler(opt, lambda t: inf)", largelr_case(lambda t: INF))
    add(K, "LargeLRScheduler(opt, lambda t: 'x')", largelr_case(lambda t: "x"))
    add(K, "LargeLRScheduler(opt, lambda t: 10**400)", largelr_case(lambda t: HUGE))
    add(K, "LargeLRScheduler(opt, lambda t: 0.1 if t < 2 else -1.0)", largelr_case(lambda t: 0.1 if t < 2 else -1.0))
    add(K, "LargeLRScheduler(opt, 'cosine')", largelr_case("cosine"))
    add(K, "LargeLRScheduler(opt, cosine, steps_per_epoch=0)", largelr_case(S.cosine(1.0, 0.0, 10), 0, ("steps_per_epoch",)))
    add(K, "LargeLRScheduler(opt, cosine, steps_per_epoch=nan)", largelr_case(S.cosine(1.0, 0.0, 10), NAN, ("steps_per_epoch",)))
    for kw in ({"base_lr": -1.0}, {"base_lr": NAN}, {"warmup_epochs": -1}, {"decay": "bogus"}, {"total_epochs": 0},
               {"min_lr": NAN}, {"decay_factor": 0.0}, {"warmup_start_lr": INF}):
        add(K, f"LargeLRConfig({_label(kw)}).schedule()", config_case(kw))
    add(K, "grid_search over runs that all diverged", grid_case(lambda lr: NAN, [0.1, 0.3, 1.0], ["diverged", "grid", "finite"]))
    add(K, "grid_search(train, [])", grid_case(lambda lr: lr, [], ["grid"]))
    add(K, "grid_search(train, [-0.1, 0.1])", grid_case(lambda lr: lr, [-0.1, 0.1], ["grid", "-0.1"]))
    add(K, "grid_search(train, [nan, 0.1])", grid_case(lambda lr: lr, [NAN, 0.1], ["grid", "nan"]))
    add(K, "grid_search(train, 'abc')", grid_case(lambda lr: lr, "abc", ["grid", "'abc'"]))
    add(K, "grid_search(train, [10**400])", grid_case(lambda lr: 1.0, [HUGE], ["grid", "10**400"]))
    add(K, "grid_search(train returning 'x')", grid_case(lambda lr: "x", [0.1, 0.3], ["train", "'x'"]))
    add(K, "grid_search(train returning None)", grid_case(lambda lr: None, [0.1, 0.3], ["train", "None"]))
    add(K, "grid_search('train', [0.1])", grid_case("train", [0.1], ["train"]))


# -- hypergradients -------------------------------------------------------------------------------------------

def _inner(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return 50.0 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # curvature ~100: lr 1e3 diverges


def _outer(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((w - 0.5) ** 2).sum()


def _w() -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64)


def _lam() -> torch.Tensor:
    return torch.tensor(0.5, dtype=torch.float64)


def _finite_result(r: Any) -> Out:
    h = r[0] if isinstance(r, tuple) else r
    ts = list(h.values()) if isinstance(h, dict) else list(h) if isinstance(h, (list, tuple)) else [h]
    if all(torch.is_tensor(t) and bool(torch.isfinite(t).all()) for t in ts):
        return Out("safe", "accepted; finite hypergradient")
    return Out("silent", f"accepted; returned a non-finite hypergradient {h}")


def unrolled_case(kw: dict[str, Any], names: list[str] | None = None, **args: Any) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.hyper import unrolled_hypergradient

        inner = args.get("inner", _inner)
        params = args.get("params", _w())
        hparams = args.get("hparams", _lam())
        call = {"steps": 5, **kw}
        return attempt(lambda: unrolled_hypergradient(inner, _outer, params, hparams, **call),
                       (names or []) + names_for(kw) + ["diverged"], _finite_result)

    return run


def implicit_case(kw: dict[str, Any]) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.hyper import implicit_hypergradient

        w = torch.ones(3, dtype=torch.float64)  # near the inner optimum
        return attempt(lambda: implicit_hypergradient(_inner, _outer, w, _lam(), **kw), names_for(kw), _finite_result)

    return run


def bilevel_case(kw: dict[str, Any], run_steps: int = 1) -> Callable[[], Out]:
    def run() -> Out:
        from nestopt.hyper import Bilevel

        try:
            b = Bilevel(_inner, _outer, _w(), _lam(), **kw)
        except Exception as e:  # noqa: BLE001
            return refused(e, names_for(kw))
        w0 = b.params.clone()
        try:
            b.run(run_steps)
        except Exception as e:  # noqa: BLE001
            out = refused(e, names_for(kw) + ["diverged", "lr"])
            if not bool(torch.isfinite(b.params).all()):
                return Out("silent", f"raised only after the inner weights were non-finite: {out.detail}", origin_of(e))
            if not torch.equal(b.params, w0):
                out.detail += " (the inner weights moved)"
            return out
        if not bool(torch.isfinite(b.params).all()) or not bool(torch.isfinite(b.hparams).all()):
            return Out("silent", "accepted; the weights or hyperparameters are non-finite")
        return Out("safe", "accepted; finite")

    return run


def hyper_cases() -> None:
    K = "hypergradients"
    add(K, "unrolled_hypergradient(lr=1e3, steps=80) (the inner loop diverges)",
        unrolled_case({"lr": 1e3, "steps": 80}, ["lr", "step"]))
    for kw in ({"lr": -0.1}, {"lr": 0.0}, {"lr": NAN}, {"lr": INF}, {"lr": "0.1"}, {"steps": 0},
               {"steps": -1}, {"steps": 1.5}, {"momentum": 1.0}, {"momentum": NAN}, {"momentum": -0.1},
               {"truncate": 0}, {"truncate": 1.5}, {"batches": []}):
        add(K, f"unrolled_hypergradient({_label(kw)})", unrolled_case(kw))
    add(K, "unrolled_hypergradient(lr=<a function of hparams returning nan>)",
        unrolled_case({"lr": lambda lam: torch.tensor(NAN, dtype=torch.float64)}, ["lr"]))
    add(K, "unrolled_hypergradient(inner_loss='x')", unrolled_case({}, ["inner_loss"], inner="x"))
    add(K, "unrolled_hypergradient(params='x')", unrolled_case({}, ["params"], params="x"))
    add(K, "unrolled_hypergradient(hparams=None)", unrolled_case({}, ["hparams"], hparams=None))
    for kw in ({"solver": "bogus"}, {"iters": 0}, {"iters": -1}, {"damping": -1.0}, {"damping": NAN}, {"tol": -1.0},
               {"alpha": -1.0}, {"alpha": NAN}, {"max_residual": -1.0}):
        add(K, f"implicit_hypergradient({_label(kw)})", implicit_case(kw))
    add(K, "Bilevel(method='unrolled', unroll_kwargs={'lr': 1e3}).run(1)",
        bilevel_case({"method": "unrolled", "inner_steps": 80, "unroll_kwargs": {"lr": 1e3}}))
    add(K, "Bilevel(method='implicit', inner SGD lr=1e3).run(1)",
        bilevel_case({"method": "implicit", "inner_steps": 80, "inner_optimizer": lambda p: torch.optim.SGD(p, lr=1e3)}))
    for kw in ({"method": "bogus"}, {"horizon": "bogus"}, {"inner_steps": 0}, {"on_error": "x"},
               {"hyper_optimizer": 3}, {"unroll_kwargs": {"lrr": 3}, "method": "unrolled"}):
        add(K, f"Bilevel({_label(kw)})", bilevel_case(kw))

    def stn(fn: Callable[[], Any], names: list[str]) -> Callable[[], Out]:
        return lambda: attempt(fn, names, accepted())

    from nestopt.hyper import SelfTuningMLP, STNTrainer

    add(K, "SelfTuningMLP(5)", stn(lambda: SelfTuningMLP(5), ["sizes", "5"]))
    add(K, "SelfTuningMLP([4, 3], n_hparams=0)", stn(lambda: SelfTuningMLP([4, 3], n_hparams=0), ["n_hparams"]))
    add(K, "STNTrainer(nn.Linear(2, 2))", stn(lambda: STNTrainer(nn.Linear(2, 2)), ["model", "SelfTuningMLP"]))


# -- other APIs ---------------------------------------------------------------------------------------------

def other_cases() -> None:
    import nestopt.tasks as T

    K = "other APIs"

    def reg(fn: Callable[[], Any], names: list[str]) -> Callable[[], Out]:
        return lambda: attempt(fn, names, accepted())

    for label, fn, names in [
        ("tasks.get('bogus')", lambda: T.get("bogus"), ["bogus"]),
        ("tasks.get('')", lambda: T.get(""), ["''", "task"]),
        ("tasks.get(None)", lambda: T.get(None), ["None", "name"]),
        ("tasks.get(3)", lambda: T.get(3), ["3", "name"]),
        ("tasks.get('quad-scalar ')", lambda: T.get("quad-scalar "), ["'quad-scalar '"]),
        ("tasks.family('bogus')", lambda: T.family("bogus"), ["bogus"]),
        ("tasks.family(None)", lambda: T.family(None), ["None", "name"]),
        ("tasks.get_game('bogus')", lambda: T.get_game("bogus"), ["bogus"]),
        ("tasks.register('quad-scalar', factory) (taken)", lambda: T.register("quad-scalar", T.ScalarQuadratic),
         ["quad-scalar"]),
        ("tasks.register('new-task', 3)", lambda: T.register("audit-new-task", 3), ["factory", "3"]),
    ]:
        add(K, label, reg(fn, names))
    for seed in (-1, 1.5, "1", None, True):
        add(K, f"tasks.family('quadratic').sample({seed!r})",
            reg(lambda seed=seed: T.family("quadratic").sample(seed), ["seed", repr(seed)]))

    def loop(fn_kw: Callable[[], tuple[Any, int, Any, dict]], names: list[str], judge: Callable[[Any], Out] | None = None
             ) -> Callable[[], Out]:
        def run() -> Out:
            from nestopt.train import train_loop

            opt, steps, loss, kw = fn_kw()
            return attempt(lambda: train_loop(opt, steps, loss, **kw), names, judge or accepted())

        return run

    def sgd() -> tuple[nn.Parameter, torch.optim.Optimizer]:
        w = nn.Parameter(torch.tensor([3.0]))
        return w, torch.optim.SGD([w], lr=0.1)

    def l2(w: nn.Parameter) -> Callable[[Any], torch.Tensor]:
        return lambda _b: (w ** 2).sum()

    def mk(steps: Any, **kw: Any) -> Callable[[], tuple]:
        def f() -> tuple:
            w, opt = sgd()
            return opt, steps, l2(w), kw
        return f

    add(K, "train_loop(opt, -3, loss)", loop(mk(-3), ["steps", "-3"]))
    add(K, "train_loop(opt, 3, loss, clip_norm=-1.0)", loop(mk(3, clip_norm=-1.0), ["clip_norm", "-1.0"]))
    add(K, "train_loop(opt, 3, loss, eval_every=0)", loop(mk(3, eval_every=0), ["eval_every"]))
    add(K, "train_loop('opt', 3, loss)", loop(lambda: ("opt", 3, lambda b: torch.tensor(1.0), {}), ["opt", "'opt'"]))

    def guard(fn: Callable[[], Any], names: list[str]) -> Callable[[], Out]:
        return lambda: attempt(fn, names, accepted())

    from nestopt.guards import TrainingGuard

    add(K, "TrainingGuard('model', opt)", guard(lambda: TrainingGuard("model", sgd()[1]), ["model", "'model'"]))
    add(K, "TrainingGuard(model, None)", guard(lambda: TrainingGuard(nn.Linear(2, 2), None), ["optimizer", "None"]))

    def game(steps: Any = 3, **kw: Any) -> Callable[[], Out]:
        def run() -> Out:
            from nestopt.games import play

            g = T.BilinearGame(dim=2)
            ps = g.init(0)
            opts = [torch.optim.SGD(p.parameters(), lr=0.1) for p in ps]
            return attempt(lambda: play(g, ps, opts, steps, **kw), names_for({"steps": steps, **kw}), accepted())

        return run

    add(K, "games.play(..., steps=-1)", game(-1))
    add(K, "games.play(..., mode='bogus')", game(3, mode="bogus"))
    add(K, "games.play(..., every=0)", game(3, every=0))


# -- CLI --------------------------------------------------------------------------------------------------------

@dataclass
class CliCase:
    label: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    timeout: float = 40.0


BENCH_TINY = ["--tasks", "quad-scalar", "--optimizers", "sgd", "--seeds", "1", "--steps", "2", "--workers", "1"]
META_TINY = ["--net", "linear", "--steps", "2", "--unroll", "1", "--horizon", "1", "--families", "quadratic"]
OVER_TINY = ["--params", "1k", "--steps", "1", "--rounds", "1", "--optimizers", "sgd", "--device", "cpu"]


def _replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i:i + 2]
    return out + ([flag, value] if value is not None else [])


def _full(d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "results.json").write_text('{"complete": true}')
    (d / "out" / "report.md").write_text("a finished result\n")


def _file(d: Path) -> None:
    (d / "afile").write_text("x")
    (d / "out.json").write_text("[]")


def _checkpoint(kind: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        out = d / "out"
        if kind == "corrupt":
            out.mkdir()
            (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
            return
        subprocess.run([sys.executable, "-m", "nestopt.cli", "meta-train", *META_TINY, "--out", str(out)],
                       cwd=d, capture_output=True, timeout=60, env=_env())

    return setup


def cli_cases() -> list[CliCase]:
    cs: list[CliCase] = []
    B = ["bench", *BENCH_TINY, "--out", "out"]
    for flag, v in (("--steps", "-1"), ("--steps", "0"), ("--steps", "nan"), ("--seeds", "0"), ("--seeds", "-2"),
                    ("--workers", "0"), ("--workers", "x"), ("--tasks", ","), ("--tasks", ""), ("--tasks", "bogus"),
                    ("--optimizers", ","), ("--optimizers", "bogus"), ("--suite", "bogus")):
        cs.append(CliCase(f"bench {flag} {v!r}", _replace(B, flag, v)))
    cs.append(CliCase("bench --out <an existing file>", _replace(B, "--out", "afile"), _file))
    cs.append(CliCase("bench into a non-empty --out (a finished result) without --force", B, _full))
    cs.append(CliCase("bench without --out", ["bench", *BENCH_TINY]))
    M = ["meta-train", *META_TINY, "--out", "out"]
    for flag, v in (("--families", ""), ("--families", ","), ("--families", "bogus"), ("--sigma", "nan"),
                    ("--sigma", "-1"), ("--sigma", "inf"), ("--steps", "0"), ("--unroll", "0"), ("--horizon", "-1"),
                    ("--pairs", "0"), ("--workers", "0"), ("--net", "bogus"), ("--method", "bogus"), ("--seed", "-1"),
                    ("--seed", "x")):
        cs.append(CliCase(f"meta-train {flag} {v!r}", _replace(M, flag, v)))
    cs.append(CliCase("meta-train --net controller --method tbptt", _replace(M, "--net", "controller")))
    cs.append(CliCase("meta-train --resume with a corrupt checkpoint.pt", M + ["--resume"], _checkpoint("corrupt")))
    cs.append(CliCase("meta-train --resume with another network's checkpoint (--net mlp)",
                      _replace(M, "--net", "mlp") + ["--resume"], _checkpoint("linear")))
    cs.append(CliCase("meta-train into an --out holding a checkpoint, without --resume or --force", M,
                      _checkpoint("linear")))
    cs.append(CliCase("meta-train --out <an existing file>", _replace(M, "--out", "afile"), _file))
    V = ["overhead", *OVER_TINY]
    for flag, v in (("--params", "inf"), ("--params", "nan"), ("--params", "1e30"), ("--params", "-5"),
                    ("--params", "0"), ("--params", "abc"), ("--params", "1.5"), ("--steps", "0"), ("--rounds", "-1"),
                    ("--device", "tpu"), ("--device", "cuda:99"), ("--optimizers", "bogus"), ("--optimizers", ",")):
        cs.append(CliCase(f"overhead {flag} {v!r}", _replace(V, flag, v), timeout=20))
    cs.append(CliCase("overhead --json nofolder/x.json", _replace(V, "--json", "nofolder/x.json")))
    cs.append(CliCase("overhead --json <an existing file> without --force", _replace(V, "--json", "out.json"), _file))
    cs.append(CliCase("study bogus", ["study", "bogus", "--out", "out"]))
    cs.append(CliCase("study polyak --peer prodigy (an option of another study)",
                      ["study", "polyak", "--peer", "prodigy", "--out", "out"], timeout=25))
    cs.append(CliCase("study controller-variants --variant bogus",
                      ["study", "controller-variants", "--variant", "bogus", "--out", "out"], timeout=25))
    cs.append(CliCase("study controller-variants --seeds 0",
                      ["study", "controller-variants", "--seeds", "0", "--out", "out"], timeout=25))
    cs.append(CliCase("study learned --peer bogus", ["study", "learned", "--peer", "bogus", "--out", "out"], timeout=25))
    cs.append(CliCase("study learned --net nolabel", ["study", "learned", "--net", "nolabel", "--out", "out"], timeout=25))
    cs.append(CliCase("study learned --net x=missing.safetensors",
                      ["study", "learned", "--net", "x=missing.safetensors", "--out", "out"], timeout=25))
    cs.append(CliCase("study polyak --out <an existing file>", ["study", "polyak", "--out", "afile"], _file, timeout=25))
    cs.append(CliCase("study polyak into a non-empty --out without --force", ["study", "polyak", "--out", "out"], _full,
                      timeout=25))
    cs.append(CliCase("tasks --bogus", ["tasks", "--bogus"]))
    cs.append(CliCase("optimizers extra-arg", ["optimizers", "extra-arg"]))
    cs.append(CliCase("no command", []))
    return cs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["OMP_NUM_THREADS"] = "1"
    return env


CLI_MEMORY = 4 * 2 ** 30  # address space of a CLI case: a bad size must not take the machine's memory


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY, CLI_MEMORY))


def run_cli(c: CliCase, root: Path) -> Result:
    d = Path(tempfile.mkdtemp(dir=root))
    t0 = time.perf_counter()
    try:
        if c.setup is not None:
            c.setup(d)
        p = subprocess.Popen([sys.executable, "-m", "nestopt.cli", *c.argv], cwd=d, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env(), start_new_session=True,
                             preexec_fn=_limit_memory)
        try:
            _out, err_b = p.communicate(timeout=c.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return Result("CLI", c.label, "silent", f"accepted: still running after {c.timeout:.0f} s (the bad input "
                          "started real work)", None, time.perf_counter() - t0)
        err = err_b.decode(errors="replace")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        rc = p.returncode
        origin = None
        frames = re.findall(r'File "([^"]+)", line (\d+)', err)
        if frames:
            origin = f"{_short(frames[-1][0])}:{frames[-1][1]}"
        last = lines[-1][:300] if lines else ""
        if rc == 2 and len(lines) == 1 and "Traceback" not in err:
            out = Out("clear", last)
        elif rc == 0:
            out = Out("silent", "accepted (exit 0)" + (f"; stderr: {last}" if last else ""))
        elif "Traceback" in err:
            out = Out("unclear", f"exit {rc}, traceback: {last}", origin)
        else:
            out = Out("unclear", f"exit {rc}, {len(lines)} stderr lines: {last}", origin)
        return Result("CLI", c.label, out.outcome, out.detail, out.origin, time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- running ------------------------------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    pass


def run_case(kind: str, label: str, fn: Callable[[], Out]) -> Result:
    def fire(signum: int, frame: Any) -> None:
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(CASE_TIMEOUT)
    t0 = time.perf_counter()
    try:
        out = fn()
    except CaseTimeout:
        out = Out("unclear", f"still running after {CASE_TIMEOUT} s")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a case that cannot even be set up (an old checkout without the API)
        out = Out("unclear", f"the case itself failed: {type(e).__name__}: {_msg(e)}", origin_of(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return Result(kind, label, out.outcome, out.detail, out.origin, time.perf_counter() - t0)


def collect() -> None:
    for f in (constructor_cases, group_cases, step_cases, dtype_cases, state_dict_cases, schedule_cases, hyper_cases,
              other_cases):
        try:
            f()
        except Exception as e:  # noqa: BLE001 - an API missing from this checkout: say so, keep the rest
            print(f"audit: could not build {f.__name__}: {type(e).__name__}: {e}", file=sys.stderr)


def table(results: list[Result]) -> str:
    rows = [f"{'kind':26s} " + " ".join(f"{o:>8s}" for o in OUTCOMES) + f" {'total':>8s}"]
    tot = {o: 0 for o in OUTCOMES}
    for k in KINDS:
        rs = [r for r in results if r.kind == k]
        if not rs:
            continue
        counts = {o: sum(r.outcome == o for r in rs) for o in OUTCOMES}
        for o in OUTCOMES:
            tot[o] += counts[o]
        rows.append(f"{k:26s} " + " ".join(f"{counts[o]:8d}" for o in OUTCOMES) + f" {len(rs):8d}")
    rows.append(f"{'total':26s} " + " ".join(f"{tot[o]:8d}" for o in OUTCOMES) + f" {len(results):8d}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every case and its outcome to this file")
    ap.add_argument("--kind", action="append", choices=KINDS, help="run only this kind (repeatable)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI cases")
    ap.add_argument("--cli-workers", type=int, default=2, help="CLI subprocesses at a time (default 2)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = ap.parse_args(argv)
    kinds = set(args.kind or KINDS)
    if args.no_cli:
        kinds.discard("CLI")

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import nestopt

    t0 = time.perf_counter()
    where = Path(nestopt.__file__).resolve().parent
    print(f"audit of nestopt at {where}", flush=True)
    collect()
    results: list[Result] = []
    for kind, label, fn in CASES:
        if kind in kinds:
            results.append(run_case(kind, label, fn))
    if "CLI" in kinds:
        root = Path(tempfile.mkdtemp(prefix="nestopt-audit-"))
        try:
            with ThreadPoolExecutor(max(1, args.cli_workers)) as pool:
                results += list(pool.map(lambda c: run_cli(c, root), cli_cases()))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    print(table(results))
    print(f"{len(results)} cases in {wall:.0f} s")
    if not args.quiet:
        bad = [r for r in results if r.outcome in ("unclear", "silent")]
        if bad:
            print(f"\nunclear and silent cases ({len(bad)}):")
            for r in bad:
                print(f"  [{r.kind}] {r.case}: {r.outcome}: {r.detail}" + (f"  <{r.origin}>" if r.origin else ""))
    if args.json:
        doc = {"nestopt": str(where), "seconds": round(wall, 1),
               "counts": {k: {o: sum(r.kind == k and r.outcome == o for r in results) for o in OUTCOMES} for k in KINDS},
               "cases": [{**asdict(r), "seconds": round(r.seconds, 3)} for r in results]}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
