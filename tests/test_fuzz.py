"""Property-based fuzz of the public surface (issue 21): every bad input gets a clear, one-line error
naming the argument (or the group key, the dtype, the shape), never a traceback from inside torch or
NumPy and never a silent non-finite result; a step that raises leaves the parameters bitwise as they
were, and non-finite values never reach the parameters.

Deterministic (``derandomize=True``, no example database) and sized to run in well under a minute on
two cores: ``python -m pytest tests/test_fuzz.py -q -n 0``. ``NESTOPT_FUZZ_ALL_BUGS=1`` reports every
distinct failure of a test, each shrunk to a minimal example, instead of the first one.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nestopt.optim as O  # noqa: E402

NAN, INF = math.nan, math.inf


class Huge(int):
    """An int too large for a float (10**400), with a short repr for the failure reports."""

    def __repr__(self) -> str:
        return "10**400" if self > 0 else "-10**400"


HUGE = Huge(10 ** 400)


# Every distinct failure of a test, each shrunk to a minimal example (slower when several fail), or only
# the first one (the default: a failing CI run stays about as fast as a passing one).
ALL_BUGS = os.environ.get("NESTOPT_FUZZ_ALL_BUGS") == "1"


def fuzz(n: int, *, fixtures: bool = False) -> Any:
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    if fixtures:
        checks.append(HealthCheck.function_scoped_fixture)
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, suppress_health_check=checks,
                    print_blob=False, report_multiple_bugs=ALL_BUGS)


# -- values ---------------------------------------------------------------------------------------------

BAD_NUMBERS = [-1.0, -1e-12, -1, 0, 0.0, NAN, INF, -INF, 1e30, 1e308, HUGE, Huge(-(10 ** 400))]
GOOD_NUMBERS = [1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0, 2, 3]
WRONG_TYPES: list[Any] = ["0.1", "", "nan", None, True, False, [0.1], [], {}, (0.9,), (0.9, 0.999, 0.5), (NAN, 0.9),
                         (0.9, 1.0), (0.5, 0.5), (-0.1, 0.9), (0.9, INF), b"x", 1 + 1j, ...]


def _tensor_values() -> st.SearchStrategy:
    # fresh tensors for every example: a step may keep a reference
    return st.one_of(st.builds(torch.tensor, st.sampled_from([0.1, NAN, -1.0, INF])),
                     st.builds(lambda: torch.tensor([0.1, 0.2])), st.builds(lambda: torch.tensor(0.1 + 0.1j)))


NUMBERS = st.one_of(st.sampled_from(BAD_NUMBERS + GOOD_NUMBERS),
                    st.floats(allow_nan=True, allow_infinity=True, width=64))
VALUES = st.one_of(NUMBERS, st.sampled_from(WRONG_TYPES), _tensor_values())
INTS = st.sampled_from([-5, -1, 0, 1, 2, 3, 4, 8, HUGE, 1.5, 2.0, "3", None, True, NAN, INF])


def choice_values(*valid: Any) -> st.SearchStrategy:
    return st.sampled_from([*valid, "bogus", "", None, 1, 0.5, True, NAN, [valid[0]] if valid else []])


# constructor keywords: name -> strategy (anything not listed draws from VALUES)
SPECIAL: dict[str, dict[str, st.SearchStrategy]] = {
    "Polyak": {"scope": choice_values("global", "tensor", "group"), "share": choice_values("norm", "equal", "whole", "global"),
               "precondition": choice_values(None, "rms"), "seed": INTS},
    "PolyakAdam": {"scope": choice_values("global", "tensor", "group"), "share": choice_values("norm", "equal"),
                   "seed": INTS},
    "LearnedOptimizer": {"net": st.sampled_from(["default", "mlp", "bogus", "", None, 3, "/nonexistent/net.safetensors",
                                                 b"default"]),
                         "chunk": st.sampled_from([None, -1, 0, 1, 4, HUGE, 1.5, "4", True]),
                         "compile": st.sampled_from([None, False, "yes", 0, NAN])},
    "ComplexMomentum": {"foreach": st.sampled_from([None, True, False, "yes", 0, 1, NAN])},
    "ComplexAdam": {},
    "HypergradientSGD": {"rule": choice_values("multiplicative", "additive")},
    "HypergradientAdam": {"rule": choice_values("multiplicative", "additive")},
    "NestedOptimizer": {
        "signal": choice_values("hindsight", "proxy", "frozen"),
        "features": st.sampled_from([None, [], ["bogus"], "grad_norm", 3, [None]]),
        "mult_range": st.sampled_from([(0.1, 10.0), (0.5, 2.0), (1.0, 2.0), (0.1,), (2.0, 0.5), (NAN, 2.0), (0.1, INF),
                                       "ab", None, 0.5, (0.0, 2.0), (0.1, 1.0)]),
        "scratchpad": st.sampled_from([0, 1, 2, -1, 1.5, "2", None, HUGE]),
        "hidden": st.sampled_from([1, 4, 8, 0, -1, 1.5, "8", None, HUGE]),
        "stats_every": INTS, "window": INTS, "period": INTS,
        "grid": st.sampled_from([(0.5, 1.0, 2.0), [1.0], (NAN, 1.0), (0.5, 2.0), (-1.0, 1.0), "ab", 3, [], (0.0, 1.0),
                                 (1.0, INF), None]),
        "seed": INTS, "per_tensor_groups": st.sampled_from([False, True]),
        "controller": st.sampled_from([None, "/nonexistent/c.safetensors", 3, "", "bogus"]),
        "base": st.sampled_from([torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam, "adamw", None, int, 3]),
    },
}


def _kwargs(cls: type) -> list[str]:
    import inspect

    ps = inspect.signature(cls.__init__).parameters
    names = [n for n, p in ps.items() if n not in ("self", "params") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if cls is O.NestedOptimizer:
        names += ["lr", "betas", "eps", "weight_decay"]  # the base's keywords (AdamW by default)
    if cls is O.PolyakAdam:  # Polyak's, through **kwargs (momentum and precondition are refused)
        names += ["scope", "share", "f_star", "max_lr", "eps", "momentum", "precondition", "beta2", "precond_eps", "seed"]
    return names + ["bogus_kw"]


OPT_NAMES = ["Polyak", "PolyakAdam", "LearnedOptimizer", "ComplexMomentum", "ComplexAdam", "HypergradientSGD",
             "HypergradientAdam", "NestedOptimizer"]

# torch's own wording for the base optimizer's arguments (NestedOptimizer passes them on)
ALIASES = {"lr": ("learning rate",), "betas": ("beta",), "eps": ("epsilon",)}


def named(msg: str, names: Any) -> bool:
    return any(n in msg or any(a in msg for a in ALIASES.get(n, ())) for n in names)


# -- a tiny problem --------------------------------------------------------------------------------------

def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2).to(dtype)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)


def closure_for(opt: torch.optim.Optimizer, model: nn.Module) -> Callable[[], torch.Tensor]:
    x, y = _data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() + 0.1  # above Polyak's f_star = 0
        loss.backward()
        return loss

    return closure


CONFIGS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "Polyak": lambda ps: O.Polyak(ps),
    "Polyak-rms-tensor": lambda ps: O.Polyak(ps, precondition="rms", scope="tensor", momentum=0.5),
    "PolyakAdam": lambda ps: O.PolyakAdam(ps),
    "LearnedOptimizer": lambda ps: O.LearnedOptimizer(ps),
    "LearnedOptimizer-mlp": lambda ps: O.LearnedOptimizer(ps, net="mlp"),
    "ComplexMomentum": lambda ps: O.ComplexMomentum(ps),
    "ComplexAdam": lambda ps: O.ComplexAdam(ps, lr=0.01),
    "HypergradientSGD": lambda ps: O.HypergradientSGD(ps, lr=0.05),
    "HypergradientAdam": lambda ps: O.HypergradientAdam(ps, lr=0.01),
    "NestedOptimizer": lambda ps: O.NestedOptimizer(ps, lr=0.01, window=2, period=2),  # a replay every 2 steps
    "NestedOptimizer-proxy": lambda ps: O.NestedOptimizer(ps, lr=0.01, signal="proxy", per_tensor_groups=True),
}
LOSS_BASED = ("Polyak", "Polyak-rms-tensor", "PolyakAdam")  # their step size reads the loss itself


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [bits(p) for p in params]


def same(params: list[torch.Tensor], snap: list[torch.Tensor]) -> bool:
    return all(torch.equal(bits(p), s) for p, s in zip(params, snap))


def finite(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


def where(e: BaseException) -> str:
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    return f"{type(e).__name__}: {e} (raised at {tb[-1].filename}:{tb[-1].lineno})" if tb else repr(e)


class FuzzTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def fire(signum: int, frame: Any) -> None:
        raise FuzzTimeout(f"still running after {seconds} s (a hang, or a bad value that started real work)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def limited(seconds: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Each example fails (instead of hanging the run) after ``seconds``."""
    import functools

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            with time_limit(seconds):
                fn(*args, **kwargs)

        return run

    return wrap


