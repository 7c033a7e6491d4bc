"""Losses for learning with noisy labels: JAL, the joint asymmetric loss (Wang et al. 2025, ICCV).

JAL is an active-passive loss (APL): an *active* term that raises the probability of the labelled
class, normalised cross-entropy (NCE), joined to a *passive* term that is asymmetric, AMSE, the
asymmetric mean square error. With ``p = softmax(logits)`` over ``K`` classes and label ``y``:

    NCE(p, y)  = -log p_y / sum_k (-log p_k)
    AMSE(p, y) = (1 / K) * || a e_y - p ||_2^2 ,    a >= 1
    JAL(p, y)  = alpha * NCE(p, y) + beta * AMSE(p, y)

(the official code calls this combination ``NCEandAMSE``, "JAL-CE"). AMSE is *asymmetric* for
class weights ``w`` (the clean-label probabilities of an example, ``w_m`` the largest and ``w_(2)``
the second largest): the minimiser over the simplex of ``sum_i w_i AMSE(p, i)`` is the one-hot
``e_m`` exactly when

    a >= (sum_i w_i) / (w_m - w_(2)) ,

since that sum is ``W ||p||^2 - 2a w.p + const``, minimised by projecting ``a w / W`` onto the
simplex, which lands on ``e_m`` iff ``a (w_m - w_i) / W >= 1`` for every ``i != m``. Under
symmetric noise at rate ``eta`` this reads ``a >= 1 / (1 - eta - eta / (K - 1))``
(:func:`amse_min_a`): a loss that meets it has the clean-label minimiser on noisy labels.
Binary logits (one per example) are read as the two classes ``(0, z)``.

    >>> import torch
    >>> from nestopt.losses import jal_loss
    >>> logits, labels = torch.tensor([[2.0, -1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    >>> round(float(jal_loss(logits, labels, a=5.0)), 4)
    8.7742
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import check_number

__all__ = ["JALLoss", "amse_loss", "amse_min_a", "jal_loss", "nce_loss"]


def _two_class(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"logits and target are invalid: expected two tensors, got {type(logits).__name__} and "
                        f"{type(target).__name__}")
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1 and target.dim() == 2):
        z = logits.reshape(-1, 1)  # binary: one logit per example, target 0/1 of the same count
        logits, target = torch.cat([torch.zeros_like(z), z], dim=1), target.reshape(-1)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)} are invalid: expected (batch, classes >= 2) or "
                         "(batch,) binary logits")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target of shape {tuple(target.shape)} is invalid: expected ({logits.shape[0]},), one "
                         "label per example")
    if target.is_floating_point():
        if not torch.all((target == 0) | (target == 1)):
            raise ValueError("target is invalid: float targets must be 0 or 1 (binary labels)")
        target = target.long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(f"target is invalid: labels must lie in [0, {logits.shape[1] - 1}]")
    return logits, target.long()


def nce_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Normalised cross-entropy ``-log p_y / sum_k -log p_k`` (Ma et al. 2020), in ``[0, 1]``."""
    logits, target = _two_class(logits, target)
    logp = F.log_softmax(logits.float(), dim=1)
    out = -logp.gather(1, target[:, None]).squeeze(1) / (-logp).sum(1).clamp_min(1e-12)
    return _reduce(out, reduction)


def amse_loss(logits: torch.Tensor, target: torch.Tensor, a: float = 5.0, reduction: str = "mean") -> torch.Tensor:
    """Asymmetric mean square error ``||a e_y - p||^2 / K``; asymmetric when ``a`` meets :func:`amse_min_a`."""
    check_number("a", a, lo=1.0)
    logits, target = _two_class(logits, target)
    p = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, logits.shape[1]).to(p.dtype)
    out = (a * onehot - p).pow(2).sum(1) / logits.shape[1]
    return _reduce(out, reduction)


def jal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, beta: float = 1.0, a: float = 5.0,
             reduction: str = "mean") -> torch.Tensor:
    """``alpha * NCE + beta * AMSE`` (JAL-CE); see the module docstring."""
    check_number("alpha", alpha, lo=0.0)
    check_number("beta", beta, lo=0.0)
    if alpha == 0 and beta == 0:
        raise ValueError("alpha=0 and beta=0 are invalid: at least one term must have a positive weight")
    return alpha * nce_loss(logits, target, reduction) + beta * amse_loss(logits, target, a, reduction)


def amse_min_a(noise_rate: float, num_classes: int = 2) -> float:
    """The smallest ``a`` for which AMSE is asymmetric under symmetric label noise at ``noise_rate``:
    ``1 / (1 - eta - eta / (K - 1))`` (``ValueError`` where the noise leaves the clean class no
    longer the most likely one, and no ``a`` works)."""
    check_number("noise_rate", noise_rate, lo=0.0, hi=1.0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid: expected an integer >= 2")
    gap = 1.0 - noise_rate - noise_rate / (num_classes - 1)
    if gap <= 0:
        raise ValueError(f"noise_rate={noise_rate!r} is invalid: with {num_classes} classes the clean label must "
                         f"stay the most likely (noise_rate < {(num_classes - 1) / num_classes:g})")
    return max(1.0, 1.0 / gap)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction={reduction!r} is invalid: expected one of mean, sum, none")


class JALLoss(nn.Module):
    """:func:`jal_loss` as a module: ``JALLoss(alpha=1.0, beta=1.0, a=5.0)(logits, target)``."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, a: float = 5.0, reduction: str = "mean") -> None:
        super().__init__()
        check_number("alpha", alpha, lo=0.0)
        check_number("beta", beta, lo=0.0)
        check_number("a", a, lo=1.0)
        if alpha == 0 and beta == 0:
            raise ValueError("alpha=0 and beta=0 are invalid: at least one term must have a positive weight")
        _reduce(torch.zeros(1), reduction)
        self.alpha, self.beta, self.a, self.reduction = float(alpha), float(beta), float(a), reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return jal_loss(logits, target, self.alpha, self.beta, self.a, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:g}, a={self.a:g}"

