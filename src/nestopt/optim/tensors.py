"""Tensor helpers the optimizers share: the one-sync squared-norm read and the fused-kernel check."""

from __future__ import annotations

import torch

_BIG = 1 << 15
_LOW = (torch.float16, torch.bfloat16)


def host_sq_norms(tensors: list[torch.Tensor], *extra: torch.Tensor | float) -> tuple[list[float], list[float]]:
    """``||t||^2`` of each tensor, in input order, and the values of ``extra`` (scalar tensors or
    numbers), as Python floats, with one host sync. Small tensors share one fused multi-tensor norm
    (float16/bfloat16 ones accumulate and return in float32, so a large half gradient does not
    overflow to inf); on CPU each large float32/float64 tensor gets a BLAS dot, which reads it once
    and beats the multi-tensor norm there (measured 2.2 vs 3.4 ms on 10M floats). Large tensors
    are read in input order."""
    small: list[int] = []
    low: list[int] = []
    big: list[int] = []
    cpu = bool(tensors) and tensors[0].device.type == "cpu"
    for i, t in enumerate(tensors):
        if t.dtype in _LOW:
            low.append(i)
        elif cpu and t.numel() >= _BIG:
            big.append(i)
        else:
            small.append(i)
    vals = list(torch._foreach_norm([tensors[i] for i in small])) if small else []
    if low:
        vals += torch._foreach_norm([tensors[i] for i in low], 2, dtype=torch.float32)
    vals += [torch.dot(f, f) for f in (tensors[i].reshape(-1) for i in big)]
    vals += [e.detach().reshape(()) for e in extra if torch.is_tensor(e)]
    try:
        host = torch.stack(vals).tolist() if vals else []  # the host sync (stack promotes mixed dtypes)
    except RuntimeError:  # values on several devices (rare): one float64 stack on the first one's device
        host = torch.stack([v.to(vals[0].device, torch.float64) for v in vals]).tolist()
    out = [0.0] * len(tensors)
    for j, i in enumerate(small + low):
        out[i] = host[j] * host[j]
    for j, i in enumerate(big, len(small) + len(low)):
        out[i] = host[j]
    rest = iter(host[len(tensors):])
    return out, [next(rest) if torch.is_tensor(e) else float(e) for e in extra]


def fused_ok(ps: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors: on the CPU, one dtype it supports.

    Our step counters live on the host (the hypergradient and the learned rates read them every step
    without a device sync). torch's fused CUDA kernel wants them on the GPU, so CUDA tensors take the
    foreach kernel instead, which accepts host counters (torch's own default on CUDA)."""
    return all(p.device.type == "cpu" and type(p).__name__ != "DTensor" and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               and p.dtype == ps[0].dtype for p in ps)