# -- 1. optimizer constructors ------------------------------------------------------------------------------

@st.composite
def constructor_calls(draw: Any) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(OPT_NAMES))
    cls = getattr(O, name)
    keys = draw(st.lists(st.sampled_from(_kwargs(cls)), min_size=1, max_size=3, unique=True))
    special = SPECIAL.get(name, {})
    return name, {k: draw(special.get(k, VALUES)) for k in keys}


@fuzz(600)
@given(call=constructor_calls())
@limited(15)
def test_constructor_accepts_or_names_the_argument(call: tuple[str, dict[str, Any]]) -> None:
    name, kwargs = call
    model = _model()
    params = list(model.parameters())
    try:
        opt = getattr(O, name)(model.parameters(), **kwargs)
    except (ValueError, TypeError) as e:
        assert named(str(e), kwargs), f"{name}(**{kwargs!r}): the error names none of {sorted(kwargs)}: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001 - the property: no other exception type
        pytest.fail(f"{name}(**{kwargs!r}) raised {where(e)}")
    # accepted: then a step works and keeps the parameters finite, or refuses with the parameters unchanged
    closure = closure_for(opt, model)
    for i in range(2):
        before = snapshot(params)
        try:
            opt.step(closure)
        except (ValueError, TypeError) as e:
            assert named(str(e), kwargs), f"{name}(**{kwargs!r}) step {i}: the error names none of {sorted(kwargs)}: {where(e)}"
            assert same(params, before), f"{name}(**{kwargs!r}) step {i} raised and left the parameters changed"
            return
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{name}(**{kwargs!r}) was accepted, then step {i} raised {where(e)}")
        assert finite(params), f"{name}(**{kwargs!r}) was accepted, and step {i} made a parameter non-finite"


