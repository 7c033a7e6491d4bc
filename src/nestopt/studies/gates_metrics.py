r"""What the logic-gates study measures on a recorded run: rises, spikes, per-layer gradient norms,
their spread and shares, and the coupling statistic of the Polyak note.

Pure functions of recorded sequences (losses, per-layer norms); :mod:`.polyak_gates` runs the
optimizers and calls them.

**What is measured** (per run; ``L_t`` is the training loss at iterate ``t``, ``t = 0..T``, and
``g_t`` its gradient; train and validation are the same full table, so ``L_T`` is the final loss):

- *per-layer gradient norms* ``n_l(t) = sqrt(sum over the layer's tensors of ||g_p||^2)`` for the
  layers ``embed``, ``attn1`` (nearest the input) ... ``attn<depth>``, ``readout``
  (:func:`nestopt.tasks.logic_gates.layer_of`), and their shares ``s_l(t) = n_l^2 / ||g_t||^2``;
- the *spread* ``max_l n_l(t) / min_l n_l(t)``, in orders of magnitude (``log10``): at init
  (``t = 0``) and its median over the steps whose norms are finite and positive;
- *zig-zags*: the steps whose loss rose, by the definition of the note's experiments (a rise by
  more than a relative ``1e-9`` while above the float32 precision floor ``1e-10``), read from
  :func:`nestopt.studies.polyak_experiments.measure` itself (:func:`rises`), so there is one
  definition; *spikes*, the zig-zags by more than :data:`SPIKE` (10%), which tell a visible
  zig-zag from tiny ripples; and the largest rise (``L_{t+1} / L_t``);
- the *coupling statistic* (the note's steps 2-5): the dominant layer ``D`` (largest median
  share), the fall of its share into each step ``c_t = s_D(t-1) - s_D(t)``, and the Pearson
  correlation between ``c_t`` and the rise indicator of step ``t`` (``L_{t+1} > L_t``), with the
  fraction of rises that follow a fall (``c_t > 0``); and, read as the global rule's step
  ``eta_t = L_t / ||g_t||^2`` (the note's step 4), the median jump ``log10(eta_t / eta_{t-1})``
  and the median ``log10 eta_t`` at rises and elsewhere, with the median loss ``L_t`` before a rise;
- final loss, final accuracy, whether the task's ``target`` is met, and the step at which a
  Polyak run got stuck (a skipped step, after which nothing changes: :func:`run_one`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..tasks.logic_gates import layer_of
from .polyak_experiments import Experiment, Run, measure

SPIKE = 0.1  # a spike: the loss rose by more than 10% in one step
DTYPE = "float32"


def _unused(_: list[torch.Tensor]) -> torch.Tensor:
    raise RuntimeError("the logic-gates runs are measured from their recorded losses only")


_GATES = Experiment("logic-gates", "logic gates, polynomial attention", [], [], _unused, 0)


def loss_metrics(losses: Sequence[float], dtype: str = DTYPE) -> dict[str, Any]:
    """:func:`~nestopt.studies.polyak_experiments.measure` on a recorded loss curve: ``final_loss``,
    ``zigzags`` (the rises, by the note experiments' definition), ``max_rise``, ``steps_to_1e-6``."""
    return measure(_GATES, Run(_GATES.key, "", dtype, [float(x) for x in losses], [], []))


def rises(losses: Sequence[float], dtype: str = DTYPE) -> list[bool]:
    """Whether step ``t`` raised the loss (``L_{t+1}`` against ``L_t``), for ``t = 0..len - 2``:
    :func:`loss_metrics` on each consecutive pair, so the definition is ``measure``'s own."""
    return [loss_metrics(losses[t:t + 2], dtype)["zigzags"] == 1 for t in range(len(losses) - 1)]


def spikes(losses: Sequence[float], factor: float = SPIKE, dtype: str = DTYPE) -> int:
    """The rises (:func:`rises`) by more than ``factor`` (relative): the visible part of the zig-zag."""
    up = rises(losses, dtype)
    return sum(1 for t, u in enumerate(up) if u and losses[t + 1] > losses[t] * (1 + factor))


def layer_names(model: torch.nn.Module) -> list[str]:
    """The model's layers in order of first appearance in ``named_parameters()``."""
    return list(dict.fromkeys(layer_of(n) for n, _ in model.named_parameters()))


def layer_grad_norms(named_grads: Sequence[tuple[str, torch.Tensor | None]], layers: Sequence[str]) -> list[float]:
    """``sqrt(sum ||g_p||^2)`` over each layer's tensors (a missing gradient counts 0), in the
    order of ``layers``."""
    sq = dict.fromkeys(layers, 0.0)
    for name, g in named_grads:
        if g is not None:
            sq[layer_of(name)] += float(g.detach().to(torch.float64).pow(2).sum())
    return [math.sqrt(sq[name]) for name in layers]


def _valid(norms: np.ndarray) -> np.ndarray:
    return np.isfinite(norms).all(axis=1) & (norms > 0).all(axis=1)


def spread_stats(norms: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``log10(max_l n_l / min_l n_l)`` at the first row (``init``; ``None`` if not finite and
    positive) and its median over the rows that are (``median``), and how many rows that is."""
    n = np.asarray(norms, dtype=float).reshape(len(norms), -1)
    ok = _valid(n)
    logs = np.full(len(n), np.nan)
    logs[ok] = np.log10(n[ok].max(axis=1) / n[ok].min(axis=1))
    return {"init": float(logs[0]) if len(n) and ok[0] else None,
            "median": float(np.median(logs[ok])) if ok.any() else None,
            "steps": int(ok.sum()), "series": logs}


def shares(norms: Sequence[Sequence[float]]) -> np.ndarray:
    """``n_l^2 / sum_l n_l^2`` per row (``NaN`` rows where the norms are not finite and positive)."""
    n = np.asarray(norms, dtype=float).reshape(len(norms), -1)
    out = np.full(n.shape, np.nan)
    ok = _valid(n)
    sq = n[ok] ** 2
    out[ok] = sq / sq.sum(axis=1, keepdims=True)
    return out


def coupling(losses: Sequence[float], norms: Sequence[Sequence[float]], layers: Sequence[str],
             dtype: str = DTYPE) -> dict[str, Any]:
    """The coupling statistic (module docstring): the dominant layer, ``corr(c_t, rise_t)``, the
    fraction of rises after a fall of its share, and the shared step's jump at rises and elsewhere.
    ``losses`` has one more entry than ``norms`` (the loss after the last step)."""
    s = shares(norms)
    ok = np.isfinite(s).all(axis=1)
    if not ok.any():
        return {"dominant": None, "corr": None, "frac_after_fall": None, "rises_used": 0,
                "eta_jump_at_rises": None, "eta_jump_elsewhere": None, "eta_at_rises": None, "eta_elsewhere": None,
                "loss_before_rises": None, "median_shares": None}
    med = np.median(s[ok], axis=0)
    d = int(np.argmax(med))
    up = np.asarray(rises(losses, dtype), dtype=bool)  # up[t]: step t raised the loss
    t = np.arange(1, len(s))
    use = t[ok[t] & ok[t - 1]]
    fall = s[use - 1, d] - s[use, d]
    u = up[use].astype(float)
    corr = None
    if len(use) > 2 and u.std() > 0 and fall.std() > 0:
        corr = float(np.corrcoef(fall, u)[0, 1])
    n_up = int(u.sum())
    frac = float((fall[u == 1] > 0).mean()) if n_up else None
    n = np.asarray(norms, dtype=float)
    loss = np.asarray(losses[:len(n)], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = loss / (n ** 2).sum(axis=1)
        jump = np.log10(eta[use] / eta[use - 1])
    good = np.isfinite(jump)

    def med_of(mask: np.ndarray) -> float | None:
        m = mask & good
        return float(np.median(jump[m])) if m.any() else None

    with np.errstate(divide="ignore", invalid="ignore"):
        log_eta = np.log10(eta[use])
    fine = np.isfinite(log_eta)
    at = (u == 1) & fine
    return {"dominant": layers[d], "corr": corr, "frac_after_fall": frac, "rises_used": n_up,
            "eta_jump_at_rises": med_of(u == 1), "eta_jump_elsewhere": med_of(u == 0),
            "eta_at_rises": float(np.median(log_eta[at])) if at.any() else None,
            "eta_elsewhere": float(np.median(log_eta[(u == 0) & fine])) if ((u == 0) & fine).any() else None,
            "loss_before_rises": float(np.median(loss[use][u == 1])) if n_up else None,
            "median_shares": {name: float(v) for name, v in zip(layers, med)}}
