"""Optimizers over several processes: DDP (replicated parameters) and FSDP2 (``fully_shard``,
DTensor parameters sharded over a 1-D mesh).

Each rank of a data-parallel run sees its own batch. Under DDP the gradients are averaged by DDP
itself, so every statistic of the gradients is the same on every rank; what a nestopt optimizer
reads from a rank's own batch is not: the loss (Polyak's gap, the nested optimizer's loss
features), the hindsight replay's scores, validation values and the nested optimizer's step
inputs (head statistics). Under FSDP2 each rank holds a shard of each tensor too, so every
statistic over a whole tensor (a norm, a dot product, an RMS) is a partial sum on each rank.

A :class:`Sync` combines both kinds with **one collective**: the partial sums are added over the
ranks and the rank-local values averaged, in one ``all_gather`` of a small float64 vector, summed
on every rank in rank order (so every rank gets the same bits). Elementwise work stays local.

``process_group`` (every nestopt optimizer takes it):

- ``"auto"`` (default): when ``torch.distributed`` is initialised with more than one rank, the
  optimizer syncs over the parameters' mesh (DTensor parameters) or the default group. At its first
  synced step it checks that the replicated parameters are the same on every rank (a fingerprint
  in the same collective); where they differ, the ranks are running separate models and the
  optimizer stays per-rank from then on. Inside :func:`per_rank` (what ``nestopt bench`` and the
  meta-trainer use to run independent jobs on each rank), ``"auto"`` never syncs.
- a ``ProcessGroup``: sync over that group (no fingerprint check).
- ``None``: never sync (one optimizer per rank).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

AUTO = "auto"
_LOCAL = threading.local()


@contextlib.contextmanager
def per_rank() -> Iterator[None]:
    """Inside this block, optimizers with ``process_group="auto"`` do not sync: each rank runs its
    own jobs (how ``nestopt bench`` and ``nestopt meta-train`` use the ranks under torchrun)."""
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield
    finally:
        _LOCAL.depth = depth


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def check_process_group(value: Any) -> Any:
    """``process_group`` as given, or a clear error."""
    if value is None or value == AUTO:
        return value
    dist = _dist()
    if dist is not None and isinstance(value, dist.ProcessGroup):
        return value
    raise ValueError(f"process_group={value!r} is invalid: expected 'auto', None, or a torch.distributed "
                     "ProcessGroup (of an initialised process group)")


_GROUPS: dict[int, Any] = {}  # this process's explicit groups, by token (a copy finds its group again)


def group_token(pg: Any) -> Any:
    """``pg`` as something ``copy.deepcopy`` and ``pickle`` take: a ProcessGroup becomes a token."""
    if pg is None or pg == AUTO:
        return pg
    _GROUPS[id(pg)] = pg
    return ("process-group", id(pg))


def group_from_token(token: Any, who: str) -> Any:
    if not (isinstance(token, tuple) and len(token) == 2 and token[0] == "process-group"):
        return token  # "auto", None, or the group itself (a load_state_dict keeps the one in use)
    pg = _GROUPS.get(token[1])
    if pg is None:  # unpickled in another process: its group is not here
        import warnings

        warnings.warn(f"{who} was saved with an explicit process_group, which does not exist in this process: "
                      "it now uses process_group='auto'; set opt.process_group to choose", RuntimeWarning, stacklevel=3)
        return AUTO
    return pg


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (sharing its memory), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def locals_(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [local(t) for t in ts]


def _mesh_group(p: torch.Tensor, who: str) -> Any:
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{who} under FSDP2 supports a 1-D device mesh; this parameter's mesh is "
                                  f"{mesh.ndim}-D (HSDP): use fully_shard on a 1-D mesh, or DDP")
    for pl in p.placements:
        if not (pl.is_shard() or pl.is_replicate()):
            raise NotImplementedError(f"{who} steps Shard or Replicate DTensor parameters, not {pl}")
    return mesh.get_group()


class Sync:
    """One optimizer's collective over ``group``: :meth:`reduce` adds partial sums and averages
    rank-local values in one ``all_gather``."""

    def __init__(self, group: Any, world: int, check: bool) -> None:
        self.group, self.world, self.check = group, world, check
        self.calls = 0  # collectives made (for the overhead meter and the tests)

    def reduce(self, partial: torch.Tensor | None, mean: torch.Tensor | None,
               fingerprint: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """``(sum over ranks of partial, mean over ranks of mean, same)``: float64 device tensors
        (1-D); ``same`` says whether every rank gave the same ``fingerprint`` (True without one)."""
        dist = _dist()
        parts = [x.reshape(-1).to(torch.float64) for x in (partial, mean, fingerprint) if x is not None]
        if not parts:
            return partial, mean, True
        vec = torch.cat(parts)
        if dist.get_backend(self.group) == "nccl" and vec.device.type == "cpu":
            vec = vec.cuda()
        out = [torch.empty_like(vec) for _ in range(self.world)]
        dist.all_gather(out, vec, group=self.group)
        self.calls += 1
        rows = torch.stack(out).to(parts[0].device)
        total = rows[0].clone()
        for r in rows[1:]:  # in rank order: every rank adds the same numbers in the same order
            total += r
        off, res = 0, []
        for x in (partial, mean):
            if x is None:
                res.append(None)
                continue
            n = x.numel()
            res.append(total[off:off + n] if x is partial else total[off:off + n] / self.world)
            off += n
        same = True
        if fingerprint is not None:
            n = fingerprint.numel()
            same = bool((rows[:, off:off + n] == rows[0, off:off + n]).all())
        return res[0], res[1], same


def fingerprint(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A cheap summary of the replicated parameters (their count, sizes and float64 sums)."""
    plain = [p for p in params if not is_dtensor(p)]
    if not plain:
        return torch.zeros(2, dtype=torch.float64)
    sums = torch.stack([p.detach().to(torch.float64).sum() if not p.is_complex() else
                        torch.view_as_real(p.detach()).to(torch.float64).sum() for p in plain]).cpu()
    return torch.cat([torch.tensor([float(len(plain)), float(sum(p.numel() for p in plain))], dtype=torch.float64),
                      sums.reshape(-1)[:1], sums.sum().reshape(1)])