# -- 2. param-group values set between steps ------------------------------------------------------------

def _group_keys(config: str) -> list[str]:
    model = _model()
    opt = CONFIGS[config](model.parameters())
    spec = getattr(type(opt), "group_spec", None) or {}
    return sorted(spec) or ["lr"]


GROUP_KEYS = {c: _group_keys(c) for c in CONFIGS}
GROUP_SPECIAL = {"rule": choice_values("multiplicative", "additive"), "foreach": st.sampled_from([None, True, False, "x", 1]),
                 "seed": INTS, "betas": st.one_of(st.sampled_from(WRONG_TYPES), st.tuples(NUMBERS, NUMBERS)),
                 "max_lr": st.one_of(st.none(), NUMBERS)}


@st.composite
def group_values(draw: Any) -> tuple[str, str, Any, int]:
    config = draw(st.sampled_from(sorted(CONFIGS)))
    key = draw(st.sampled_from(GROUP_KEYS[config]))
    value = draw(GROUP_SPECIAL.get(key, VALUES))
    at = draw(st.sampled_from([0, 1]))  # set before the first step, or between steps
    return config, key, value, at


@fuzz(400)
@given(case=group_values())
@limited(15)
def test_group_value_is_checked_at_step(case: tuple[str, str, Any, int]) -> None:
    config, key, value, at = case
    model = _model()
    params = list(model.parameters())
    opt = CONFIGS[config](model.parameters())
    closure = closure_for(opt, model)
    for i in range(3):
        if i == at:
            opt.param_groups[0][key] = value
        before = snapshot(params)
        try:
            opt.step(closure)
        except ValueError as e:
            assert key in str(e), f"{config}: group[{key!r}]={value!r}: the error does not name {key!r}: {where(e)}"
            assert same(params, before), f"{config}: group[{key!r}]={value!r}: step raised and left the parameters changed"
            return
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{config}: group[{key!r}]={value!r}: step {i} raised {where(e)}")
        assert finite(params), f"{config}: group[{key!r}]={value!r} was accepted and step {i} made a parameter non-finite"


@fuzz(150)
@given(key=st.sampled_from(["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"]),
       value=st.one_of(NUMBERS, st.sampled_from(WRONG_TYPES)))
@limited(15)
def test_nested_base_group_value_is_checked_at_step(key: str, value: Any) -> None:
    """The nested optimizer's groups are its base's (AdamW's): a value the base's step reads is checked too."""
    model = _model()
    params = list(model.parameters())
    opt = O.NestedOptimizer(model.parameters(), lr=0.01)
    closure = closure_for(opt, model)
    opt.step(closure)
    opt.param_groups[0][key] = value
    for i in range(2):
        before = snapshot(params)
        try:
            opt.step(closure)
        except (ValueError, TypeError) as e:
            assert named(str(e), [key]), f"group[{key!r}]={value!r}: the error does not name {key!r}: {where(e)}"
            assert same(params, before), f"group[{key!r}]={value!r}: step raised and left the parameters changed"
            return
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"NestedOptimizer: group[{key!r}]={value!r}: step {i} raised {where(e)}")
        assert finite(params), f"NestedOptimizer: group[{key!r}]={value!r} accepted and step {i} made a parameter non-finite"


# -- 3. gradients and losses ---------------------------------------------------------------------------------

