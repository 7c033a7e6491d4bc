"""``nestopt overhead``: what one optimizer step costs, as a ratio to torch's fastest.

The model is synthetic: ``n_params`` parameters laid out as square 1024x1024 weight matrices with
bias vectors (the last matrix trimmed to hit the count), gradients drawn once and kept fixed, so
only ``optimizer.step()`` is timed. The references, ``AdamW(fused=True)``, ``SGD(foreach=True)``
and ``SGD(momentum=0.9, foreach=True)`` (heavy ball, the reference for momentum methods such as
``ComplexMomentum``), are measured in the same process, interleaved with the others round by
round; each number is the median over rounds of the mean step time in a round. Two more rows
give the floor of the optimizers that read the gradients' norms before they step (Polyak's rule,
the nested optimizer): the reference's step after one pass that reads every gradient's squared
norm to the host (the same pass those optimizers run, with its one sync).

Memory: ``state floats/param`` counts the optimizer's state tensors (what a checkpoint carries);
``peak MB`` is the growth of the process's peak memory over the warm-up steps: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the kernel's resident high-water mark, reset before
each optimizer (Linux; ``-`` where that is not available). Optimizers that need second-order
closures (``create_graph``) are listed but not measured: fixed gradients carry no graph.

Size: ``n_params`` is at most :func:`max_params` (what fits in the device's memory at
:data:`BYTES_PER_PARAM` bytes a parameter, and at most :data:`MAX_PARAMS`).

On CUDA every configuration is also measured with its step captured in a CUDA graph
(``torch.cuda.graph`` after a warm-up on a side stream, as torch documents for ``capturable``
Adam) and replayed: a row ``NAME [CUDA graph]``, or the reason the capture failed (torch's
``AdamW(fused=True)`` without ``capturable=True`` refuses it). Two references join there:
``AdamW(capturable=True)`` (foreach) and ``AdamW(fused=True, capturable=True)``. nestopt's
optimizers run their capturable step on CUDA by default (:mod:`nestopt.optim.base`).

Interrupted (``KeyboardInterrupt``), :func:`measure` raises :class:`Interrupted`, whose ``rows``
hold what was measured: every configuration with at least one finished round.
"""

from __future__ import annotations

import math
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._malloc import settle, settled
from . import registry as opt_registry


