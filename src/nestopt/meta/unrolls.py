"""Running batches of unrolls (weights, starting snapshot) of one inner run, in this process or in
worker processes, and the antithetic ES estimate built on them (:func:`es_gradient`). Every unroll is a
deterministic function of its inputs, so results do not depend on the worker count."""

from __future__ import annotations

import io
import math
import multiprocessing as mp
from typing import Any

import torch
from torch import nn

from .._checks import check_int, check_number
from .inner import _ControllerInner, _Inner, make_inner


def _unroll_one(net: nn.Module, inner: _Inner | _ControllerInner, flat: torch.Tensor, snap: tuple[Any, ...], steps: int,
                batches: list[Any], keep_end: bool) -> tuple[float, list[float], tuple[Any, ...] | None]:
    """One unroll of ``inner`` from ``snap`` with the network's weights set to ``flat``; the end
    snapshot only when ``keep_end`` (persistent particles need it, plain ES does not)."""
    torch.nn.utils.vector_to_parameters(flat, list(net.parameters()))
    inner.restore(snap)
    meta_loss, losses = inner.unroll(net, steps, False, batches)
    return float(meta_loss.detach()), losses, inner.snapshot() if keep_end else None


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_WORKER_INNER: dict[tuple[str, int], _Inner | _ControllerInner] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _unroll_job(payload: bytes) -> bytes:
    """Worker side of :class:`Unrolls`: rebuilds the task once per (family, seed) and runs one unroll."""
    # process-internal: bytes this run made for its own worker processes, never read from a file
    net, family, seed, flat, snap, steps, batches, keep_end = torch.load(io.BytesIO(payload), weights_only=False)
    inner = _WORKER_INNER.get((family, seed))
    if inner is None:
        _WORKER_INNER.clear()  # one task at a time
        inner = _WORKER_INNER[(family, seed)] = make_inner(net, family, seed)
    return _dump(_unroll_one(net, inner, flat, snap, steps, batches, keep_end))


class Unrolls:
    """Runs a batch of unrolls (weights, starting snapshot) of one task, in this process or spread
    over ``workers`` spawned processes (each one thread). Use as a context manager, or ``close()``."""

    def __init__(self, workers: int = 1) -> None:
        check_int("workers", workers, lo=1)
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None

    def run(self, net: nn.Module, inner: _Inner | _ControllerInner, specs: list[tuple[torch.Tensor, tuple[Any, ...]]], steps: int,
            batches: list[Any], keep_end: bool = True) -> list[tuple[float, list[float], tuple[Any, ...] | None]]:
        """``(meta_loss, losses, end snapshot or None)`` of each ``(flat weights, snapshot)`` in
        ``specs``. Leaves the network's weights as they were; ``inner`` ends in an unspecified snapshot."""
        params = list(net.parameters())
        base = torch.nn.utils.parameters_to_vector(params).detach().clone()
        try:
            if self.pool is None:
                return [_unroll_one(net, inner, f, s, steps, batches, keep_end) for f, s in specs]
            jobs = [_dump((net, inner.family, inner.seed, f, s, steps, batches, keep_end)) for f, s in specs]
            # process-internal: the workers' replies to this run, never read from a file
            return [torch.load(io.BytesIO(r), weights_only=False) for r in self.pool.map(_unroll_job, jobs)]
        finally:
            torch.nn.utils.vector_to_parameters(base, params)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> Unrolls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def es_gradient(inner: _Inner | _ControllerInner, net: nn.Module, steps: int, sigma: float, pairs: int, gen: torch.Generator,
                batches: list[Any], unrolls: Unrolls | None = None) -> torch.Tensor:
    """Antithetic evolution-strategies estimate of d(meta-loss)/d(Phi) over one truncation:
    ``mean_i (L(Phi + e_i) - L(Phi - e_i)) / (2 sigma^2) e_i``, ``e_i ~ N(0, sigma^2)``, every
    unroll from the same inner state and on the same batches. Needs no backpropagation through
    the unroll, so its cost does not grow with the unroll's memory. Leaves ``inner`` and ``net``
    as they were."""
    check_int("steps", steps, lo=1)
    check_number("sigma", sigma, lo=0.0, lo_open=True)
    check_int("pairs", pairs, lo=1)
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"gen={gen!r} is invalid: expected a torch.Generator")
    if not isinstance(batches, list | tuple) or len(batches) < steps + 1:
        n = len(batches) if isinstance(batches, list | tuple) else type(batches).__name__
        raise ValueError(f"batches={n} is invalid: an unroll of steps={steps} needs {steps + 1} batches "
                         "(inner.draw(steps) gives them)")
    snap = inner.snapshot()
    flat = torch.nn.utils.parameters_to_vector(list(net.parameters())).detach()
    eps = [torch.randn(flat.shape, generator=gen, dtype=flat.dtype) * sigma for _ in range(pairs)]
    specs = [(flat + sign * e, snap) for e in eps for sign in (1.0, -1.0)]
    try:
        results = (unrolls or Unrolls()).run(net, inner, specs, steps, batches, keep_end=False)
    finally:
        inner.restore(snap)
    grad = torch.zeros_like(flat)
    for j, e in enumerate(eps):
        plus, minus = results[2 * j][0], results[2 * j + 1][0]
        if math.isfinite(plus) and math.isfinite(minus):
            grad += (plus - minus) / (2 * sigma * sigma * pairs) * e
    return grad