SPECIAL_FLOATS = [NAN, INF, -INF, 0.0, -0.0, 1e30, -1e30, 3e38, 1e-30, 1e-45, 1.0, -1.0]
ELEMENT = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(-10, 10, width=32))
LOSSES = st.one_of(st.sampled_from([NAN, INF, -INF, 0.0, 0.05, 1.0, 1e30, 3e38, -1.0, 1e-30]),
                   st.builds(torch.tensor, st.sampled_from([NAN, INF, 1.0, 2.0])))


@st.composite
def gradient_cases(draw: Any) -> tuple[str, list[list[float]], str, Any]:
    config = draw(st.sampled_from(sorted(CONFIGS)))
    grads = [draw(st.lists(ELEMENT, min_size=6, max_size=6)), draw(st.lists(ELEMENT, min_size=2, max_size=2))]
    mode = draw(st.sampled_from(["grad", "loss", "closure"]))
    loss = draw(LOSSES)
    return config, grads, mode, loss


def _set_grads(params: list[torch.Tensor], grads: list[list[float]]) -> None:
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=p.dtype).reshape(p.shape)


@fuzz(500)
@given(case=gradient_cases())
@limited(15)
def test_nonfinite_gradients_never_reach_the_parameters(case: tuple[str, list[list[float]], str, Any]) -> None:
    config, grads, mode, loss = case
    model = _model()
    params = list(model.parameters())
    opt = CONFIGS[config](model.parameters())
    good = closure_for(opt, model)
    opt.step(good)  # some state first (momenta, second moments, a controller)
    before = snapshot(params)
    bad_grad = not all(math.isfinite(v) for g in grads for v in g)
    loss_v = float(loss)
    label = f"{config}: mode={mode}, grads={grads}, loss={loss!r}"
    nonfinite0 = opt.counters["nonfinite"] if hasattr(opt, "counters") else None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        _set_grads(params, grads)
        return loss if torch.is_tensor(loss) else torch.tensor(loss)

    try:
        if mode == "closure":
            opt.step(closure)
        else:
            _set_grads(params, grads)
            if mode == "loss" and "loss" in __import__("inspect").signature(opt.step).parameters:
                opt.step(loss=loss)
            elif config.startswith("Nested") and config != "NestedOptimizer-proxy":
                opt.step(closure)  # hindsight needs a closure
            else:
                opt.step()
    except (ValueError, TypeError) as e:
        assert named(str(e), ["loss", "closure", "grad"]), f"{label}: unclear refusal {where(e)}"
        assert same(params, before), f"{label}: step raised and left the parameters changed"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label}: step raised {where(e)}")
    assert finite(params), f"{label}: a parameter became non-finite"
    if bad_grad:
        assert same(params, before), f"{label}: a non-finite gradient was not skipped (the parameters moved)"
    if not math.isfinite(loss_v) and config in LOSS_BASED and mode != "grad":
        assert same(params, before), f"{label}: a non-finite loss was not skipped (the parameters moved)"
    if nonfinite0 is not None and opt.counters["nonfinite"] > nonfinite0:
        assert same(params, before), f"{label}: counted as a skipped step but the parameters moved"
    for i in range(2):  # a skipped step leaves nothing behind that poisons the next ones
        opt.step(good)
        assert finite(params), f"{label}: the good step {i} after it made a parameter non-finite"


# -- 4. dtypes and shapes ----------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
SHAPES = [(), (1,), (3,), (2, 3), (0,), (0, 3), (4, 1)]


def _dtype_names(dtype: torch.dtype) -> list[str]:
    return [str(dtype), str(dtype).replace("torch.", ""), "complex" if dtype.is_complex else "dtype"]


@fuzz(300)
@given(config=st.sampled_from(sorted(CONFIGS)),
       specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.sampled_from(SHAPES)), min_size=1, max_size=2))
@limited(15)
def test_dtypes_and_shapes_work_or_are_refused(config: str, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> None:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for dtype, shape in specs]
    label = f"{config}: params {[(str(d), s) for d, s in specs]}"
    try:
        opt = CONFIGS[config](params)
    except ValueError as e:
        words = [w for d, s in specs for w in _dtype_names(d)] + ["shape", "0-d", "zero-element", "element"]
        assert named(str(e), words), f"{label}: the refusal names no dtype or shape: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label}: construction raised {where(e)}")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((p - 1).abs().float() ** 2).sum() for p in params) + 0.1
        loss.backward()
        return loss

    for i in range(3):
        try:
            opt.step(closure)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label}: accepted, then step {i} raised {where(e)}")
        assert finite(params), f"{label}: step {i} made a parameter non-finite"


# -- 5. the CLI --------------------------------------------------------------------------------------------

GARBAGE = ["", ",", " ", "nan", "inf", "-inf", "-1", "0", "1e400", "abc", "1.5", "é", "--", "0x10", ";rm"]


_counter = itertools.count()


