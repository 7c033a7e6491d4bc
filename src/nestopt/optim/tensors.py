"""Tensor helpers the optimizers share: the one-sync squared-norm read (and its device twin for
capturable steps), the masked update of a capturable step, and the fused-kernel check."""

from __future__ import annotations

import torch

_BIG = 1 << 15
_LOW = (torch.float16, torch.bfloat16)


def _kinds(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], list[int]]:
    """The indices of the tensors a multi-tensor norm reads (``small``), those read in float32
    (``low``: float16, bfloat16) and the large CPU ones a BLAS dot reads (``big``)."""
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
    return small, low, big


def host_sq_norms(tensors: list[torch.Tensor], *extra: torch.Tensor | float) -> tuple[list[float], list[float]]:
    """``||t||^2`` of each tensor, in input order, and the values of ``extra`` (scalar tensors or
    numbers), as Python floats, with one host sync. Small tensors share one fused multi-tensor norm
    (float16/bfloat16 ones accumulate and return in float32, so a large half gradient does not
    overflow to inf); on CPU each large float32/float64 tensor gets a BLAS dot, which reads it once
    and beats the multi-tensor norm there (measured 2.2 vs 3.4 ms on 10M floats). Large tensors
    are read in input order."""
    small, low, big = _kinds(tensors)
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


def device_sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``||t||^2`` of each tensor as one float64 tensor on their device, with no host read: the
    same kernels and the same values as :func:`host_sq_norms` (a norm squared in float64, a BLAS
    dot as it is), for a capturable step."""
    small, low, big = _kinds(tensors)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    if small:
        for i, v in zip(small, torch._foreach_norm([tensors[i] for i in small])):
            out[i] = v.double().square()
    if low:
        for i, v in zip(low, torch._foreach_norm([tensors[i] for i in low], 2, dtype=torch.float32)):
            out[i] = v.double().square()
    for i in big:
        f = tensors[i].reshape(-1)
        out[i] = torch.dot(f, f).double()
    return torch.stack(out)


# what torch's fused SGD kernel (``torch._fused_sgd_``) takes: the masked update's fast path
_FUSED_SGD = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def masked_sub_(targets: list[torch.Tensor], sources: list[torch.Tensor], coef: torch.Tensor, skip: torch.Tensor) -> None:
    """``t -= coef * s`` for each pair, unless ``skip`` (a bool device scalar) holds, with no host
    read: a skipped update leaves the targets bitwise as they were, whatever the sources hold (a
    NaN gradient times a rate of 0 would be NaN). Torch's fused SGD kernel with a tensor rate and
    ``found_inf`` does it in one pass where it takes the tensors; elsewhere (complex tensors, a
    DTensor, and under ``torch.compile``, which has no meta kernel for it and fuses the select into
    one pass itself) an element-wise select."""
    if not targets:
        return
    fusable = all(type(t).__name__ != "DTensor" and t.dtype in _FUSED_SGD and t.device.type in ("cpu", "cuda")
                  and t.dtype == targets[0].dtype and s.dtype == t.dtype and t.device == s.device
                  for t, s in zip(targets, sources))
    # (torch's CUDA kernel reads a float32 rate: float64 tensors there take the exact select)
    cuda64 = targets[0].dtype == torch.float64 and targets[0].device.type == "cuda"
    if fusable and not cuda64 and not torch.compiler.is_compiling():
        lr = coef.to(torch.float64 if targets[0].dtype == torch.float64 else torch.float32)
        torch._fused_sgd_(targets, sources, [], weight_decay=0.0, momentum=0.0, lr=lr, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False, found_inf=skip.to(torch.float32))
        return
    for t, s in zip(targets, sources):
        t.copy_(torch.where(skip, t, t - coef.to(t.real.dtype) * s))


def adamw_masked_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: torch.Tensor, beta1: float,
                  beta2: float, weight_decay: float, eps: float, skip: torch.Tensor) -> None:
    """AdamW's update unless ``skip`` (a float device scalar, 1 to skip) is set, the step counts
    already advanced by the caller (who takes them back where it skipped, as torch's fused Adam
    does): torch's fused AdamW kernel with ``found_inf=skip``; under ``torch.compile``, which has
    no meta kernel for it, the same update as element-wise operations selected by ``skip`` (equal
    to the kernel's to float32 rounding; inductor fuses them)."""
    if not torch.compiler.is_compiling():
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False, found_inf=skip)
        return
    keep = skip == 0
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = t.to(torch.float64)
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        m1 = torch.lerp(m, g, 1 - beta1)
        v1 = v * beta2 + (1 - beta2) * g * g
        p1 = p * (1 - lr * weight_decay) - (lr / bc1) * m1 / (torch.sqrt(v1) / torch.sqrt(bc2) + eps)
        m.copy_(torch.where(keep, m1, m))
        v.copy_(torch.where(keep, v1, v))
        p.copy_(torch.where(keep, p1.to(p.dtype), p))


def pick(cond: torch.Tensor, a: float, b: float, like: torch.Tensor) -> torch.Tensor:
    """``a`` where ``cond`` (a bool device scalar) holds, else ``b``: a scalar tensor on ``like``'s
    device in the precision torch's kernels use for a Python scalar with ``like`` (float64 for
    float64 and complex128, else float32), made by fill kernels: nothing is copied from the host, so
    a CUDA graph captures it. What a capturable step uses where the host step branches on a value."""
    dt = torch.float64 if like.dtype in (torch.float64, torch.complex128) else torch.float32
    return torch.where(cond, torch.full((), a, dtype=dt, device=like.device), torch.full((), b, dtype=dt, device=like.device))


def fused_ok(ps: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors: on the CPU, one dtype it supports.

    Our step counters live on the host (the hypergradient and the learned rates read them every step
    without a device sync). torch's fused CUDA kernel wants them on the GPU, so CUDA tensors take the
    foreach kernel instead, which accepts host counters (torch's own default on CUDA)."""
    return all(p.device.type == "cpu" and type(p).__name__ != "DTensor" and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               and p.dtype == ps[0].dtype for p in ps)


def contiguous_with_grad(p: torch.Tensor) -> bool:
    """Whether ``p`` and its gradient are contiguous: what a compiled kernel on their flat memory
    (:func:`flat_alias`) needs."""
    return p.is_contiguous() and (p.grad is None or p.grad.is_contiguous())


def flat_alias(x: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor on ``x``'s memory that is not a view in autograd's sense (``x`` itself when
    not contiguous). One compiled kernel then serves every shape: measured on torch 2.13, views
    made the compiled code copy a parameter that requires grad (26 vs 19 ms on 10M floats), and
    a view's guards on its base's shape recompiled the kernel without its parallel loop."""
    if not x.is_contiguous():
        return x.detach()
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(), (x.numel(),),
                                                                (1,))
