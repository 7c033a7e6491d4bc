"""torch's intra-op thread count, set for a block and restored after it (a library function must
not change a process-wide setting and leave it changed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (tiny tensors: fastest, and what a worker process of a
    study's pool uses), and the previous thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