def _after_norm_pass(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` whose every step first reads all gradients' squared norms to the host (in reverse,
    as Polyak and the nested optimizer do): what one extra gradient read costs, with nothing else."""
    from ..optim import tensors

    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None][::-1]
    step = opt.step

    def step_after_norms(closure: Callable[[], Any] | None = None) -> Any:
        tensors.host_sq_norms(grads)
        return step(closure)

    opt.step = step_after_norms  # type: ignore[method-assign]
    return opt


REFERENCES: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch AdamW(fused=True)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "torch SGD(foreach=True)": lambda p: torch.optim.SGD(p, lr=1e-3, foreach=True),
    "torch SGD(momentum=0.9, foreach=True)": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=True),
    "norm pass + AdamW(fused=True)": lambda p: _after_norm_pass(torch.optim.AdamW(p, lr=1e-3, fused=True)),
    "norm pass + SGD(foreach=True)": lambda p: _after_norm_pass(torch.optim.SGD(p, lr=1e-3, foreach=True)),
}


# references for a CUDA device only (torch's capturable path takes no CPU tensors)
CUDA_REFERENCES: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch AdamW(capturable=True)": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True, capturable=True),
    "torch AdamW(fused=True, capturable=True)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True, capturable=True),
}
GRAPH = " [CUDA graph]"


def _nested_frozen(p: list[torch.Tensor]) -> torch.optim.Optimizer:
    from ..optim.nested import NestedOptimizer

    # (on CUDA its base capturable too: torch's check before a CUDA graph captures the fused step)
    extra = {"capturable": True} if p and p[0].is_cuda else {}
    return NestedOptimizer(p, torch.optim.AdamW, signal="frozen", lr=1e-3, fused=True, **extra)


def _learned_mlp(p: list[torch.Tensor]) -> torch.optim.Optimizer:
    from ..optim.learned import LearnedOptimizer

    return LearnedOptimizer(p, net="mlp")


# Configurations that are not registry entries but whose step cost an issue asks for. The frozen
# nested optimizer still computes every default feature and runs the controller every step; the
# shipped per-element MLP is the learned optimizer that is not the default.
EXTRA: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "nested-adamw (frozen)": _nested_frozen,
    "learned (net='mlp')": _learned_mlp,
}


# The model, its gradients, one configuration's copy of both and its state (up to about four
# floats a parameter) and temporaries: float32 throughout.
BYTES_PER_PARAM = 48
MAX_PARAMS = 10**10


def memory_bytes(device: str = "cpu") -> int | None:
    """The device's total memory in bytes (RAM for ``cpu``), or ``None`` where it is not known."""
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def max_params(device: str = "cpu") -> int:
    """The largest ``n_params`` :func:`measure` takes on ``device``: what fits in its memory at
    :data:`BYTES_PER_PARAM` bytes a parameter, and at most :data:`MAX_PARAMS`."""
    mem = memory_bytes(device)
    return MAX_PARAMS if mem is None else min(MAX_PARAMS, mem // BYTES_PER_PARAM)


class Interrupted(KeyboardInterrupt):
    """:func:`measure` stopped by a ``KeyboardInterrupt``; ``rows`` holds what it measured."""

    def __init__(self, rows: list["Row"], total: int) -> None:
        super().__init__(f"interrupted with {len(rows)} of {total} configurations measured")
        self.rows = rows
        self.total = total


@dataclass
class Row:
    name: str
    ms: float
    state_floats_per_param: float
    peak_mb: float | None
    why: str | None = None  # why it was not measured (a capture that failed)

    def as_dict(self) -> dict[str, Any]:
        measured = not math.isnan(self.ms)
        out = {"name": self.name, "ms_per_step": self.ms if measured else None,
               "state_floats_per_param": self.state_floats_per_param if measured else None, "peak_mb": self.peak_mb}
        if self.why is not None:
            out["not_measured"] = self.why
        return out


CAPTURE_ERRORS: dict[str, str] = {}  # the last measurement's failed captures, by configuration


def _graph_ms(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None, steps: int) -> float:
    """ms per replay of ``opt``'s step captured in a CUDA graph (torch's recipe: a warm-up on a
    side stream, then the capture); raises what the capture raises."""
    def one() -> None:
        opt.step(closure) if closure else opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            one()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps


def synthetic_params(n_params: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Parameters (with ``.grad`` filled) totalling exactly ``n_params`` elements."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes: list[tuple[int, ...]] = []
    left = n_params
    while left > 0:
        if left >= 1024 * 1024 + 1024:
            shapes += [(1024, 1024), (1024,)]
            left -= 1024 * 1024 + 1024
        else:
            shapes.append((left,))
            left = 0
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=g).mul_(0.02).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=g).mul_(1e-3).to(device)
        params.append(p)
    return params


def _state_elems(opt: torch.optim.Optimizer) -> int:
    """Elements of per-parameter state, plus what an optimizer keeps outside ``opt.state``
    (``cache_numel()``: the nested optimizer's hindsight caches and snapshots)."""
    extra = opt.cache_numel() if hasattr(opt, "cache_numel") else 0
    return extra + sum(_numel(v) for st in opt.state.values() for v in st.values())


def _numel(v: Any) -> int:
    """Elements of a state value: a tensor (scalars such as a step count left out), or the tensors
    of a list (SOAP's and Kron's per-dimension factors)."""
    if torch.is_tensor(v):
        return v.numel() if v.numel() > 1 else 0
    if isinstance(v, (list, tuple)):
        return sum(_numel(x) for x in v)
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def measure(names: Sequence[str] | None = None, n_params: int = 10_000_000, steps: int = 10, rounds: int = 3,
            warmup: int = 3, device: str = "cpu") -> list[Row]:
    """Rows for the references and each registered optimizer in ``names`` (default: all but the
    ones the registry runs only when named: PSGD-Kron, whose first step on one 960x960 matrix did
    not finish in two minutes here, with pytorch-optimizer 4.1). Peak
    memory is read over the first round's warm-up steps, timing over the steps after them (see
    :mod:`nestopt._malloc`); the allocator setting is the one before the call afterwards."""
    CAPTURE_ERRORS.clear()
    with settled(measuring_memory=False):
        return _measure(names, n_params, steps, rounds, warmup, device)


def _measure(names: Sequence[str] | None, n_params: int, steps: int, rounds: int, warmup: int,
             device: str) -> list[Row]:
    builders: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = dict(REFERENCES)
    if device.startswith("cuda"):
        builders.update(CUDA_REFERENCES)
    losses: dict[str, bool] = {}
    skipped: list[str] = []
    default = [s.name for s in opt_registry.specs() if not s.named_only]  # (PSGD-Kron: only when named)
    for n in (default if names is None else names):
        spec = opt_registry.get(n)
        if spec.create_graph:  # second order: fixed gradients carry no graph to differentiate
            skipped.append(n)
            continue
        builders[n] = lambda p, spec=spec: spec.make(p)
        losses[n] = spec.needs_loss
    for n, build in EXTRA.items():
        if names is None or any(n.startswith(m) for m in names):
            builders[n] = build
            losses[n] = True
    base = synthetic_params(n_params, device)
    cuda = device.startswith("cuda")
    loss_value = torch.tensor(1.0, device=device)
    times: dict[str, list[float]] = {n: [] for n in builders}
    state: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    try:
        _rounds(builders, losses, base, cuda, loss_value, times, state, peaks, rounds, steps, warmup, n_params)
    except KeyboardInterrupt as e:
        done = [Row(n, statistics.median(times[n]), state[n], peaks[n]) for n in builders if times[n]]
        raise Interrupted(done, len(builders) + len(skipped)) from e
    rows = []
    for n in builders:
        rows.append(Row(n, statistics.median(times[n]), state[n], peaks[n]))
        if times.get(n + GRAPH):
            rows.append(Row(n + GRAPH, statistics.median(times[n + GRAPH]), state[n], peaks[n]))
        elif n in CAPTURE_ERRORS:
            rows.append(Row(n + GRAPH, math.nan, math.nan, None, CAPTURE_ERRORS[n]))
    return rows + [Row(n, math.nan, math.nan, None) for n in skipped]


def _rounds(builders: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]], losses: dict[str, bool],
            base: list[torch.Tensor], cuda: bool, loss_value: torch.Tensor, times: dict[str, list[float]],
            state: dict[str, float], peaks: dict[str, float | None], rounds: int, steps: int, warmup: int,
            n_params: int) -> None:
    """The interleaved rounds; fills ``times``, ``state`` and ``peaks`` as each measurement ends."""
    for rnd in range(rounds):
        for name, build in builders.items():
            params = [p.detach().clone().requires_grad_() for p in base]
            for p, b in zip(params, base):
                p.grad = b.grad.clone()
            settle(measuring_memory=rnd == 0)  # peak memory is read in the first round only
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            have_peak = (not cuda) and _reset_peak()
            rss0 = _rss_kb("VmRSS") if have_peak else 0
            opt = build(params)
            closure = (lambda: loss_value) if losses.get(name) else None
            for _ in range(warmup if rnd == 0 else 1):
                opt.step(closure) if closure else opt.step()
            if cuda:
                torch.cuda.synchronize()
            if rnd == 0:
                state[name] = _state_elems(opt) / n_params
                if cuda:
                    peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
                elif have_peak:
                    peaks[name] = (_rss_kb("VmHWM") - rss0) / 1024
                else:
                    peaks[name] = None
                settle(measuring_memory=False)
                opt.step(closure) if closure else opt.step()  # its temporaries now come from the heap
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step(closure) if closure else opt.step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(1e3 * (time.perf_counter() - t0) / steps)
            if cuda and name not in CAPTURE_ERRORS:
                try:
                    times.setdefault(name + GRAPH, []).append(_graph_ms(opt, closure, steps))
                except Exception as e:  # what torch or the optimizer says about capturing its step
                    CAPTURE_ERRORS[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    times.pop(name + GRAPH, None)
                    torch.cuda.synchronize()
            del opt, params


def format_table(rows: list[Row], n_params: int, device: str) -> str:
    ref = {r.name: r.ms for r in rows}  # (a reference an interrupted run did not reach: ratios nan)
    adamw, sgd = ref.get("torch AdamW(fused=True)", math.nan), ref.get("torch SGD(foreach=True)", math.nan)
    hb = ref.get("torch SGD(momentum=0.9, foreach=True)", math.nan)
    out = [f"optimizer step on a synthetic {n_params / 1e6:g}M-parameter model ({device}, "
           f"{torch.get_num_threads()} threads)",
           f"{'optimizer':37s} {'ms/step':>9s} {'x AdamW(fused)':>15s} {'x SGD(foreach)':>15s} {'x SGD(mom)':>11s} "
           f"{'state floats/param':>19s} {'peak MB':>8s}"]
    for r in rows:
        if math.isnan(r.ms):
            why = r.why or "needs a second-order closure (create_graph=True)"
            out.append(f"{r.name:37s} not measured: {why}")
            continue
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        out.append(f"{r.name:37s} {r.ms:9.2f} {r.ms / adamw:15.2f} {r.ms / sgd:15.2f} {r.ms / hb:11.2f} "
                   f"{r.state_floats_per_param:19.2f} {peak:>8s}")
    return "\n".join(out)
