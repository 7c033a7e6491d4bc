"""The nested optimizer's capturable step (``capturable=True``, the default for CUDA parameters):
the frozen controller's whole step as batched device operations over the groups, with no host
read.

What the host step keeps as Python floats and NumPy arrays (the loss tracker, the running
feature normaliser, the sampled parameter statistics, the multipliers, the scratchpad memory and
the last features) lives here as float64 tensors on the parameters' device, made from the host
values at the first capturable step (:func:`device_state`) and written back when someone reads
them (:func:`flush`: ``opt.counters``, ``state_dict()``, ``telemetry()``, ``multipliers()``,
``copy.deepcopy``, ``pickle``). Every decision the host step branches on is a device mask
instead:

- a non-finite gradient or loss: nothing changes (the state updates are selected away and the
  base optimizer's kernel gets ``found_inf``, as ``GradScaler`` hands it), counted ``nonfinite``;
- a non-finite feature or controller output: the multipliers stay, the base steps with them,
  counted ``controller_skipped`` (and ``steps``);
- the sampled statistics every ``stats_every`` steps: sampled at every step (about 1024 elements
  per tensor) and kept only on the steps where the host step samples.

The controller is the host step's network evaluated by torch in float64 (the host step uses
NumPy), so the two paths agree to rounding, not bitwise. What it needs: signal ``"frozen"`` (the
other signals train the controller from host-side replays and rewards), the built-in features
other than ``"curvature"``, and a base whose step takes ``found_inf`` (torch's fused kernels:
``AdamW(fused=True)``, ``Adam(fused=True)``, ``SGD(fused=True)``), with a tensor learning rate.
To capture the step in a CUDA graph, give the base ``capturable=True`` too (torch's check).

``torch.compile(opt.step, fullgraph=True)`` cannot hold this step: torch's own ``Optimizer.step``
breaks the graph on purpose (its no-grad wrapper) and torch does not trace its fused kernels
(``torch.compiler.disable``). Compiled without ``fullgraph``, the nested work compiles and the
base's step runs eagerly between the graphs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..distributed import sample_view
from ..tensors import device_sq_norms
from ..transaction import commit, enter
from .features import TINY
from .wrapper import call_step

if TYPE_CHECKING:
    from .optimizer import NestedOptimizer

_DEVICE_FEATURES = ("grad_norm", "param_norm", "depth", "update_ratio", "loss", "val", "mult")
_SAMPLE = 1024
KEY = "_device_state"


def check(opt: NestedOptimizer) -> None:
    """A clear error where the capturable step cannot run (module docstring)."""
    name = "NestedOptimizer(capturable=True)"
    if opt.signal != "frozen":
        raise ValueError(f"{name} is invalid with signal={opt.signal!r}: only signal='frozen' runs on the device "
                         "(the others train the controller from host-side replays); use capturable=False")
    bad = [f.name for f in opt.features if f.name not in _DEVICE_FEATURES]
    if bad:
        raise ValueError(f"{name} is invalid with features {bad}: the capturable step computes "
                         f"{', '.join(_DEVICE_FEATURES)}; use capturable=False")
    if not opt.base.defaults.get("fused"):
        raise ValueError(f"{name} is invalid with base={type(opt.base).__name__} without fused=True: a skipped step "
                         "is masked by the fused kernel's found_inf; pass fused=True (AdamW, Adam, SGD)")


def device_state(opt: NestedOptimizer, dev: torch.device) -> dict[str, torch.Tensor]:
    """The host state as device tensors (made once, then updated in place by each step)."""
    st = opt.__dict__.get(KEY)
    G = len(opt.param_groups)
    if st is not None and st["mult"].device == dev and st["mult"].numel() == G:
        return st
    if st is not None:
        flush(opt)

    def f64(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dev)

    lt = opt.loss_tracker
    nan = float("nan")
    st = {
        # prev, ema (NaN: none yet), dloss_ema, dl
        "loss": f64([nan if lt.prev is None else lt.prev, nan if lt.ema is None else lt.ema, lt.dloss_ema, lt.dl]),
        "val": f64([opt._val["delta"], opt._val["gap"], opt._val["dev"]]),
        "mean": f64(opt.norm.mean), "sq": f64(opt.norm.sq), "count": f64(float(opt.norm.count)),
        "param_rms": f64(opt._param_rms), "update_ratio": f64(opt._update_ratio),
        "mult": f64([g["nested_mult"] for g in opt.param_groups]),
        "memory": opt.memory.to(dev, torch.float64).clone(),
        "last": f64(opt.last_features),
        "raw": f64(np.zeros((G, max(opt.controller.n_features, 1)))),
        "steps": torch.tensor(opt.steps, dtype=torch.int64).to(dev),
        "depth": f64([float(g.get("depth", i / max(G - 1, 1))) for i, g in enumerate(opt.param_groups)]),
    }
    opt.__dict__[KEY] = st
    return st


def flush(opt: NestedOptimizer) -> None:
    """Write the device state back into the host's floats and arrays (one read of each)."""
    st = opt.__dict__.get(KEY)
    if st is None:
        return
    prev, ema, dloss_ema, dl = st["loss"].tolist()
    lt = opt.loss_tracker
    lt.prev = None if math.isnan(prev) else prev
    lt.ema = None if math.isnan(ema) else ema
    lt.dloss_ema, lt.dl = dloss_ema, dl
    opt.norm.mean = st["mean"].cpu().numpy().copy()
    opt.norm.sq = st["sq"].cpu().numpy().copy()
    opt.norm.count = int(st["count"].item())
    opt._param_rms = st["param_rms"].tolist()
    opt._update_ratio = st["update_ratio"].tolist()
    for g, m in zip(opt.param_groups, st["mult"].tolist()):
        g["nested_mult"] = m
    opt.memory = st["memory"].float().cpu()
    opt.last_features = st["last"].cpu().numpy().copy()
    raw = st["raw"].cpu().numpy()
    col = 0
    opt.last_raw = {}
    for f in opt.features:
        opt.last_raw[f.name] = raw[:, col].tolist()
        col += f.width


