"""Pytree plumbing: weights and hyperparameters may be a Tensor or a dict/list/tuple of Tensors.

The solvers work on flat lists of tensors with ``torch._foreach_*`` kernels (one launch per list,
not one per tensor); :func:`flatten` / :func:`unflatten` convert at the user-function boundary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

Tree = Any
Vec = list[torch.Tensor]


def flatten(tree: Tree, name: str) -> tuple[Vec, Any]:
    flat, spec = pytree.tree_flatten(tree)
    if not flat:
        raise ValueError(f"{name} is empty: expected a Tensor or a dict/list/tuple of Tensors")
    for i, x in enumerate(flat):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor or a dict/list/tuple of Tensors; leaf {i} is "
                            f"{type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: leaf {i} has dtype {x.dtype}; hyperparameters and weights must be floating point")
    return flat, spec


def unflatten(vec: Vec, spec: Any) -> Tree:
    return pytree.tree_unflatten(list(vec), spec)


def _plain() -> bool:
    """Under a torch.func transform the foreach kernels have no batching rule: use per-tensor ops."""
    return torch._C._functorch.maybe_current_level() is not None


def dot(a: Vec, b: Vec) -> torch.Tensor:
    if len(a) == 1:
        return torch.sum(a[0] * b[0])
    prods = [x * y for x, y in zip(a, b)] if _plain() else torch._foreach_mul(a, b)
    return torch.stack([torch.sum(p) for p in prods]).sum()


def axpy(alpha: Any, x: Vec, y: Vec) -> Vec:
    """``y + alpha * x`` (``alpha`` a float or a 0-dim tensor)."""
    if _plain():
        return [yi + alpha * xi for xi, yi in zip(x, y)]
    if isinstance(alpha, torch.Tensor):
        return torch._foreach_add(y, torch._foreach_mul(x, alpha))
    return torch._foreach_add(y, x, alpha=alpha)


def add(x: Vec, y: Vec) -> Vec:
    return [a + b for a, b in zip(x, y)] if _plain() else torch._foreach_add(x, y)


def sub(x: Vec, y: Vec) -> Vec:
    return [a - b for a, b in zip(x, y)] if _plain() else torch._foreach_sub(x, y)


def scale(alpha: Any, x: Vec) -> Vec:
    return [alpha * a for a in x] if _plain() else torch._foreach_mul(x, alpha)


def flat_cat(x: Vec) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in x])


def split_like(vec: torch.Tensor, like: Vec) -> Vec:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out