def resolve(opt: Any, params: Sequence[torch.Tensor]) -> Sync | None:
    """``opt``'s :class:`Sync` (made at its first step and kept), or ``None`` for no sync."""
    st = opt.__dict__
    if "_sync" in st and st.get("_sync_for") is opt.param_groups:
        sync = st["_sync"]
        return None if sync is None or (st.get("_process_group", AUTO) == AUTO and getattr(_LOCAL, "depth", 0)) else sync
    pg = st.get("_process_group", AUTO)
    dist = _dist()
    name = type(opt).__name__
    sync: Sync | None = None
    if dist is not None and pg is not None:
        if pg == AUTO:
            if getattr(_LOCAL, "depth", 0):
                return None  # not kept: outside the block this optimizer syncs
            dt = [p for p in params if is_dtensor(p)]
            group = _mesh_group(dt[0], name) if dt else dist.group.WORLD
            world = dist.get_world_size(group)
            sync = Sync(group, world, check=not dt) if world > 1 else None
        else:
            world = dist.get_world_size(pg)
            sync = Sync(pg, world, check=False) if world > 1 else None
    st["_sync"], st["_sync_for"] = sync, opt.param_groups
    return sync


def sync_of(opt: Any) -> Sync | None:
    """The optimizer's sync (resolved at its first step and kept while its groups are the same)."""
    st = opt.__dict__
    if st.get("_sync_for") is opt.param_groups and st.get("_sync", False) is None:
        return None  # the common case, one process: two dict reads a step
    return resolve(opt, [p for g in opt.param_groups for p in g["params"]])


