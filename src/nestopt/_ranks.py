"""The ranks of a ``torchrun`` launch: who this process is, and the exchanges of picklable objects
between the ranks of one run (every one falls back to the one-process behaviour when no process
group of more than one rank is initialised).

    torchrun --nproc_per_node 4 -m nestopt meta-train --method pes ... --out DIR

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process;
:func:`process_group` initialises a gloo group from them (when none is initialised yet, on the CPU:
the exchanges here are of small Python objects) and destroys it at the end, after a barrier.

Safety: the objects exchanged here are pickled by ``torch.distributed``. They are bytes the ranks of
one run make for each other, over the run's own connections, never read from a file: no file a
user loads goes through this module.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # bounded: a rank that died never hangs the others for ever
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

__all__ = ["DEFAULT_TIMEOUT", "LAUNCH_VARIABLES", "all_gather", "barrier", "broadcast", "env_rank", "env_world_size",
           "gather", "init_from_env", "is_distributed", "is_main", "launched", "leave_together", "local_world_size", "process_group",
           "rank", "shutdown", "world_size"]


def _dist() -> Any:
    """``torch.distributed`` when it is built in and a group is initialised, else ``None``."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the initialised group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """The initialised group's size (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files), or the only process."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is invalid: expected an integer (torchrun sets it)") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` as the launcher set it (1 when it is not set)."""
    n = _env_int("WORLD_SIZE", 1)
    if n < 1:
        raise ValueError(f"WORLD_SIZE={n} is invalid: expected a positive integer (torchrun sets it)")
    return n


def env_rank() -> int:
    """``RANK`` as the launcher set it (0 when it is not set, or is not an integer)."""
    try:
        return _env_int("RANK", 0)
    except ValueError:
        return 0


def local_world_size() -> int:
    """How many ranks share this machine (``LOCAL_WORLD_SIZE``; 1 when it is not set)."""
    try:
        return max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    except ValueError:
        return 1


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one rank of several: ``WORLD_SIZE`` > 1."""
    return env_world_size() > 1


def _check_env() -> None:
    missing = [v for v in LAUNCH_VARIABLES if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (which sets "
                         f"{', '.join(LAUNCH_VARIABLES)}), or unset WORLD_SIZE to run in one process")
    n, r = env_world_size(), _env_int("RANK", 0)
    if not 0 <= r < n:
        raise ValueError(f"RANK={r} is invalid with WORLD_SIZE={n}: expected 0 to {n - 1}")


def init_from_env(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Initialise a gloo process group from torchrun's environment when this process was launched
    as one rank of several and no group is initialised yet; whether it did. A launch environment
    that lacks a variable is a ``ValueError`` that names it."""
    if _dist() is not None or not launched():
        return False
    _check_env()
    if not torch.distributed.is_available():
        raise ValueError(f"WORLD_SIZE={env_world_size()} is set, but this torch has no torch.distributed: "
                         "run in one process")
    torch.distributed.init_process_group("gloo", init_method="env://", timeout=timeout)
    return True


@contextmanager
def process_group(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[bool]:
    """Initialise the group from the environment for the block when it is not already (see
    :func:`init_from_env`); yields :func:`is_distributed`. A group it started is destroyed at the
    end, after a barrier when the block finished without an exception (so no rank leaves while
    another still writes); a group that was there before is left as it was."""
    started = init_from_env(timeout)
    finished = False
    try:
        yield is_distributed()
        finished = True
    finally:
        if started:
            shutdown(wait=finished)


def shutdown(wait: bool = True) -> None:
    """Destroy the initialised group (nothing without one), after a barrier when ``wait``."""
    if _dist() is None:
        return
    try:
        if wait:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def leave_together(timeout: datetime.timedelta = datetime.timedelta(seconds=30)) -> bool:
    """Wait (at most ``timeout``) for every rank to reach this point too, e.g. on an error every rank
    meets; whether they all did. Never raises: a rank that does not come only costs the wait."""
    if not is_distributed():
        return True
    try:
        torch.distributed.monitored_barrier(timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - a rank that went another way; the caller leaves anyway
        return False


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if is_distributed():
        torch.distributed.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    # process-internal: objects the ranks of this run pickle for each other, never read from a file
    torch.distributed.all_gather_object(out, obj)
    return out


def gather(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank ``dst`` (``None`` on the others); ``[obj]``
    without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    # process-internal: objects the ranks of this run pickle for each other, never read from a file
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the others' ``obj`` is ignored); ``obj`` without a group."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    # process-internal: an object a rank of this run pickles for the others, never read from a file
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
