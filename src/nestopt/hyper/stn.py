"""Self-tuning networks: a best-response hypernetwork for a few scalar hyperparameters.

After MacKay, Vicol, Lorraine, Duvenaud & Grosse (2019). Each layer's weights respond linearly to the
hyperparameters: ``y = W x + b + (V x + c) * (U h)``, with ``h`` the (unconstrained) hyperparameters.
Training alternates (a) fitting the layer weights on the training loss with hyperparameters sampled
around the current ones, so the layers learn the local best response, and (b) moving the
hyperparameters (and the perturbation scale) down the validation loss *through that response*. Because
(b) differentiates the response, not the training loss, hyperparameters the training loss cannot be
differentiated in, such as a dropout rate, get gradients too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_int, check_number
from .solvers import HypergradientError

HPARAMS = ("weight_decay", "dropout")


class STLinear(nn.Module):
    """``y = W x + b + (V x + c) * (U h)``: a linear layer whose output responds to hyperparameters ``h``."""

    def __init__(self, in_features: int, out_features: int, n_hparams: int) -> None:
        super().__init__()
        self.elem = nn.Linear(in_features, out_features)
        self.hyper = nn.Linear(in_features, out_features)
        self.scale = nn.Linear(n_hparams, out_features, bias=False)
        nn.init.zeros_(self.hyper.weight)
        nn.init.zeros_(self.hyper.bias)
        nn.init.normal_(self.scale.weight, std=0.1)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.elem(x) + self.hyper(x) * self.scale(h)


class SelfTuningMLP(nn.Module):
    """An MLP of :class:`STLinear` layers with ReLU and a dropout rate that is a hyperparameter.

    ``forward(x, h, dropout=None)``: ``h`` is ``(n_hparams,)`` or ``(batch, n_hparams)``; ``dropout``
    is ``None`` (no dropout) or per-example rates ``(batch,)`` applied after every hidden layer.
    """

    def __init__(self, sizes: list[int], n_hparams: int = len(HPARAMS)) -> None:
        super().__init__()
        if not isinstance(sizes, list | tuple) or len(sizes) < 2:
            raise ValueError(f"sizes={sizes!r} is invalid: give a list of at least input and output widths")
        for i, s in enumerate(sizes):
            check_int(f"sizes[{i}]", s, lo=1)
        check_int("n_hparams", n_hparams, lo=1)
        self.layers = nn.ModuleList(STLinear(a, b, n_hparams) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor, h: torch.Tensor, dropout: torch.Tensor | None = None) -> torch.Tensor:
        if h.dim() == 1:
            h = h.expand(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x, h)
            if i + 1 < len(self.layers):
                x = F.relu(x)
                if dropout is not None:
                    keep = (1.0 - dropout).clamp_min(1e-3).unsqueeze(1)
                    x = x * torch.bernoulli(keep.expand_as(x)) / keep
        return x

    def penalty(self) -> torch.Tensor:
        """Sum of squared weights of the elementary and response parts (what weight decay scales)."""
        return sum((layer.elem.weight ** 2).sum() + (layer.hyper.weight ** 2).sum() for layer in self.layers)


class STNTrainer:
    """Alternating self-tuning-network training for weight decay and dropout rate.

    Hyperparameters live unconstrained: ``weight_decay = exp(u[0])``, ``dropout = max_dropout * sigmoid(u[1])``.
    Each :meth:`step` runs ``train_steps`` updates of the network on training batches with ``u`` sampled
    from ``N(u, sigma^2)`` per example, then ``val_steps`` updates of ``u`` and ``log sigma`` on the
    validation loss (no dropout) minus ``entropy_weight`` times the perturbation entropy.

    A non-finite training or validation loss raises :class:`~nestopt.hyper.HypergradientError` before
    its update: the network and the hyperparameters stay as they were at the last finite update.
    """

    def __init__(
        self,
        model: SelfTuningMLP,
        *,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        max_dropout: float = 0.9,
        lr: float = 3e-3,
        hyper_lr: float = 3e-2,
        sigma: float = 0.5,
        entropy_weight: float = 1e-3,
        train_steps: int = 5,
        val_steps: int = 1,
    ) -> None:
        if not isinstance(model, SelfTuningMLP):
            raise TypeError(f"model={type(model).__name__} is invalid: expected a SelfTuningMLP")
        n_h = model.layers[0].scale.in_features
        if n_h != len(HPARAMS):
            raise ValueError(f"model has n_hparams={n_h}; STNTrainer tunes {len(HPARAMS)} ({', '.join(HPARAMS)}): "
                             f"build it with SelfTuningMLP(sizes, n_hparams={len(HPARAMS)})")
        check_number("weight_decay", weight_decay, lo=0.0, lo_open=True)
        self.max_dropout = check_number("max_dropout", max_dropout, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number("dropout", dropout, lo=0.0, hi=max_dropout, lo_open=True, hi_open=True)
        check_number("sigma", sigma, lo=0.0, lo_open=True)
        self.entropy_weight = check_number("entropy_weight", entropy_weight, lo=0.0)
        self.train_steps = check_int("train_steps", train_steps, lo=1)
        self.val_steps = check_int("val_steps", val_steps, lo=1)
        self.model = model
        p = dropout / max_dropout
        dev = next(model.parameters()).device
        self.u = torch.tensor([math.log(weight_decay), math.log(p / (1 - p))], device=dev, requires_grad=True)
        self.log_sigma = torch.full((2,), math.log(sigma), device=dev, requires_grad=True)
        self.opt = torch.optim.Adam(model.parameters(), lr=check_number("lr", lr, lo=0.0, lo_open=True))
        self.hyper_opt = torch.optim.Adam([self.u, self.log_sigma],
                                          lr=check_number("hyper_lr", hyper_lr, lo=0.0, lo_open=True))
        self.history: list[dict[str, float]] = []

    def constrained(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight_decay, dropout)`` for unconstrained ``u`` (last dim 2)."""
        return u[..., 0].exp(), self.max_dropout * torch.sigmoid(u[..., 1])

    @property
    def hparams(self) -> dict[str, float]:
        wd, dp = self.constrained(self.u.detach())
        return {"weight_decay": float(wd), "dropout": float(dp)}

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            u = self.u + self.log_sigma.exp() * torch.randn(x.shape[0], 2, device=x.device)
            wd, dp = self.constrained(u)
        out = self.model(x, u, dropout=dp)
        n = x.shape[0]
        loss = F.cross_entropy(out, y) + wd.mean() * self.model.penalty() / n
        value = _finite(loss, "training")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return value

    def _val_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        u = self.u + self.log_sigma.exp() * torch.randn(x.shape[0], 2, device=x.device)
        loss = F.cross_entropy(self.model(x, u), y)
        entropy = self.log_sigma.sum()  # Gaussian entropy up to a constant
        objective = loss - self.entropy_weight * entropy
        value = _finite(loss, "validation")
        _finite(objective, "validation objective")
        self.hyper_opt.zero_grad(set_to_none=True)
        objective.backward()
        self.hyper_opt.step()
        return value

    def step(self, train_batch: tuple[torch.Tensor, torch.Tensor],
             val_batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """``train_steps`` network updates on ``train_batch`` then ``val_steps`` hyperparameter updates."""
        for _ in range(self.train_steps):
            train_loss = self._train_step(*train_batch)
        for _ in range(self.val_steps):
            val_loss = self._val_step(*val_batch)
        record = {"train_loss": train_loss, "val_loss": val_loss, **self.hparams}
        self.history.append(record)
        return record

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the current hyperparameters, without dropout."""
        with torch.no_grad():
            return self.model(x, self.u.detach())


def _finite(loss: torch.Tensor, what: str) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise HypergradientError(f"STNTrainer: the {what} loss is {value} (check the batch for non-finite values, or "
                                 "lower lr / hyper_lr); this update was not applied")
    return value
