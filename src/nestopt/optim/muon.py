r"""Muon on the hidden matrices, AdamW on the rest: the split people train with, as one optimizer.

Muon (Jordan et al. 2024; "Muon is scalable for LLM training", Liu et al. 2025) orthogonalises
the momentum of a weight matrix with a few Newton-Schulz iterations before it steps. It is only
defined for matrices, and practice keeps embeddings, output heads, biases and norm gains on
AdamW. torch ships the matrix half (``torch.optim.Muon``, since 2.9); :class:`MuonAdamW` runs
torch's Muon kernel on the groups marked ``muon=True`` and torch's AdamW kernel on the others,
so a user has one optimizer: one ``state_dict``, one scheduler, one ``zero_grad``.

**The split** (:func:`muon_param_groups`). A parameter goes to Muon when all of these hold:

1. it is 2-D (torch's Muon refuses anything else, so convolution kernels stay on AdamW: torch
   does not flatten them, and neither do we);
2. it does not belong to an ``nn.Embedding`` or ``nn.EmbeddingBag``, and no part of its name
   contains ``"embed"`` (positional tables kept as bare parameters: ``pos_embed``);
3. it is not the output head: by default the weight of the *last* ``nn.Linear`` in
   ``model.modules()`` order (``head="auto"``); ``head="name"`` names it (a parameter-name prefix,
   such as ``"lm_head"``), ``head=None`` keeps every linear layer on Muon. A weight tied to an
   embedding stays on AdamW by rule 2.

Everything else (biases, norm gains, 1-D and scalar tensors, convolution kernels, embeddings,
the head) goes to AdamW. :func:`split_names` lists which parameter went where.

**Bare parameters.** A group without a ``"muon"`` key (``MuonAdamW(model.parameters())``) cannot
tell a head or an embedding from a hidden matrix: each of its 2-D tensors is stepped by Muon and
the rest by AdamW. Pass ``muon_param_groups(model)`` to keep embeddings and heads on AdamW.

**One learning rate.** By default the Muon half scales its rate by torch's ``"match_rms_adamw"``
rule (``0.2 * sqrt(max(A, B))``, Liu et al. 2025), which gives its update the RMS of an AdamW
update, so both halves share one ``lr`` and one ``weight_decay`` and one grid tunes them.
``adjust_lr_fn="original"`` is Keller Jordan's ``sqrt(max(1, A/B))`` (its rates are about 20x
AdamW's: 0.02 against 1e-3).

Exactness: the matrices step bitwise as ``torch.optim.Muon(..., adjust_lr_fn=...)`` and the rest
bitwise as ``torch.optim.AdamW(..., fused=...)`` with the same values (a test checks both). As in
torch, a NaN gradient reaches the parameters (guard the step: :mod:`nestopt.guards`).

Usage::

    opt = MuonAdamW(muon_param_groups(model), lr=1e-3, weight_decay=0.01)
    loss.backward(); opt.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim._muon import muon as _muon_kernel  # the kernel behind torch.optim.Muon.step
from torch.optim.adam import adam as _adam_kernel  # the kernel behind torch.optim.AdamW.step

from .._checks import check_choice, check_int, check_number
from .distributed import check_process_group, refuse_sharded

ADJUST_LR = ("match_rms_adamw", "original")


def _is_embedding_name(name: str) -> bool:
    return any("embed" in part.lower() for part in name.split("."))


def split_names(model: nn.Module, head: str | None = "auto") -> dict[str, list[str]]:
    """``{"muon": [...], "adamw": [...]}``: the model's trainable parameter names on each side of
    the split (the module docstring states the rule), in ``named_parameters`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r} is invalid: expected an nn.Module")
    if head is not None and not isinstance(head, str):
        raise TypeError(f"head={head!r} is invalid: expected 'auto', a parameter-name prefix, or None")
    embedded = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                for p in m.parameters(recurse=False)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head_ids = {id(linears[-1].weight)} if head == "auto" and linears else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head not in (None, "auto"):
        head_ids = {id(p) for n, p in named if n == head or n.startswith(head + ".")}
        if not head_ids:
            raise ValueError(f"head={head!r} is invalid: no parameter name starts with it; names: "
                             f"{', '.join(n for n, _ in named[:12])}{' ...' if len(named) > 12 else ''}")
    out: dict[str, list[str]] = {"muon": [], "adamw": []}
    for n, p in named:
        hidden = p.ndim == 2 and id(p) not in embedded and not _is_embedding_name(n) and id(p) not in head_ids
        out["muon" if hidden else "adamw"].append(n)
    return out


def muon_param_groups(model: nn.Module, head: str | None = "auto", **group: Any) -> list[dict[str, Any]]:
    """Two param groups for :class:`MuonAdamW`: the hidden matrices (``muon=True``) and the rest
    (``muon=False``); ``group`` adds values to both (``lr=...``). An empty side is left out."""
    names = split_names(model, head)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in names[side]], "muon": side == "muon", **group}
              for side in ("muon", "adamw")]
    return [g for g in groups if g["params"]]


class MuonAdamW(Optimizer):
    """torch's Muon on the groups with ``muon=True``, torch's AdamW on those with ``muon=False``;
    a group without the key splits its tensors by shape (2-D: Muon). See the module docstring.

    Args:
        params: parameters or param groups, best :func:`muon_param_groups(model) <muon_param_groups>`.
        lr: the rate of both halves (Muon's scaled by ``adjust_lr_fn``).
        weight_decay: decoupled weight decay of both halves (``p *= 1 - lr * wd``).
        momentum, nesterov, ns_coefficients, ns_steps, ns_eps: Muon's (torch's defaults).
        betas, eps: AdamW's (torch's defaults).
        adjust_lr_fn: ``"match_rms_adamw"`` (default: one rate for both) or ``"original"``.
        fused: AdamW's fused kernel (float parameters on CPU or CUDA).
        process_group: accepted as every nestopt optimizer accepts it; nothing of the step is
            rank-local, so DDP needs no sync. Under FSDP2 the Muon half raises (it orthogonalises
            whole matrices), the AdamW half is elementwise.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, *,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315), ns_steps: int = 5,
                 ns_eps: float = 1e-7, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adjust_lr_fn: str = "match_rms_adamw", fused: bool = False, process_group: Any = "auto") -> None:
        # nothing of its step comes from a rank's own batch, so there is nothing to sync under
        # DDP; the argument is taken as every nestopt optimizer takes it
        self.process_group = check_process_group(process_group)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, ns_eps=ns_eps,
                        betas=tuple(betas), eps=eps, adjust_lr_fn=adjust_lr_fn, fused=fused)
        _check_values(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("muon", None)
        try:
            _check_values(group, where)
            if group["muon"] not in (True, False, None):
                raise ValueError(f"{where}['muon']={group['muon']!r} is invalid: expected True (Muon), False "
                                 "(AdamW) or no key (2-D tensors to Muon)")
            for j, p in enumerate(group["params"]):
                if p.is_complex() or not p.is_floating_point():
                    raise ValueError(f"{where}['params'][{j}] has dtype {p.dtype}, which MuonAdamW does not "
                                     "support: torch's Muon takes real floating-point matrices")
                if group["muon"] is True and p.ndim != 2:
                    raise ValueError(f"{where}['params'][{j}] has shape {tuple(p.shape)}, which Muon cannot step "
                                     "(it takes 2-D matrices): put it in a group with muon=False, or build the "
                                     "groups with muon_param_groups(model)")
        except ValueError:
            self.param_groups.pop()
            raise

    def telemetry(self) -> dict[str, float]:
        """Each group's ``lr`` (``lr/i`` where there are several), as every nestopt optimizer's
        ``telemetry()`` names it; nothing else of Muon's changes by itself."""
        lrs = [float(g["lr"]) for g in self.param_groups]
        return {"lr": lrs[0]} if len(lrs) == 1 else {f"lr/{i}": v for i, v in enumerate(lrs)}

    def _uses_muon(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return p.ndim == 2 if group["muon"] is None else bool(group["muon"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            _check_values(group, f"param_groups[{i}]")
            m_params, m_grads, m_bufs = [], [], []
            a_params, a_grads, a_avg, a_sq, a_steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MuonAdamW does not support sparse gradients: use dense ones")
                state = self.state[p]
                if self._uses_muon(group, p):
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                    m_params.append(p)
                    m_grads.append(p.grad)
                    m_bufs.append(state["momentum_buffer"])
                    continue
                if "step" not in state:  # AdamW's lazy state, as torch lays it out
                    state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group["fused"]
                                     else torch.tensor(0.0, dtype=torch.get_default_dtype()))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                a_params.append(p)
                a_grads.append(p.grad)
                a_avg.append(state["exp_avg"])
                a_sq.append(state["exp_avg_sq"])
                a_steps.append(state["step"])
            if m_params:
                refuse_sharded(self, m_params, "on its Muon matrices (Newton-Schulz needs each whole matrix)")
                _muon_kernel(m_params, m_grads, m_bufs, lr=group["lr"], weight_decay=group["weight_decay"],
                             momentum=group["momentum"], nesterov=group["nesterov"],
                             ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"],
                             eps=group["ns_eps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)
            if a_params:
                beta1, beta2 = group["betas"]
                _adam_kernel(a_params, a_grads, a_avg, a_sq, [], a_steps, foreach=None, fused=group["fused"] or None,
                             decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                             maximize=False, has_complex=False)
        return loss


def _check_values(group: dict[str, Any], where: str) -> None:
    """Each hyperparameter of a group (or of the constructor's defaults: ``where`` empty)."""
    def name(key: str) -> str:
        return f"{where}[{key!r}]" if where else key

    if not torch.is_tensor(group["lr"]):
        check_number(name("lr"), group["lr"], lo=0.0)
    check_number(name("weight_decay"), group["weight_decay"], lo=0.0)
    check_number(name("momentum"), group["momentum"], lo=0.0, hi=1.0, hi_open=True)
    check_number(name("ns_eps"), group["ns_eps"], lo=0.0, lo_open=True)
    check_number(name("eps"), group["eps"], lo=0.0)
    check_int(name("ns_steps"), group["ns_steps"], lo=1)
    check_choice(name("adjust_lr_fn"), group["adjust_lr_fn"], ADJUST_LR)
    for key in ("nesterov", "fused"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{name(key)}={group[key]!r} is invalid: expected True or False")
    betas, coeffs = group["betas"], group["ns_coefficients"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name('betas')}={betas!r} is invalid: expected two numbers in [0, 1)")
    for j, b in enumerate(betas):
        check_number(f"{name('betas')}[{j}]", b, lo=0.0, hi=1.0, hi_open=True)
    if not isinstance(coeffs, (tuple, list)) or len(coeffs) != 3:
        raise ValueError(f"{name('ns_coefficients')}={coeffs!r} is invalid: expected three numbers (a, b, c)")
    for j, c in enumerate(coeffs):
        check_number(f"{name('ns_coefficients')}[{j}]", c)