def reduce_stats(opt: Any, partial: torch.Tensor | None, mean: torch.Tensor | None,
                 params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``partial`` summed and ``mean`` averaged over ``opt``'s ranks (as given without a sync).

    The first synced step of an ``"auto"`` optimizer also checks that its replicated parameters
    agree across ranks; where they do not, it stays per-rank (and ``mean`` is its own)."""
    sync = sync_of(opt)
    if sync is None:
        return partial, mean
    fp = None
    if sync.check:
        fp = fingerprint(params or [p for g in opt.param_groups for p in g["params"]])
        dev = (partial if partial is not None else mean).device if (partial is not None or mean is not None) else None
        fp = fp.to(dev) if dev is not None else fp
    s, m, same = sync.reduce(partial, mean, fp)
    if sync.check:
        sync.check = False
        if not same:  # separate models on each rank: per-rank from now on
            opt.__dict__["_sync"] = None
            return partial, mean
    return s, m


def mean_values(opt: Any, values: Sequence[float]) -> list[float]:
    """Rank-local numbers averaged over ``opt``'s ranks (themselves without a sync)."""
    if sync_of(opt) is None or not values:
        return list(values)
    _, m = reduce_stats(opt, None, torch.tensor(list(values), dtype=torch.float64))
    assert m is not None
    return m.tolist()


def sample_view(p: torch.Tensor, k: int) -> torch.Tensor:
    """The elements ``0, k, 2k, ...`` of ``p`` flattened that this rank holds: all of them for a
    plain tensor, those of its shard for a DTensor sharded on dim 0 (the same elements in all, so
    sums over them added across ranks equal the unsharded sums)."""
    if not is_dtensor(p):
        return p.detach().reshape(-1)[::k]
    loc = local(p).detach().reshape(-1)
    if all(pl.is_replicate() for pl in p.placements):
        return loc[::k]
    if [pl.dim for pl in p.placements if pl.is_shard()] != [0]:
        raise NotImplementedError("sampling a DTensor needs it sharded on dim 0 (FSDP2's layout)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for d in p.shape[1:]:
        row *= d
    start = offset[0] * row if len(offset) else 0
    return loc[(-start) % k::k]


def refuse_sharded(opt: Any, params: Sequence[torch.Tensor], what: str) -> None:
    """The documented error for a combination that cannot step sharded parameters."""
    if any(is_dtensor(p) for p in params):
        raise NotImplementedError(f"{type(opt).__name__} {what} does not support FSDP2 (DTensor) parameters; "
                                  "see the README's 'Scaling out' table: use DDP for it")


_LOW = (torch.float16, torch.bfloat16)


def sq_each(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||t||^2`` of each (local) tensor as one float64 device vector: the norm in the tensor's
    precision (float32 for half ones), squared in float64, as :func:`~.tensors.host_sq_norms`
    squares it on the host."""
    out = []
    for t in ts:
        n = torch.linalg.vector_norm(t, dtype=torch.float32) if t.dtype in _LOW else torch.linalg.vector_norm(t)
        out.append(n.to(torch.float64).square())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def sq_norms(opt: Any, tensors: Sequence[torch.Tensor], *means: torch.Tensor | float,
             partial: bool | None = None) -> tuple[list[float], list[float]]:
    """:func:`~.tensors.host_sq_norms` across ranks: ``||t||^2`` of each whole tensor (its shards'
    squares added over the ranks under FSDP2; as they are where the tensors are replicated) and
    ``means`` (rank-local values: the loss) averaged over the ranks. One collective and one host
    sync; without a sync, exactly :func:`~.tensors.host_sq_norms`. ``partial`` says whether the
    tensors are shards (default: whether they are DTensors)."""
    from .tensors import host_sq_norms

    sync = sync_of(opt)
    sharded = any(is_dtensor(t) for t in tensors) if partial is None else partial
    if sync is None and not sharded:
        return host_sq_norms(list(tensors), *means)
    loc = locals_(tensors)
    dev = loc[0].device if loc else torch.device("cpu")
    sq = sq_each(loc)
    m = torch.stack([torch.as_tensor(v).detach().to(dev, torch.float64).reshape(()) for v in means]) if means else None
    if sync is None:  # sharded, no sync asked for: this rank's shards only
        host = torch.cat([sq] + ([m] if m is not None else [])).tolist()
        return host[:len(loc)], host[len(loc):]
    if sharded:
        part, mean = reduce_stats(opt, sq, m, tensors)
    else:
        part, mean = sq, reduce_stats(opt, None, m, tensors)[1]
    host = torch.cat([part] + ([mean] if mean is not None else [])).tolist()
    return host[:len(loc)], host[len(loc):]


def sum_partials(opt: Any, values: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums (dot products) computed on local shards, added over the ranks where the
    tensors are sharded (as they are otherwise): a float64 device vector."""
    if not any(is_dtensor(t) for t in tensors):
        return values.to(torch.float64)
    part, _ = reduce_stats(opt, values.to(torch.float64), None, tensors)
    assert part is not None
    return part