def _cli_valid(cmd: str, out: str) -> dict[str, list[str]]:
    """Options that make any real work tiny."""
    if cmd == "bench":
        return {"--tasks": ["quad-scalar"], "--optimizers": ["sgd"], "--seeds": ["1"], "--steps": ["2"],
                "--workers": ["1"], "--out": [out]}
    if cmd == "meta-train":
        return {"--net": ["linear"], "--steps": ["1"], "--unroll": ["1"], "--horizon": ["1"], "--families": ["quadratic"],
                "--out": [out]}
    if cmd == "overhead":
        return {"--params": ["1k"], "--steps": ["1"], "--rounds": ["1"], "--optimizers": ["sgd"], "--device": ["cpu"]}
    if cmd.startswith("study"):
        return {"--out": [out]}
    return {}


def _cli_invalid(cmd: str, tmp: Any) -> st.SearchStrategy:
    """One option that must be refused before any work starts: {flag: tokens} (``[]``: the flag is dropped)."""
    import os

    afile = tmp / "a-file"
    afile.write_text("x")
    full = tmp / "full"
    full.mkdir(exist_ok=True)
    (full / "results.json").write_text("{}")
    nofolder = str(tmp / "no" / "such" / "folder" / "x.json")
    ints = st.sampled_from(["0", "-1", "-5", "nan", "inf", "1.5", "", "abc", "1e3", "2**3", "é"])
    common_out = st.sampled_from([{"--out": [str(afile)]}, {"--out": [str(full)]}, {"--out": []}])
    if cmd == "bench":
        return st.one_of(common_out,
                         st.builds(lambda f, v: {f: [v]}, st.sampled_from(["--seeds", "--steps", "--workers"]), ints),
                         st.builds(lambda v: {"--tasks": [v]}, st.sampled_from(["", ",", " , ", "bogus", "quad-scalar,bogus",
                                                                                 "quad-scalar;bogus"])),
                         st.builds(lambda v: {"--optimizers": [v]}, st.sampled_from(["", ",", "bogus", "sgd,,bogus"])),
                         st.builds(lambda v: {"--suite": [v]}, st.sampled_from(["bogus", "", ",", "full,quick"])),
                         st.just({"--bogus": ["1"]}))
    if cmd == "meta-train":
        return st.one_of(common_out,
                         st.builds(lambda f, v: {f: [v]}, st.sampled_from(["--pairs", "--workers", "--steps", "--unroll",
                                                                           "--horizon"]), ints),
                         st.builds(lambda v: {"--sigma": [v]}, st.sampled_from(["0", "-1", "nan", "inf", "-inf", "", "x",
                                                                                 "1e400"])),
                         st.builds(lambda v: {"--seed": [v]}, st.sampled_from(["-1", "x", "1.5", "", str(2 ** 63), "1e30"])),
                         st.builds(lambda v: {"--families": [v]}, st.sampled_from(["", ",", "bogus", "quadratic,bogus"])),
                         st.builds(lambda v: {"--net": [v]}, st.sampled_from(["bogus", "", ","])),
                         st.builds(lambda v: {"--method": [v]}, st.sampled_from(["bogus", "", ","])),
                         st.just({"--net": ["controller"], "--method": ["tbptt"]}),
                         st.just({"--resume": [], "--out": [str(full)]}))
    if cmd == "overhead":
        return st.one_of(st.builds(lambda v: {"--params": [v]}, st.sampled_from(["inf", "nan", "-5", "0", "1e30", "", "abc",
                                                                                  "1.5", "10Q", "1e400", "-inf", "0.5"])),
                         st.builds(lambda f, v: {f: [v]}, st.sampled_from(["--steps", "--rounds"]), ints),
                         st.builds(lambda v: {"--optimizers": [v]}, st.sampled_from(["", ",", "bogus"])),
                         st.builds(lambda v: {"--device": [v]}, st.sampled_from(["tpu", "", "cuda:99", "cpu:0"]
                                                                                 + ([] if torch.cuda.is_available() else ["cuda"]))),
                         st.just({"--json": [nofolder]}), st.just({"--json": [str(afile)]}),
                         st.just({"--json": [str(full)]}), st.just({"--json": [os.fspath(tmp) + os.sep]}))
    if cmd == "study":  # a bad name
        return st.builds(lambda v: {"NAME": [v]}, st.sampled_from(["bogus", "", "POLYAK", "polyak,games", "--out"]))
    if cmd.startswith("study "):
        name = cmd.split()[1]
        opts = [common_out,
                st.just({"--peer": ["prodigy"]}) if name != "learned" else st.just({"--peer": ["bogus"]}),
                st.just({"--variant": ["bogus"]}),
                st.just({"--net": ["x=" + str(tmp / "missing.safetensors")]}) if name == "learned"
                else st.just({"--net": ["x=y"]}),
                st.builds(lambda v: {"--seeds": [v]}, ints if name == "controller-variants" else st.just("2"))]
        if name == "learned":
            opts.append(st.builds(lambda v: {"--net": [v]}, st.sampled_from(["nolabel", "=", "x=", "=y"])))
        return st.one_of(*opts)
    # tasks, optimizers: no options at all
    return st.sampled_from([{"--bogus": []}, {"EXTRA": ["x"]}, {"--out": [str(tmp)]}, {"--steps": ["1"]}])