def _controller(opt: NestedOptimizer, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The controller's layers as float64 ``(W^T, b)`` on ``dev``, re-made when a weight changes."""
    cached = opt.__dict__.get("_device_controller")
    if cached is not None and torch.compiler.is_compiling():
        return cached[1]  # (a compiled step uses the weights its eager warm-up step read: frozen)
    c = opt.controller
    mods = ([c.memory] if c.memory is not None else []) + [c.net[0], c.net[2], c.net[4]]
    tensors = [t for m in mods for t in (m.weight, m.bias)]
    version = (dev, *((id(t), t._version, t.data_ptr()) for t in tensors))
    if cached is None or cached[0] != version:
        layers = [(m.weight.detach().to(dev, torch.float64).T.contiguous(), m.bias.detach().to(dev, torch.float64))
                  for m in mods]
        cached = opt.__dict__["_device_controller"] = (version, layers)
    return cached[1]


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=TINY))


def step(opt: NestedOptimizer, loss: Any) -> None:
    """One capturable step (see the module docstring); ``loss`` a tensor, a number or ``None``."""
    groups = opt.param_groups
    have = [[p for p in g["params"] if p.grad is not None] for g in groups]
    pflat = [p for ps in have for p in ps]
    grads = [p.grad for p in pflat]
    dev = grads[0].device
    st = device_state(opt, dev)
    G = len(groups)
    # the one read of the gradients, in reverse (the base then starts on those read last)
    gsq = device_sq_norms(grads[::-1]).flip(0)
    ok = torch.isfinite(gsq).all()
    lv = None
    if loss is not None:
        lv = loss.detach().reshape(()).to(dev, torch.float64) if torch.is_tensor(loss) else \
            torch.full((), float(loss), dtype=torch.float64, device=dev)
        ok = ok & torch.isfinite(lv)
    enter(opt, "the features")
    sizes = [len(ps) for ps in have]
    bounds = np.cumsum([0, *sizes]).tolist()
    numel = [sum(p.numel() for p in ps) for ps in have]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    g_rms = torch.stack([torch.sqrt(gsq[a:b].sum() / c) if c else zero for a, b, c in zip(bounds, bounds[1:], numel)])
    # the loss tracker (LossTracker.observe), kept only where the step is taken
    old = st["loss"]
    if lv is None:
        new_loss = torch.stack([old[0], old[1], old[2], zero])
    else:
        prev, ema, dloss_ema = old[0], old[1], old[2]
        scale = torch.clamp(torch.where(torch.isnan(ema), lv, ema).abs(), min=1e-12)
        dl = torch.where(torch.isnan(prev), zero, (lv - prev) / scale)
        new_ema = torch.where(torch.isnan(ema), lv, 0.95 * ema + 0.05 * lv)
        new_loss = torch.stack([lv, new_ema, 0.9 * dloss_ema + 0.1 * dl, dl])
    mult_scale = max(-opt.range.log_lo, opt.range.log_hi)
    cols: list[torch.Tensor] = []
    for f in opt.features:
        if f.name == "grad_norm":
            cols.append(_log(g_rms)[:, None])
        elif f.name == "param_norm":
            cols.append(_log(st["param_rms"])[:, None])
        elif f.name == "depth":
            cols.append(st["depth"][:, None])
        elif f.name == "update_ratio":
            cols.append(_log(st["update_ratio"])[:, None])
        elif f.name == "loss":
            cols.append(torch.stack([new_loss[3], new_loss[2]]).expand(G, 2))
        elif f.name == "val":
            cols.append(st["val"].expand(G, 3))
        elif f.name == "mult":
            cols.append((torch.log(st["mult"]) / mult_scale)[:, None])
    x_raw = torch.cat(cols, dim=1) if cols else torch.zeros((G, 1), dtype=torch.float64, device=dev)
    x_ok = torch.isfinite(x_raw).all()
    # the running standardisation (RunningNorm.__call__), kept where the features were finite
    b = opt.norm.beta
    count = st["count"] + 1
    s, q = x_raw.sum(0), (x_raw * x_raw).sum(0)
    if G != 1:
        s, q = s / G, q / G
    mean = b * st["mean"] + (1 - b) * s
    sq = b * st["sq"] + (1 - b) * q
    c = 1 - b ** count
    m = mean / c
    var = torch.clamp(sq / c - m * m, min=0.0)
    x = torch.clamp((x_raw - m) / torch.sqrt(var + 1e-8), -5.0, 5.0)
    for col in opt._raw_cols:
        x[:, col] = x_raw[:, col]
    x = torch.where(x_ok, x, 0.0)  # (a skipped forward must not make NaN that a select could not hide)
    enter(opt, "the controller")
    layers = _controller(opt, dev)
    mem_in = st["memory"]
    mem = None
    if opt.controller.memory is not None:
        w, bias = layers[0]
        mem = torch.tanh(torch.cat([x, mem_in], dim=1) @ w + bias)
        h = torch.cat([x, mem], dim=1)
        layers = layers[1:]
    else:
        h = x
    (w1, b1), (w2, b2), (w3, b3) = layers
    z = (torch.tanh(torch.tanh(h @ w1 + b1) @ w2 + b2) @ w3 + b3)[:, 0]
    r = opt.range
    logm = torch.clamp((r.log_hi - r.log_lo) * (1.0 / (1.0 + torch.exp(-(z + r.z0))) - r.s0), r.log_lo, r.log_hi)
    z_ok = x_ok & torch.isfinite(logm).all()
    mults = torch.where(z_ok, torch.exp(logm), st["mult"])
    # the sampled update statistics (NestedOptimizer._base_step), kept on the steps the host samples
    refresh = ok & (st["steps"] % opt.stats_every == 0)
    sampled = "update_ratio" in opt.features_on or "param_norm" in opt.features_on
    strides = [max(1, p.numel() // _SAMPLE) for p in pflat]
    before = [sample_view(p, k).clone() for p, k in zip(pflat, strides)] if sampled else []
    commit(opt, "the base optimizer's step")
    saved = [g["lr"] for g in groups]
    skip = (~ok).to(torch.float32)
    lr_dtype = torch.float64 if pflat[0].dtype == torch.float64 else torch.float32
    opt.base.found_inf = skip
    try:
        for i, g in enumerate(groups):
            g["lr"] = (mults[i] * g["lr"]).to(lr_dtype)
        call_step(opt.base, opt._raw_base_step)
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr
        del opt.base.found_inf
    # what the step keeps (every select below leaves the old value where the step was skipped)
    st["loss"].copy_(torch.where(ok, new_loss, st["loss"]))
    keep = ok & x_ok
    st["mean"].copy_(torch.where(keep, mean, st["mean"]))
    st["sq"].copy_(torch.where(keep, sq, st["sq"]))
    st["count"].copy_(torch.where(keep, count, st["count"]))
    st["last"].copy_(torch.where(keep, x, st["last"]))
    st["raw"].copy_(torch.where(ok, x_raw, st["raw"]))
    take = ok & z_ok
    st["mult"].copy_(torch.where(ok, mults, st["mult"]))
    if mem is not None:  # kept in float32, as the host step keeps it
        st["memory"].copy_(torch.where(take, mem.float().double(), st["memory"]))
    if sampled:
        after = [sample_view(p, k) for p, k in zip(pflat, strides)]
        vals = device_sq_norms([*torch._foreach_sub(after, before), *before])
        n = len(pflat)
        w = _strides(opt, strides, dev)
        d, qq = vals[:n] * w, vals[n:] * w
        ratio = torch.stack([_ratio(d[a:b_].sum(), qq[a:b_].sum()) for a, b_ in zip(bounds, bounds[1:])])
        prms = torch.stack([torch.sqrt(qq[a:b_].sum() / c_) if c_ else zero
                            for a, b_, c_ in zip(bounds, bounds[1:], numel)])
        st["update_ratio"].copy_(torch.where(refresh, ratio, st["update_ratio"]))
        st["param_rms"].copy_(torch.where(refresh, prms, st["param_rms"]))
    st["steps"].add_(ok.to(torch.int64))
    keys = opt.count_keys()
    hits = {"steps": ok, "nonfinite": ~ok, "controller_skipped": ok & ~z_ok}
    off = torch.zeros((), dtype=torch.bool, device=dev)
    opt._count_on_device(torch.stack([hits.get(k, off) for k in keys]).to(torch.int64))


def _ratio(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(q > 0, torch.sqrt(d / torch.where(q > 0, q, 1.0)), 0.0)


def _strides(opt: NestedOptimizer, strides: list[int], dev: torch.device) -> torch.Tensor:
    """The sample's weights (its strides) as a device tensor, made once per layout."""
    key = (dev, tuple(strides))
    cached = opt.__dict__.get("_device_strides")
    if cached is None or cached[0] != key:
        cached = opt.__dict__["_device_strides"] = (key, torch.tensor(strides, dtype=torch.float64).to(dev))
    return cached[1]
