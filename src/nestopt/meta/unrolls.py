"""Running batches of unrolls (weights, starting snapshot) of one inner run, in this process or in
worker processes, and the antithetic ES estimate built on them (:func:`es_gradient`). Every unroll is a
deterministic function of its inputs, so results do not depend on the worker count.

Under ``torchrun`` (a process group of more than one rank initialised, see :mod:`nestopt._ranks`)
every rank runs its share of each batch (unroll ``i`` on rank ``i % world``, over its own workers)
and the results are gathered in the batch's order on every rank, so every rank goes on with the
same results as one process would, bit for bit."""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import zlib
from typing import Any

import torch
from torch import nn

from .. import _ranks
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
    over ``workers`` spawned processes (each one thread). Use as a context manager, or ``close()``.

    ``ranks`` (default: whether a process group of more than one rank is initialised) spreads each
    batch over the group's ranks too: every rank must then run the same batches, in the same order
    (a rank whose batch differs is a ``RuntimeError`` that says so)."""

    def __init__(self, workers: int = 1, *, ranks: bool | None = None) -> None:
        check_int("workers", workers, lo=1)
        if ranks is not None and not isinstance(ranks, bool):
            raise TypeError(f"ranks={ranks!r} is invalid: expected True, False or None (spread over the ranks "
                            "when a process group is initialised)")
        self.ranks = _ranks.is_distributed() if ranks is None else ranks and _ranks.is_distributed()
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None

    def run(self, net: nn.Module, inner: _Inner | _ControllerInner, specs: list[tuple[torch.Tensor, tuple[Any, ...]]], steps: int,
            batches: list[Any], keep_end: bool = True) -> list[tuple[float, list[float], tuple[Any, ...] | None]]:
        """``(meta_loss, losses, end snapshot or None)`` of each ``(flat weights, snapshot)`` in
        ``specs``. Leaves the network's weights as they were; ``inner`` ends in an unspecified snapshot."""
        if not self.ranks:
            return self._run(net, inner, specs, steps, batches, keep_end)
        world, me = _ranks.world_size(), _ranks.rank()
        check = _fingerprint(net, inner, specs, steps, keep_end)  # before the unrolls move the task's clock
        with _per_rank():  # other unrolls run on the other ranks: nothing to sync with them
            mine = self._run(net, inner, specs[me::world], steps, batches, keep_end)
        gathered = _ranks.all_gather((check, mine))
        differ = [r for r, (c, _) in enumerate(gathered) if c != check]
        if differ:
            raise RuntimeError(f"rank(s) {differ} ran another batch of unrolls than rank {me} (other weights, task, "
                               "step count or number of unrolls): every rank of a torchrun meta-training must run "
                               "the same settings and seed")
        return [gathered[i % world][1][i // world] for i in range(len(specs))]

    def _run(self, net: nn.Module, inner: _Inner | _ControllerInner, specs: list[tuple[torch.Tensor, tuple[Any, ...]]],
             steps: int, batches: list[Any], keep_end: bool) -> list[tuple[float, list[float], tuple[Any, ...] | None]]:
        if not specs:
            return []
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


def _per_rank() -> Any:
    """Optimizers with ``process_group="auto"`` kept from syncing over the ranks for a block (each
    rank runs its own unrolls): :func:`nestopt.optim.distributed.per_rank`."""
    from ..optim.distributed import per_rank

    return per_rank()


def _fingerprint(net: nn.Module, inner: _Inner | _ControllerInner, specs: list[tuple[torch.Tensor, tuple[Any, ...]]],
                 steps: int, keep_end: bool) -> tuple[Any, ...]:
    """What every rank's batch must agree on: the task, its clock, the step count, the number of
    unrolls and a checksum of the network's weights and of the unrolls' weights."""
    crc = zlib.crc32(torch.nn.utils.parameters_to_vector(list(net.parameters())).detach().cpu().numpy().tobytes())
    for f, _ in specs:
        crc = zlib.crc32(f.detach().cpu().contiguous().numpy().tobytes(), crc)
    return (getattr(inner, "family", None), getattr(inner, "seed", None), getattr(inner, "t", None), steps,
            len(specs), keep_end, crc)


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