STUDIES = ["polyak", "large-lr", "controller", "controller-variants", "learned", "hpo", "games"]
COMMANDS = ["bench", "meta-train", "overhead", "tasks", "optimizers", "study"] + [f"study {s}" for s in STUDIES]


def _argv(cmd: str, opts: dict[str, list[str]], name: str | None) -> list[str]:
    argv = cmd.split()
    if cmd == "study":
        argv.append(name if name is not None else "polyak")
    for flag, tokens in opts.items():
        if flag == "NAME":
            continue
        if flag == "EXTRA":
            argv += tokens
            continue
        argv += [flag, *tokens] if flag not in ("--resume",) else [flag]
    return argv


@fuzz(400, fixtures=True)
@given(data=st.data())
def test_cli_bad_option_exits_2_with_one_line(data: Any, tmp_path: Any, capsys: Any) -> None:
    from nestopt.cli import main

    tmp = tmp_path / f"ex{next(_counter)}"
    tmp.mkdir()
    cmd = data.draw(st.sampled_from(COMMANDS), label="command")
    opts = _cli_valid(cmd, str(tmp / "nonexistent-parent" / "out"))  # tiny work if the bad option were accepted
    bad = data.draw(_cli_invalid(cmd, tmp), label="invalid option")
    for k, v in bad.items():
        opts.pop(k, None)
        if v or k in ("--resume", "--bogus"):  # [] drops the option (a missing --out) or gives a bare flag
            opts[k] = v
    argv = _argv(cmd, opts, bad.get("NAME", [None])[0])
    capsys.readouterr()
    try:
        with time_limit(20):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except FuzzTimeout as e:
        pytest.fail(f"nestopt {argv}: {e}")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"nestopt {argv}: uncaught {where(e)}")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"nestopt {argv}: exit code {code!r}, expected 2; stderr: {err[-500:]!r}"
    assert len(lines) == 1, f"nestopt {argv}: stderr has {len(lines)} lines, expected one: {err[-800:]!r}"
    assert "Traceback" not in err, f"nestopt {argv}: a traceback on stderr: {err[-800:]!r}"


# -- 6. other public APIs ---------------------------------------------------------------------------------

TIMES = st.sampled_from([0, 0.5, 1, 2.5, 5, 10, 99.5, 100, 1e6, 1e30, INF])
SCHED_ARGS = st.one_of(NUMBERS, st.sampled_from(["0.1", None, True, [1.0], (1.0, 2.0)]))


@st.composite
def schedules(draw: Any) -> tuple[str, tuple[Any, ...], Callable[[], Any]]:
    from nestopt import schedule as S

    kind = draw(st.sampled_from(["constant", "linear", "cosine", "step_decay", "exponential", "join", "warmup_then"]))
    a = draw(st.lists(SCHED_ARGS, min_size=4, max_size=4))
    if kind == "constant":
        return kind, (a[0],), lambda: S.constant(a[0])
    if kind == "linear":
        return kind, tuple(a[:3]), lambda: S.linear(a[0], a[1], a[2])
    if kind == "cosine":
        return kind, tuple(a[:3]), lambda: S.cosine(a[0], a[1], a[2])
    if kind == "step_decay":
        ms = draw(st.sampled_from([[10, 20], [NAN], [20, 10], [], [-1, 5], "ab", [INF], [1e30]]))
        return kind, (a[0], ms, a[1]), lambda: S.step_decay(a[0], ms, a[1])
    if kind == "exponential":
        return kind, tuple(a), lambda: S.exponential(a[0], a[1], a[2], a[3])
    if kind == "join":
        bs = draw(st.sampled_from([[5.0], [NAN], [-1.0], [INF], [5.0, 3.0], [], "a", [1e308]]))
        return kind, (a[0], a[1], bs), lambda: S.join([S.constant(a[0]), S.constant(a[1])], bs)
    return kind, tuple(a), lambda: S.warmup_then(S.cosine(1.0, 0.0, 10), a[0], a[1], a[2])


SCHED_NAMES = {"constant": ["value"], "linear": ["start", "end", "steps"], "cosine": ["base", "min_value", "steps"],
               "step_decay": ["base", "milestones", "factor"], "exponential": ["base", "factor", "every", "min_value"],
               "join": ["boundaries", "pieces", "value"], "warmup_then": ["warmup_start", "base", "warmup", "start", "end",
                                                                         "steps", "boundaries"]}


