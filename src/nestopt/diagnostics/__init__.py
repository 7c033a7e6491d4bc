"""Diagnostics of a model on a batch: the research note's robustness and compressibility signals.

Each is a function of a model and a batch (inputs ``x``, labels ``y`` where needed), run under
``torch.no_grad`` in eval mode and restoring the model's mode:

- ``activation_sparsity``: fraction of activations with ``|a| < threshold`` (0.1), over the outputs
  of the activation modules (ReLU, GELU, ...), via forward hooks;
- ``weight_compressibility``: fraction of weights (tensors of 2 or more dims) with ``|w| < threshold``;
- ``pruned_accuracy``: accuracy after global magnitude pruning of those weights at given fractions
  (on a copy; the model is untouched);
- ``prediction_confidence``: mean of the largest softmax probability;
- ``class_separation``: mean over classes of ``||mu_c - mu|| / sigma_c^2`` on the penultimate
  features (``sigma_c^2`` the mean squared distance to the class mean);
- ``feature_utilization``: fraction of penultimate features whose standard deviation exceeds 0.1;
- ``gradient_norm``: global norm of the current ``.grad`` tensors.

``DiagnosticsCallback(model, x, y, every=100)`` samples all of them every ``every`` steps and
records the time it spends (``callback.seconds``), so its overhead can be reported against the
training time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._checks import check_fraction_list, check_number

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Softplus)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _threshold(threshold: float) -> float:
    return check_number("threshold", threshold, lo=0.0)


def _fractions(fractions: Any) -> tuple[float, ...]:
    return check_fraction_list("fractions", fractions, lo=0.0, hi=1.0, hi_open=True)


def _labels(y: Any, n: int) -> None:
    """``y`` must be one class index per example: shape ``(n,)`` (else ``==`` broadcasts silently)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y=<shape {shape}> is invalid: expected one class index per example, shape ({n},)")


def _magnitudes(ws: list[torch.Tensor]) -> torch.Tensor:
    if not ws:
        raise ValueError("model has no weight tensors of 2 or more dims to prune (pruned accuracy prunes those)")
    return torch.cat([w.detach().abs().flatten() for w in ws])


def activation_sparsity(model: nn.Module, x: torch.Tensor, threshold: float = 0.1) -> float:
    _threshold(threshold)
    small, total = 0, 0
    acts = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    if not acts:
        raise ValueError("model has no activation modules (nn.ReLU, nn.GELU, ...) to hook; "
                         "activation_sparsity needs them as modules, not functional calls")

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        nonlocal small, total
        small += int((out.abs() < threshold).sum())
        total += out.numel()

    handles = [m.register_forward_hook(hook) for m in acts]
    try:
        with _eval(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return small / max(total, 1)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() >= 2]


def weight_compressibility(model: nn.Module, threshold: float = 0.1) -> float:
    _threshold(threshold)
    ws = _weights(model)
    return sum(int((w.detach().abs() < threshold).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with _eval(model):
        pred = model(x).argmax(-1)
    _labels(y, pred.shape[0] if pred.dim() else 1)
    return float((pred == y).float().mean())


def pruned_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    fractions: tuple[float, ...] = (0.5, 0.8)) -> dict[float, float]:
    out = {}
    fractions = _fractions(fractions)
    mags = _magnitudes(_weights(model))
    for frac in fractions:
        pruned = copy.deepcopy(model)
        k = int(frac * mags.numel())
        cut = torch.kthvalue(mags, k).values if k > 0 else torch.tensor(-1.0)
        with torch.no_grad():
            for w in _weights(pruned):
                w.mul_((w.abs() > cut).to(w.dtype))
        out[frac] = accuracy(pruned, x, y)
    return out


def prediction_confidence(model: nn.Module, x: torch.Tensor) -> float:
    with _eval(model):
        return float(torch.softmax(model(x), -1).max(-1).values.mean())


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs of the model's last ``nn.Linear`` (flattened), captured by a forward hook."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear layer whose input could serve as its features")
    feats: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].flatten(1)))
    try:
        with _eval(model):
            model(x)
    finally:
        handle.remove()
    return feats[0]


def class_separation(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return _separation(penultimate_features(model, x), y)


def _separation(features: torch.Tensor, y: torch.Tensor) -> float:
    _labels(y, features.shape[0])
    f = features.double()
    mu = f.mean(0)
    vals = []
    for c in torch.unique(y):
        fc = f[y == c]
        if len(fc) < 2:
            continue
        mc = fc.mean(0)
        var = ((fc - mc) ** 2).sum(1).mean()
        vals.append(float((mc - mu).norm() / var.clamp_min(1e-12)))
    return sum(vals) / max(len(vals), 1)


def feature_utilization(model: nn.Module, x: torch.Tensor, threshold: float = 0.1) -> float:
    _threshold(threshold)
    f = penultimate_features(model, x)
    return float((f.std(0) > threshold).float().mean())


def gradient_norm(model: nn.Module) -> float:
    gs = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))) if gs else 0.0


def all_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.1,
                fractions: tuple[float, float] = (0.5, 0.8)) -> dict[str, float]:
    """Every diagnostic from one hooked forward pass, plus one pass per pruning fraction (pruned
    in place and restored, no copy). Same values as the separate functions, at a third of the cost."""
    _threshold(threshold)
    fractions = _fractions(fractions)
    ws = _weights(model)
    mags = _magnitudes(ws)
    acts = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    small, total = 0, 0
    feats: list[torch.Tensor] = []

    def act_hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        nonlocal small, total
        small += int((out.abs() < threshold).sum())
        total += out.numel()

    handles = [m.register_forward_hook(act_hook) for m in acts]
    if linears:
        handles.append(linears[-1].register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].flatten(1))))
    try:
        with _eval(model):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    _labels(y, logits.shape[0])
    out = {"activation_sparsity": small / total if total else float("nan"),
           "weight_compressibility": weight_compressibility(model, threshold),
           "accuracy": float((logits.argmax(-1) == y).float().mean()),
           "confidence": float(torch.softmax(logits, -1).max(-1).values.mean()),
           "gradient_norm": gradient_norm(model)}
    if feats:
        out["class_separation"] = _separation(feats[0], y)
        out["feature_utilization"] = float((feats[0].std(0) > threshold).float().mean())
    saved = [w.detach().clone() for w in ws]
    try:
        for frac in fractions:
            k = int(frac * mags.numel())
            cut = torch.kthvalue(mags, k).values if k > 0 else torch.tensor(-1.0)
            with torch.no_grad():
                for w in ws:
                    w.mul_((w.abs() > cut).to(w.dtype))
            out[f"pruned_accuracy_{round(100 * frac)}"] = accuracy(model, x, y)
            with torch.no_grad():
                for w, s in zip(ws, saved):
                    w.copy_(s)
    finally:
        with torch.no_grad():
            for w, s in zip(ws, saved):
                w.copy_(s)
    return out


class DiagnosticsCallback:
    """Every ``every`` steps, compute :func:`all_metrics` on a fixed batch; keep the history and
    the seconds spent (``seconds``) so the overhead can be measured."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, every: int = 100) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is invalid: expected a positive integer")
        self.model, self.x, self.y, self.every = model, x, y, every
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0

    def __call__(self, step: int) -> dict[str, float] | None:
        if step % self.every:
            return None
        t0 = time.perf_counter()
        m = {"step": float(step), **all_metrics(self.model, self.x, self.y)}
        self.seconds += time.perf_counter() - t0
        self.history.append(m)
        return m
