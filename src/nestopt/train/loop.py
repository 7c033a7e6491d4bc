"""One training loop, under one divergence rule.

:func:`train_loop` drives an optimizer for a number of steps; what a caller records (curves,
trajectories, diagnostics) it records from callbacks, so the bench, the studies and meta-training
share the stepping, the timing and the divergence rule instead of each keeping its own.

Contract of one step ``s`` (0-based; ``steps_done`` is ``s + 1`` after it):

1. ``b = batch(s)`` (or ``b = s`` without ``batch``), outside the timed region;
2. timed: the closure (``zero_grad(set_to_none=True)``, ``loss(b)``, ``backward(create_graph=...)``,
   ``clip_grad_norm_`` when ``clip_norm`` is set) runs inside ``opt.step(closure)`` when
   ``closure=True``, before a plain ``opt.step()`` otherwise, or as ``step_fn(closure)`` when given;
   then ``scheduler.step()``; the float loss;
3. ``on_step(steps_done, loss, result)``, untimed (wrap optimizer work in ``result.timed()``);
4. a loss that is not finite: diverged, stop;
5. every ``eval_every`` steps, at the last step and when a callback asked to stop:
   ``evaluate()`` (untimed, in ``result.eval_time``), ``on_eval(steps_done, metrics, result)``,
   then the divergence rule on the monitored value against its value at the first evaluation.

``on_step`` and ``on_eval`` may return ``True`` (exactly; other values are ignored) to stop
(``result.stopped``). An exception in
``catch`` (by default ``RuntimeError``, ``ValueError``, ``ArithmeticError``) raised anywhere in
the steps, e.g. by an optimizer that gives up, ends the run as diverged at ``steps_done + 1``
with ``"Type: message"`` kept in ``result.error``. With ``eval_at_start`` (the default) the
model is evaluated once before the first step; that evaluation sets the reference value and is
passed to ``on_eval`` with step 0, but is not itself checked and not inside ``catch``.

Example::

    >>> import torch
    >>> from nestopt.train import train_loop
    >>> w = torch.nn.Parameter(torch.tensor([3.0]))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> res = train_loop(opt, 50, lambda _: (w ** 2).sum(), evaluate=lambda: {"val_loss": float(w.detach() ** 2)},
    ...                  eval_every=10)
    >>> res.steps_done, res.diverged, res.metrics["val_loss"] < 1e-8
    (50, False, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_int, check_number

DIVERGE_FACTOR = 100.0
DEFAULT_CATCH: tuple[type[BaseException], ...] = (RuntimeError, ValueError, ArithmeticError)


class _UsageValueError(ValueError):
    """A misuse found inside the steps (a bad metric): raised through ``catch``, never taken for divergence."""


class _UsageTypeError(TypeError):
    """A misuse found inside the steps (a loss that is not a scalar Tensor): raised through ``catch``."""


class _UsageKeyError(KeyError):
    """``monitor`` names no metric: raised through ``catch``."""


@dataclass(frozen=True)
class Divergence:
    """The divergence rule: a training loss that is not finite, or a monitored (evaluation) value
    that is not finite or above ``factor * max(abs(first), floor)``, ``first`` being the monitored
    value at the first evaluation. ``factor=math.inf`` checks finiteness only."""

    factor: float = DIVERGE_FACTOR
    floor: float = 1e-12

    def __post_init__(self) -> None:
        if self.factor != math.inf:
            check_number("factor", self.factor, lo=0.0, lo_open=True)
        check_number("floor", self.floor, lo=0.0)

    def loss_diverged(self, loss: float) -> bool:
        return not math.isfinite(loss)

    def monitored_diverged(self, value: float, first: float) -> bool:
        return not math.isfinite(value) or value > self.factor * max(abs(first), self.floor)


@dataclass
class LoopResult:
    """What a run of :func:`train_loop` did; also the live state handed to the callbacks."""

    steps_done: int = 0
    diverged: bool = False
    diverged_step: int | None = None
    error: str | None = None  # "Type: message" of a caught exception
    stopped: bool = False  # a callback asked to stop
    train_time: float = 0.0  # seconds of training steps (and of work in ``timed()``)
    eval_time: float = 0.0  # seconds in ``evaluate``
    loss: float | None = None  # the last training loss
    metrics: Any = None  # the last evaluation's result
    first: float | None = None  # the monitored value at the first evaluation (the reference)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.train_time / max(self.steps_done, 1)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the enclosed work (e.g. ``opt.observe_validation(v)`` in a callback) as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.train_time += time.perf_counter() - t0


LossFn = Callable[[Any], torch.Tensor]
StepCallback = Callable[[int, float, LoopResult], Any]
EvalCallback = Callable[[int, Any, LoopResult], Any]


def _monitored(metrics: Any, monitor: str | None) -> float | None:
    if monitor is None or metrics is None:
        return None
    if isinstance(metrics, Mapping):
        if monitor not in metrics:
            raise _UsageKeyError(f"monitor={monitor!r} is not among the metrics evaluate() returned: "
                           f"{sorted(map(str, metrics))}; pass monitor= one of them, or monitor=None")
        value = metrics[monitor]
        where = f"evaluate()[{monitor!r}]"
    else:
        value, where = metrics, "evaluate()"
    if isinstance(value, bool | str | bytes) or value is None:
        raise _UsageValueError(f"{where}={value!r} is invalid: the monitored value must be a number")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise _UsageValueError(f"{where}={value!r} is invalid: the monitored value must be a number") from None


def _loss_value(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _UsageTypeError(f"{what} returned {type(value).__name__}: expected a scalar Tensor (the training loss)")
    if value.numel() != 1:
        raise _UsageTypeError(f"{what} returned a Tensor of shape {tuple(value.shape)}: expected a scalar Tensor "
                              "(the training loss)")
    return value


def train_loop(opt: torch.optim.Optimizer, steps: int, loss: LossFn, *,
               batch: Callable[[int], Any] | None = None,
               closure: bool = False,
               create_graph: bool = False,
               clip_norm: float | None = None,
               clip_params: Sequence[torch.Tensor] | None = None,
               step_fn: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
               scheduler: Any = None,
               evaluate: Callable[[], Any] | None = None,
               eval_every: int = 1,
               eval_at_start: bool = True,
               monitor: str | None = "val_loss",
               on_step: StepCallback | None = None,
               on_eval: EvalCallback | None = None,
               divergence: Divergence | None = Divergence(),
               catch: tuple[type[BaseException], ...] = DEFAULT_CATCH) -> LoopResult:
    """Run ``steps`` optimizer steps of ``opt`` on ``loss(batch(step))``; see the module docstring.

    ``evaluate`` returns a mapping (``monitor`` names the value the divergence rule watches) or a
    number; ``monitor=None`` watches nothing. ``divergence=None`` turns the rule off (the run goes
    on through non-finite losses). ``clip_params`` defaults to every parameter of ``opt``.
    """
    check_int("steps", steps, lo=0)
    check_int("eval_every", eval_every, lo=1)
    if not isinstance(opt, torch.optim.Optimizer) and not all(hasattr(opt, a) for a in ("step", "zero_grad",
                                                                                         "param_groups")):
        raise TypeError(f"opt={opt!r} is invalid: expected a torch.optim.Optimizer")
    for name, fn in (("loss", loss), ("batch", batch), ("step_fn", step_fn), ("evaluate", evaluate),
                     ("on_step", on_step), ("on_eval", on_eval)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}={fn!r} is invalid: expected a function")
    if clip_norm is not None and clip_norm != math.inf:
        check_number("clip_norm", clip_norm, lo=0.0, lo_open=True)
    if divergence is not None and not isinstance(divergence, Divergence):
        raise TypeError(f"divergence={divergence!r} is invalid: expected a Divergence or None")
    if (not isinstance(catch, tuple)
            or not all(isinstance(c, type) and issubclass(c, BaseException) for c in catch)):
        raise TypeError(f"catch={catch!r} is invalid: expected a tuple of exception classes")
    if clip_norm is not None and clip_params is None:
        clip_params = [p for g in opt.param_groups for p in g["params"]]
    res = LoopResult()

    def run_eval() -> Any:
        t0 = time.perf_counter()
        metrics = evaluate()  # type: ignore[misc]
        res.eval_time += time.perf_counter() - t0
        res.metrics = metrics
        return metrics

    if evaluate is not None and eval_at_start:
        metrics = run_eval()
        res.first = _monitored(metrics, monitor)
        if on_eval is not None:
            on_eval(0, metrics, res)

    def make_closure(b: Any) -> Callable[[], torch.Tensor]:
        box: list[torch.Tensor] = []

        def c() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            value = _loss_value(loss(b), "loss(batch)")
            value.backward(create_graph=create_graph)
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)  # type: ignore[arg-type]
            box.append(value)
            return value

        c.box = box  # type: ignore[attr-defined]  # the losses it computed, for steps that return None
        return c

    try:
        for step in range(steps):
            b = batch(step) if batch is not None else step
            c = make_closure(b)
            t0 = time.perf_counter()
            if step_fn is not None:
                out = step_fn(c)
            elif closure:
                out = opt.step(c)
            else:
                out = c()
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if out is None:
                if not c.box:  # type: ignore[attr-defined]
                    raise _UsageTypeError("the step returned None and never called the closure: there is no loss "
                                          "to record")
                out = c.box[-1]  # type: ignore[attr-defined]
            if isinstance(out, torch.Tensor):
                lv = float(_loss_value(out, "the step").detach())
            elif isinstance(out, int | float) and not isinstance(out, bool):
                lv = float(out)
            else:
                raise _UsageTypeError(f"the step returned {type(out).__name__}: expected the loss, a scalar Tensor "
                                      "or a number")
            res.train_time += time.perf_counter() - t0
            res.steps_done = done = step + 1
            res.loss = lv
            stop = on_step is not None and on_step(done, lv, res) is True
            if divergence is not None and divergence.loss_diverged(lv):
                res.diverged, res.diverged_step = True, done
                break
            if evaluate is not None and (done % eval_every == 0 or done == steps or stop):
                metrics = run_eval()
                if on_eval is not None:
                    stop = on_eval(done, metrics, res) is True or stop
                value = _monitored(metrics, monitor)
                if value is not None:
                    if res.first is None:
                        res.first = value
                        bad = divergence is not None and divergence.loss_diverged(value)
                    else:
                        bad = divergence is not None and divergence.monitored_diverged(value, res.first)
                    if bad:
                        res.diverged, res.diverged_step = True, done
                        break
            if stop:
                res.stopped = True
                break
    except (_UsageValueError, _UsageTypeError, _UsageKeyError):
        raise
    except catch as e:
        res.error = f"{type(e).__name__}: {e}"
        res.diverged, res.diverged_step = True, res.steps_done + 1
    return res