@fuzz(400)
@given(case=schedules(), ts=st.lists(TIMES, min_size=1, max_size=4))
@limited(15)
def test_schedules_refuse_or_stay_finite(case: tuple[str, tuple[Any, ...], Callable[[], Any]], ts: list[float]) -> None:
    kind, args, make = case
    try:
        s = make()
    except (ValueError, TypeError) as e:
        assert named(str(e), SCHED_NAMES[kind]), f"{kind}{args}: the error names no argument: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{kind}{args} raised {where(e)}")
    for t in ts:
        try:
            v = s(t)
        except (ValueError, TypeError) as e:
            pytest.fail(f"{kind}{args} was accepted, then s({t!r}) raised {where(e)}")
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{kind}{args}: s({t!r}) raised {where(e)}")
        assert isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, \
            f"{kind}{args} was accepted, and s({t!r}) = {v!r}: not a finite rate >= 0"


@fuzz(60)
@given(t=st.sampled_from([NAN, -1, -1e-9, "1", None, True, [1], -INF, torch.tensor(NAN), torch.tensor([1.0, 2.0])]))
@limited(15)
def test_schedule_time_argument(t: Any) -> None:
    from nestopt import schedule as S

    for s in (S.constant(0.1), S.cosine(1.0, 0.0, 10), S.linear(0.0, 1.0, 10), S.step_decay(1.0, [5], 0.5),
              S.exponential(1.0, 0.5), S.join([S.constant(1.0), S.constant(0.5)], [3.0])):
        try:
            v = s(t)
        except (ValueError, TypeError) as e:
            assert "t=" in str(e) or "t " in str(e), f"{s}({t!r}): the error does not name t: {where(e)}"
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{s}({t!r}) raised {where(e)}")
        pytest.fail(f"{s}({t!r}) = {v!r}: a bad time was accepted")


@fuzz(150)
@given(value=st.one_of(NUMBERS, st.sampled_from(["0.1", None, True, [0.1], torch.tensor(NAN), torch.tensor(0.5)])),
       at=st.sampled_from([0, 1, 3]), spe=st.sampled_from([1, 2, 0.5, 0, -1, NAN, INF, "1", None, 1e-300]))
@limited(15)
def test_large_lr_scheduler_never_sets_a_bad_rate(value: Any, at: int, spe: Any) -> None:
    from nestopt.schedule import LargeLRScheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    lrs = [g["lr"] for g in opt.param_groups]
    label = f"LargeLRScheduler(schedule -> {value!r} from t={at}, steps_per_epoch={spe!r})"
    calls = itertools.count()
    try:  # the schedule gives 0.1 for its first `at` calls, then the drawn value
        sch = LargeLRScheduler(opt, lambda t: 0.1 if next(calls) < at else value, steps_per_epoch=spe)
    except (ValueError, TypeError) as e:
        assert named(str(e), ["schedule", "steps_per_epoch", "rate"]), f"{label}: unclear: {where(e)}"
        assert [g["lr"] for g in opt.param_groups] == lrs, f"{label}: refused but the rates changed"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label} raised {where(e)}")
    for _ in range(5):
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        try:
            sch.step()
        except (ValueError, TypeError) as e:
            assert named(str(e), ["schedule", "rate"]), f"{label}: unclear: {where(e)}"
            assert [g["lr"] for g in opt.param_groups] == lrs, f"{label}: refused but the rates changed"
            return
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label}: step raised {where(e)}")
        for g in opt.param_groups:
            lr = float(g["lr"])
            assert math.isfinite(lr) and lr >= 0, f"{label}: set lr={g['lr']!r}"


@fuzz(200)
@given(grid=st.one_of(st.lists(st.one_of(NUMBERS, st.sampled_from(["0.1", None, True])), max_size=4),
                      st.sampled_from(["0.1", None, 0.1, {0.1: 1}])),
       scores=st.lists(st.one_of(st.sampled_from([NAN, INF, -INF, 0.0, 1.0, 1e308, None, "x", True]),
                                 st.floats(-5, 5)), min_size=4, max_size=4),
       minimize=st.sampled_from([True, False, None, "yes", 1]))
@limited(15)
def test_grid_search_refuses_or_picks_a_finite_best(grid: Any, scores: list[Any], minimize: Any) -> None:
    from nestopt.schedule import grid_search

    it = iter(scores * 3)
    label = f"grid_search(grid={grid!r}, scores={scores!r}, minimize={minimize!r})"
    try:
        res = grid_search(lambda lr: next(it), grid, minimize=minimize)
    except (ValueError, TypeError) as e:
        assert named(str(e), ["grid", "train", "minimize", "score", "diverged"]), f"{label}: unclear: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label} raised {where(e)}")
    assert res.best_lr in [float(g) for g in grid], f"{label}: best_lr={res.best_lr!r} is not in the grid"
    best = res.scores[res.best_lr]
    assert math.isfinite(best), f"{label}: best_lr={res.best_lr} has a non-finite score {best!r}"
    finite_scores = [s for s in res.scores.values() if math.isfinite(s)]
    assert best == (min(finite_scores) if minimize else max(finite_scores)), f"{label}: {res.best_lr} is not the best"


@fuzz(150)
@given(steps=st.sampled_from([1, 3, 100, 0, -1, 1.5, "3", None, True]),  # (10**400 steps is real work, not a bad value)
       lr=st.one_of(st.sampled_from([0.01, 0.1, 1e3, 1e30, 0.0, -0.1, NAN, INF, "0.1", None, True, HUGE]),
                    st.floats(0.001, 1.0)),
       momentum=st.sampled_from([0.0, 0.5, 0.9, 1.0, -0.1, NAN, INF, "0", None]),
       truncate=st.sampled_from([None, 1, 2, 0, -1, 1.5, "1", HUGE]))
@limited(15)
def test_unrolled_hypergradient_refuses_or_is_finite(steps: Any, lr: Any, momentum: Any, truncate: Any) -> None:
    from nestopt.hyper import HypergradientError, unrolled_hypergradient

    def inner(w, lam):
        return 50.0 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # curvature ~100: lr 1e3 diverges

    def outer(w, lam):
        return 0.5 * ((w - 0.5) ** 2).sum()

    w0 = torch.zeros(3, dtype=torch.float64)
    lam = torch.tensor(0.5, dtype=torch.float64)
    label = f"unrolled_hypergradient(steps={steps!r}, lr={lr!r}, momentum={momentum!r}, truncate={truncate!r})"
    try:
        h = unrolled_hypergradient(inner, outer, w0, lam, steps=steps, lr=lr, momentum=momentum, truncate=truncate)
    except (ValueError, TypeError) as e:
        assert named(str(e), ["steps", "lr", "momentum", "truncate"]), f"{label}: unclear: {where(e)}"
        return
    except HypergradientError as e:  # the documented refusal of a diverged unroll: it names the step and the rate
        assert "lr" in str(e) or "learning rate" in str(e) or "step" in str(e), f"{label}: unclear: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label} raised {where(e)}")
    assert bool(torch.isfinite(h).all()), f"{label}: returned a non-finite hypergradient {h}"
    assert torch.equal(w0, torch.zeros(3, dtype=torch.float64)), f"{label}: modified params"


@fuzz(80)
@given(kind=st.sampled_from(["get", "family", "get_game"]),
       name=st.sampled_from(["", "bogus", None, 3, b"quad-scalar", "quad-scalar ", " quadratic", "QUAD-SCALAR", ["x"],
                             "quad-scalar", "quadratic", "bilinear", NAN]))
@limited(15)
def test_task_registry_lookups(kind: str, name: Any) -> None:
    import nestopt.tasks as T

    valid = {"get": T.names(), "family": T.family_names(), "get_game": T.game_names()}[kind]
    try:
        getattr(T, kind)(name)
    except KeyError as e:
        assert isinstance(name, str) and name not in valid, f"T.{kind}({name!r}): KeyError for a valid name"
        assert repr(name) in str(e) or name in str(e), f"T.{kind}({name!r}): the KeyError does not name it: {where(e)}"
        return
    except (ValueError, TypeError) as e:
        assert not (isinstance(name, str) and name in valid), f"T.{kind}({name!r}) refused a valid name"
        assert "name" in str(e) or repr(name) in str(e), f"T.{kind}({name!r}): unclear: {where(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"T.{kind}({name!r}) raised {where(e)}")
    assert isinstance(name, str) and name in valid, f"T.{kind}({name!r}) accepted a name that is not registered"


@fuzz(40)
@given(fam=st.sampled_from(["quadratic", "teacher-mlp"]),
       seed=st.sampled_from([0, 3, -1, 1.5, "1", None, True, NAN, HUGE, 2 ** 64]))
@limited(15)
def test_family_sample_seed(fam: str, seed: Any) -> None:
    import nestopt.tasks as T

    try:
        T.family(fam).sample(seed)
    except (ValueError, TypeError) as e:
        assert "seed" in str(e), f"family({fam!r}).sample({seed!r}): unclear: {where(e)}"
        assert not (_seed_ok(seed) and seed < 2 ** 63), f"family({fam!r}).sample({seed!r}) refused a valid seed"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"family({fam!r}).sample({seed!r}) raised {where(e)}")
    assert _seed_ok(seed), f"family({fam!r}).sample({seed!r}) accepted a bad seed"


def _seed_ok(seed: Any) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
