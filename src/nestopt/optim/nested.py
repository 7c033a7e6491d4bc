r"""The nested optimizer: a small controller network sets a learning-rate multiplier per param
group while training runs, on top of any torch optimizer.

Each step, for every param group ``i``, the controller reads a feature vector ``x_i`` and outputs
``m_i`` in ``[lo, hi]`` (default 0.1x to 10x); the wrapped optimizer then steps with
``lr_i * m_i``, and ``lr_i`` is restored, so a torch ``LRScheduler`` still owns ``lr``::

    opt = NestedOptimizer(model.parameters(), base=torch.optim.AdamW, lr=1e-3, fused=True)
    def closure():
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
    opt.step(closure)                  # the default signal (hindsight) needs the closure
    opt.observe_validation(val_loss)   # whenever you evaluate (optional)
    opt.multipliers()                  # current multiplier per group, for logging

The controller is shared by all groups (one row of features per group) and its last layer starts
at zero, so an untrained controller gives ``m = 1`` everywhere: ``NestedOptimizer`` then steps
exactly as its base does.

**Features** (``features=``, any subset of :data:`FEATURES`), per group:

====================  ===========================================================================
``grad_norm``         log RMS of the group's gradient (RMS, not norm: independent of group size)
``param_norm``        log RMS of the group's parameters, every ``stats_every`` steps, estimated
                      from the same sample as ``update_ratio`` (exact for tensors of <= 1024)
``depth``             relative depth: group index / (number of groups - 1), or ``group["depth"]``
``update_ratio``      log(||delta p|| / ||p||) of the last update, every ``stats_every`` steps,
                      from a fixed strided sample of about 1024 elements per tensor
``loss``              relative training-loss change and its moving average
``val``               relative validation-loss change, train/validation gap, and distance from the
                      validation moving average (fed by :meth:`NestedOptimizer.observe_validation`)
``heads``             for a group with ``group["head"] = k``: head ``k``'s loss relative to the mean
                      head loss, its AUC - 0.5 and its gradient norm relative to the mean (from
                      ``step(head_stats=...)``); zeros for groups that are not heads
``curvature``         log of the secant curvature ||g_t - g_{t-1}|| / ||p_t - p_{t-1}|| (keeps the
                      previous gradient and parameters: 2 floats per parameter)
``mult``              the group's current multiplier, ``log m / max(-log lo, log hi)`` (in [-1, 1]),
                      so the controller can move it relative to where it is
====================  ===========================================================================

Every column but ``depth`` and ``mult`` is standardised by a running mean and variance (shared by the groups,
so differences between groups stay visible) and clipped to [-5, 5]: the controller sees the same
scale whatever the model's size or the loss's units. ``scratchpad=d`` gives the controller a
``d``-dimensional memory per group that it reads and rewrites every step
(``s_t = tanh(W [x_t, s_{t-1}])``, trained through one step).

**Signals** that train the controller (``signal=``):

- ``"hindsight"`` (default): every ``period`` steps, the last ``window`` steps are replayed from a
  snapshot with every multiplier of ``grid`` (0.1, 0.5, 1, 1.5, 2) applied on top of the
  multipliers that were used; each replay's end point is scored by the closure's loss on the
  *current* batch (one not used in the window), and the controller is trained with cross-entropy
  toward a grid point, relative to the multipliers it used, so repeated labels walk the
  multiplier across its whole range. The label is the grid point nearest ``label_shift`` (default
  2) times the best replay's multiplier: a greedy label over a few steps favours steps that are
  too small (the short-horizon bias; on a quadratic, the best multiplier along the displacement of
  a rate at the edge of stability is 1/2); ``nestopt study controller-variants`` measures it. Replay uses **cached gradients** (not cached batches): the
  window's gradients are kept and re-applied through the base optimizer, which needs no extra
  forward or backward pass for the replayed steps and keeps the caches serialisable. Memory:
  ``window`` gradient copies plus two snapshots of parameters and base state: for AdamW and
  ``window=8``, 8 + 2 x 3 = 14 floats per parameter at the peak. Compute: every ``period`` steps,
  ``len(grid) - 1`` replays of ``window`` base steps and one closure call each (the multiplier 1
  replay is the real trajectory, so its loss is the step's own). ``follow=f`` takes a share of
  each label directly: a scale shared by the groups is multiplied by ``label ** f`` after every
  replay and multiplies the controller's outputs (the product kept in ``mult_range``), and the
  controller is trained toward the remaining ``label ** (1 - f)``; ``follow=1`` is a line search
  over time on the learning rate with the controller left as it is.
- ``"proxy"``: the seed's indirect signal. The multiplier is explored (log-normal noise,
  ``explore``) and reinforced when the training loss fell more than its running average over the
  next step (REINFORCE with a baseline).
- ``"validation"``: the same with the reward "did the validation loss improve", one exploration
  draw held over each interval between :meth:`~NestedOptimizer.observe_validation` calls.
- ``"frozen"``: no training; weights from ``controller`` (for example ones meta-trained offline).
  Until nestopt ships meta-trained weights, the default frozen controller is the untrained one,
  which gives ``m = 1``: the base optimizer itself.

**Safety.** A non-finite loss or gradient skips the step entirely (no parameter, base state,
controller or multiplier changes; counted in ``opt.counters["nonfinite"]``), and a non-finite
feature or controller loss skips the controller's update and leaves the multipliers as they were
(``counters["controller_skipped"]``).

``state_dict()`` carries the base optimizer's state, the controller's weights and its optimizer,
the feature normaliser, the scratchpad, the hindsight caches and snapshots and the counters; a
round trip continues bitwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer
from torch import nn
from torch.optim import Optimizer

from .._checks import check_choice, check_int, check_number
from ..nets.controller import Controller, _RunningNorm
from .tensors import host_sq_norms

FEATURES: dict[str, int] = {"grad_norm": 1, "param_norm": 1, "depth": 1, "update_ratio": 1, "loss": 2,
                            "val": 3, "heads": 3, "curvature": 1, "mult": 1}
_RAW = ("depth", "mult")  # features the controller sees as they are (already on a fixed scale)
DEFAULT_FEATURES = ("grad_norm", "param_norm", "depth", "update_ratio", "loss", "val")
SIGNALS = ("hindsight", "proxy", "validation", "frozen")
DEFAULT_GRID = (0.1, 0.5, 1.0, 1.5, 2.0)
_TINY = 1e-30
# torch's registries of global optimizer step hooks (private; None on a torch without them, which
# keeps the base's step wrapped)
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
_SAMPLE = 1024  # elements per tensor sampled for the update ratio


def hindsight_label(scores: dict[float, float], shift: float = 1.0) -> float:
    """The grid multiplier a hindsight replay labels: the one whose replay ended lowest (ties go to
    the one nearest 1), or, with ``shift != 1``, the grid point nearest ``shift`` times it on a log
    scale (ties to the smaller). ``shift > 1`` leans against the short-horizon bias of a greedy
    label; a replay that ended non-finite never wins."""
    grid = list(scores)
    best = min(grid, key=lambda m: (scores[m], abs(math.log(m))))
    if shift != 1.0 and math.isfinite(scores[best]):
        best = min(grid, key=lambda m: (abs(math.log(m) - math.log(shift * best)), m))
    return best


def _snapshot(base: Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """Copies of the parameters, the base optimizer's per-parameter state and its group fields."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in base.state[p].items()}
                  if p in base.state else None for p in params],
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in base.param_groups],
    }


def _restore(base: Optimizer, params: list[torch.Tensor], snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for p, q in zip(params, snap["params"]):
            p.copy_(q)
    for p, st in zip(params, snap["state"]):
        if st is None:
            base.state.pop(p, None)
            continue
        cur = base.state[p]
        for k in list(cur):
            if k not in st:
                del cur[k]
        for k, v in st.items():
            if torch.is_tensor(v) and torch.is_tensor(cur.get(k)) and cur[k].shape == v.shape:
                cur[k].copy_(v)
            else:
                cur[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    for g, fields in zip(base.param_groups, snap["groups"]):
        g.update(copy.deepcopy(fields))


class NestedOptimizer(Optimizer):
    """Wraps ``base`` (any ``torch.optim.Optimizer`` class) and scales each group's ``lr`` by a
    multiplier from a learned controller. See the module docstring.

    Args:
        params: parameters or param-group dicts (a group may carry ``"depth"`` and ``"head"``).
        base: the optimizer class to wrap; ``base_kwargs`` go to it (``lr=...``, ``fused=True``...).
        controller: a :class:`Controller` (its ``n_features`` must match the features), a path to
            a controller file (``nestopt meta-train --net controller`` writes one), or ``None`` for
            a fresh one.
        signal: ``"hindsight"``, ``"proxy"``, ``"validation"`` or ``"frozen"``.
        features: names from :data:`FEATURES` (default: the controller's own, for one made for a
            given set such as a meta-trained one, else :data:`DEFAULT_FEATURES`).
        mult_range: ``(lo, hi)`` with ``0 < lo < 1 < hi``.
        scratchpad: memory size per group (0: none).
        hidden: the controller's width.
        controller_lr: Adam rate for the controller's weights.
        stats_every: refresh the parameter norms and the update ratio every this many steps (from
            a strided sample of about 1024 elements per tensor: no pass over the parameters). The
            gradient norms are exact and read every step; the non-finite check needs them anyway.
        window, period, grid: hindsight replay: the last ``window`` steps every ``period`` steps,
            with each multiplier in ``grid`` (must contain 1).
        label_shift: hindsight labels the grid point nearest ``label_shift`` times the best
            replay's multiplier (1: the best itself; see :func:`hindsight_label`).
        follow: the share of each hindsight label taken directly: a scale shared by the groups
            (starting at 1, kept in ``[lo, hi]``) is multiplied by ``label ** follow`` after every
            replay, and the controller is trained toward ``label ** (1 - follow)`` relative to its
            own multipliers. 0 (the default): the controller learns all of it; 1: a line search
            over time on the learning rate, and the controller is not trained.
        explore: standard deviation of the log-multiplier exploration for ``"proxy"`` and
            ``"validation"``.
        seed: seeds the controller's initial weights and the exploration noise.
        per_tensor_groups: given plain tensors (``model.parameters()``), make each its own group,
            in order, with ``depth`` = its position, so the controller sets one multiplier per
            tensor (what the bench uses). Param-group dicts are always kept as given.
    """

    def __init__(self, params: Iterable[Any], base: type[Optimizer] = torch.optim.AdamW, *,
                 controller: Controller | str | Path | None = None, signal: str = "hindsight",
                 features: Sequence[str] | None = None, mult_range: tuple[float, float] = (0.1, 10.0),
                 scratchpad: int = 0, hidden: int = 32, controller_lr: float = 3e-3, stats_every: int = 8,
                 window: int = 8, period: int = 32, grid: Sequence[float] = DEFAULT_GRID, label_shift: float = 2.0,
                 follow: float = 0.0, explore: float = 0.2,
                 seed: int = 0, per_tensor_groups: bool = False, **base_kwargs: Any) -> None:
        if per_tensor_groups:
            params = list(params)
            if not any(isinstance(g, dict) for g in params):  # groups a user gave are kept as given
                n = len(params)
                params = [{"params": [p], "depth": i / max(n - 1, 1)} for i, p in enumerate(params)]
        if not (isinstance(base, type) and issubclass(base, Optimizer)):
            raise ValueError(f"base={base!r} is invalid: expected a torch.optim.Optimizer subclass")
        check_choice("signal", signal, SIGNALS)
        if isinstance(controller, str | Path):
            from ..nets import load_net

            controller = load_net(controller)
            if not isinstance(controller, Controller):
                raise ValueError(f"controller file holds a {controller.config()['kind']} network, not a nested "
                                 "optimizer's controller")
        known = controller.features if isinstance(controller, Controller) else None
        if features is None:
            features = known if known is not None else DEFAULT_FEATURES
        elif known is not None and tuple(features) != known:
            raise ValueError(f"features={list(features)!r} is invalid for this controller: it was made for "
                             f"{list(known)}")
        feats = tuple(features)
        for f in feats:
            check_choice("features", f, FEATURES)
        if len(set(feats)) != len(feats):
            raise ValueError(f"features={list(feats)!r} is invalid: a name appears twice")
        if not feats and scratchpad == 0:
            raise ValueError("features=[] is invalid without a scratchpad: the controller would see nothing")
        if not (isinstance(mult_range, tuple | list) and len(mult_range) == 2):
            raise ValueError(f"mult_range={mult_range!r} is invalid: expected a pair (lo, hi)")
        lo = check_number("mult_range[0]", mult_range[0], lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        hi = check_number("mult_range[1]", mult_range[1], lo=1.0, lo_open=True)
        check_number("controller_lr", controller_lr, lo=0.0)
        check_int("stats_every", stats_every, lo=1)
        check_int("window", window, lo=1)
        check_int("period", period, lo=window)
        grid_t = tuple(check_number("grid", g, lo=0.0, lo_open=True) for g in grid)
        if 1.0 not in grid_t or len(grid_t) < 2:
            raise ValueError(f"grid={list(grid)!r} is invalid: needs 1.0 and at least one other multiplier")
        check_number("label_shift", label_shift, lo=0.0, lo_open=True)
        check_number("follow", follow, lo=0.0, hi=1.0)
        if follow > 0 and signal != "hindsight":
            raise ValueError(f"follow={follow} is invalid with signal={signal!r}: it takes a share of the hindsight "
                             "label, so it needs signal='hindsight'")
        check_number("explore", explore, lo=0.0)
        check_int("seed", seed, lo=0)
        n_features = sum(FEATURES[f] for f in feats)
        if controller is None:
            controller = Controller(max(n_features, 1), hidden, scratchpad, seed=seed)
        if not isinstance(controller, Controller):
            raise ValueError(f"controller={controller!r} is invalid: expected a nestopt Controller")
        if controller.n_features != max(n_features, 1) or controller.scratchpad != scratchpad:
            raise ValueError(f"controller has n_features={controller.n_features}, scratchpad={controller.scratchpad}; "
                             f"the features {list(feats)} need n_features={n_features}, scratchpad={scratchpad}")
        self.base = base(params, **base_kwargs)
        # the base's step without torch's hook/profiler wrapper (see _base_step_call)
        step_fn = type(self.base).step
        known = _GLOBAL_PRE_HOOKS is not None and _GLOBAL_POST_HOOKS is not None and getattr(step_fn, "hooked", False)
        self._raw_base_step = getattr(step_fn, "__wrapped__", None) if known else None
        self._ready = False
        super().__init__(self.base.param_groups, dict(self.base.defaults))
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._ready = True
        self.signal, self.features_on = signal, feats
        # columns of the features in _RAW, which the running standardisation leaves as they are
        self._raw_cols = [sum(FEATURES[f] for f in feats[:i]) for i, f in enumerate(feats) if f in _RAW]
        self.log_lo, self.log_hi = math.log(lo), math.log(hi)
        self._lo, self._hi = lo, hi
        self._z0 = math.log(-self.log_lo / self.log_hi)  # logit of (0 - log lo) / (log hi - log lo): z = 0 gives m = 1
        self._s0 = 1.0 / (1.0 + math.exp(-self._z0))
        self.stats_every, self.window, self.period, self.grid = stats_every, window, period, grid_t
        self.label_shift = float(label_shift)
        self.follow = float(follow)
        self.explore = explore
        self.controller = controller
        self.controller_opt = torch.optim.Adam(controller.parameters(), lr=controller_lr)
        self.norm = _RunningNorm(max(n_features, 1))
        self._gen = torch.Generator().manual_seed(seed)
        self.counters = {"steps": 0, "nonfinite": 0, "controller_updates": 0, "controller_skipped": 0,
                         "replays": 0, "replay_steps": 0, "replay_closures": 0}
        self._init_runtime()
        for g in self.param_groups:
            g.setdefault("nested_mult", 1.0)

    # -- plumbing ------------------------------------------------------------------------------------
    def _init_runtime(self) -> None:
        G = len(self.param_groups)
        self.memory = torch.zeros(G, self.controller.scratchpad)
        self.last_features = np.zeros((G, self.controller.n_features))
        self.last_raw: dict[str, list[float]] = {}
        self._loss_prev: float | None = None
        self._loss_ema: float | None = None
        self._dloss_ema = 0.0
        self._val: dict[str, float | None] = {"prev": None, "ema": None, "delta": 0.0, "gap": 0.0, "dev": 0.0}
        self._param_rms: list[float] = [0.0] * G
        self._update_ratio: list[float] = [0.0] * G
        self._heads: torch.Tensor = torch.zeros(G, 3)
        self._curv: list[float] = [0.0] * G
        self._buffers: dict[str, list[torch.Tensor]] = {}  # curvature: previous gradient and parameters
        self._pending: dict[str, Any] | None = None  # proxy: the last action, rewarded next step
        self._val_noise: torch.Tensor | None = None
        self._val_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._baseline = {"mean": 0.0, "sq": 1.0, "n": 0}
        self._scale = 1.0  # the share of the hindsight labels followed directly (``follow``)
        self._window: dict[str, Any] = {"snap": None, "grads": [], "lrs": [], "inputs": []}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:  # during Optimizer.__init__: the groups are the base's own dicts
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)
        self.param_groups[-1].setdefault("nested_mult", 1.0)
        G = len(self.param_groups)
        self.memory = torch.cat([self.memory, torch.zeros(1, self.controller.scratchpad)])
        self.last_features = np.concatenate([self.last_features, np.zeros((1, self.controller.n_features))])
        self._param_rms.append(0.0)
        self._update_ratio.append(0.0)
        self._curv.append(0.0)
        self._heads = torch.cat([self._heads, torch.zeros(1, 3)])
        self._buffers = {}
        self._window = {"snap": None, "grads": [], "lrs": [], "inputs": []}
        assert self.memory.shape[0] == G

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def cache_numel(self) -> int:
        """Elements held outside ``self.state``: the hindsight window's gradients and snapshot, and
        the curvature feature's previous gradient and parameters (0 when those are off)."""
        w = self._window
        n = sum(g.numel() for row in w["grads"] for g in row if g is not None)
        if w["snap"] is not None:
            n += sum(t.numel() for t in w["snap"]["params"])
            n += sum(v.numel() for st in w["snap"]["state"] if st for v in st.values()
                     if torch.is_tensor(v) and v.numel() > 1)
        return n + sum(t.numel() for ts in self._buffers.values() for t in ts)

    def multipliers(self) -> list[float]:
        """The multiplier each group stepped with last (1 before the first step)."""
        return [g["nested_mult"] for g in self.param_groups]

    def feature_table(self) -> dict[str, list[float]]:
        """Raw (unnormalised) features of the last step, per name, one value per group."""
        return {k: list(v) for k, v in self.last_raw.items()}

    def _to_mult(self, z: torch.Tensor) -> torch.Tensor:
        """Raw controller output -> log multiplier in [log lo, log hi]; z = 0 gives log 1 = 0."""
        lo, hi = self.log_lo, self.log_hi
        # written as a difference so that z = 0 gives exactly 0 (a multiplier of exactly 1)
        return ((hi - lo) * (torch.sigmoid(z + self._z0) - self._s0)).clamp(lo, hi)

    # -- validation ------------------------------------------------------------------------------
    def observe_validation(self, val_loss: float | torch.Tensor) -> None:
        """Feed a validation loss (call after each evaluation). Drives the ``val`` features and the
        ``"validation"`` signal; a non-finite value is ignored (counted)."""
        v = float(val_loss.detach()) if torch.is_tensor(val_loss) else float(val_loss)
        if not math.isfinite(v):
            self.counters["controller_skipped"] += 1
            return
        st = self._val
        prev, ema = st["prev"], st["ema"]
        scale = max(abs(prev if prev is not None else v), 1e-12)
        st["delta"] = 0.0 if prev is None else (v - prev) / scale
        st["gap"] = 0.0 if self._loss_ema is None else (v - self._loss_ema) / max(abs(v), 1e-12)
        st["ema"] = v if ema is None else 0.8 * ema + 0.2 * v
        st["dev"] = (v - st["ema"]) / max(abs(st["ema"]), 1e-12)
        if self.signal == "validation" and prev is not None and self._val_noise is not None and self._val_inputs:
            reward = (prev - v) / scale
            self._reinforce(reward, self._val_inputs, self._val_noise)
        st["prev"] = v
        self._val_inputs = []
        self._val_noise = None

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, loss: torch.Tensor | float | None = None,
             head_stats: dict[str, Sequence[float]] | Callable[[], dict[str, Sequence[float]]] | None = None) -> Any:
        """One step: features, controller, base step at ``lr * multiplier`` per group.

        ``closure`` (re-evaluates the loss and gradients) or ``loss`` (already backpropagated)
        gives the training loss; ``"hindsight"`` needs the closure, ``"proxy"`` needs one of them.
        ``head_stats``: ``{"loss": [...], "auc": [...], "grad_norm": [...]}`` indexed by head, for
        groups that carry ``"head"`` (any key may be left out; a missing ``grad_norm`` is the
        head group's own gradient RMS), or a function returning that dict, called after the
        closure (for head losses the closure computes).
        """
        if self.signal == "hindsight" and closure is None:
            raise ValueError("signal='hindsight' replays cached gradients and scores them with the closure: "
                             "call step(closure)")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if callable(head_stats):
            head_stats = head_stats()
        if self.signal == "proxy" and loss is None:
            raise ValueError("signal='proxy' needs the training loss: call step(closure) or step(loss=...)")
        groups = self.param_groups
        params = self._params()
        have = [[p for p in g["params"] if p.grad is not None] for g in groups]
        grads = [p.grad for ps in have for p in ps]
        if not grads:
            return loss
        t = self.counters["steps"]
        refresh = t % self.stats_every == 0
        sizes = [len(ps) for ps in have]
        # Read in reverse: the base optimizer then starts on the gradients read last (still cached).
        extra = () if loss is None else (loss,)
        gsq, loss_v = host_sq_norms(grads[::-1], *extra)  # the one host sync of a step
        gsq, loss_v = gsq[::-1], (loss_v[0] if loss_v else None)
        pflat = [p for ps in have for p in ps]
        if not all(map(math.isfinite, gsq)) or (loss_v is not None and not math.isfinite(loss_v)):
            self.counters["nonfinite"] += 1
            return loss
        numel = [p.numel() for p in pflat]
        g_rms, off = [], 0
        for k in sizes:
            s, c = sum(gsq[off:off + k]), sum(numel[off:off + k])
            g_rms.append(math.sqrt(s / c) if c else 0.0)
            off += k
        if self.signal == "proxy" and self._pending is not None and loss_v is not None:
            prev = self._pending
            reward = (prev["loss"] - loss_v) / max(abs(prev["loss"]), 1e-12)
            self._reinforce(reward, [(prev["x"], prev["mem"])], prev["noise"])
        if "curvature" in self.features_on:
            self._curvature(have)
        x_raw = self._features(g_rms, loss_v, head_stats)
        x = self._normalise(x_raw)
        if x is None:  # non-finite feature: keep the multipliers, step the base with them
            self.counters["controller_skipped"] += 1
            mults = [g["nested_mult"] for g in groups]
            self._base_step(mults, refresh, pflat)
            self.counters["steps"] += 1
            return loss
        if self.signal == "hindsight":
            self._hindsight(closure, loss_v, params)  # type: ignore[arg-type]
        mem_in = self.memory
        z, mem = self.controller.forward_numpy(x, mem_in.double().numpy() if self.controller.scratchpad else None)
        logm = np.minimum(np.maximum((self.log_hi - self.log_lo) * (1.0 / (1.0 + np.exp(-(z + self._z0))) - self._s0),
                                     self.log_lo), self.log_hi)  # np.clip, without its wrapper's cost
        xt = torch.from_numpy(x).float() if self.signal != "frozen" else None
        noise = None
        if self.signal == "proxy" and self.explore > 0:
            noise = torch.randn(len(groups), generator=self._gen)
        elif self.signal == "validation" and self.explore > 0:
            if self._val_noise is None:
                self._val_noise = torch.randn(len(groups), generator=self._gen)
            noise = self._val_noise
            if len(self._val_inputs) < 64:
                self._val_inputs.append((xt, mem_in.clone()))
        if noise is not None:
            logm = np.clip(logm + self.explore * noise.double().numpy(), self.log_lo, self.log_hi)
        if not np.isfinite(logm).all():
            self.counters["controller_skipped"] += 1
            mults = [g["nested_mult"] for g in groups]  # as they were (the scale already in them)
            own = [m / self._scale for m in mults]
        else:
            own = mults = np.exp(logm).tolist()
            if mem is not None:
                self.memory = torch.from_numpy(mem).float()
            if self._scale != 1.0:  # the followed share of the hindsight labels, on top of the controller's
                lo, hi, sc = self._lo, self._hi, self._scale
                mults = [min(max(sc * m, lo), hi) for m in mults]
        if self.signal == "proxy" and loss_v is not None:
            self._pending = {"loss": loss_v, "x": xt, "mem": mem_in.clone(), "noise": noise}
        if self.signal == "hindsight":
            self._record_window(xt, mem_in, own, mults, params)
        self._base_step(mults, refresh, pflat)
        self.counters["steps"] += 1
        return loss

    def _base_step_call(self) -> None:
        """``self.base.step()``, without torch's step wrapper when nothing is hooked into it.

        The wrapper (a profiler range and the step hooks) costs about 60 us per call on this
        2-core machine: as much again as fused AdamW's own host work on a small model. This
        optimizer's own ``step`` keeps its wrapper, so its hooks and profiler range still run;
        the base's are skipped only while the base has no hooks of its own, no global hook is
        registered and its ``step`` is not patched on the instance (as a scheduler attached to
        the base does)."""
        raw = self._raw_base_step
        base = self.base
        if (raw is None or "step" in base.__dict__ or base._optimizer_step_pre_hooks
                or base._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS):
            base.step()
        else:
            raw(base)

    def _base_step(self, mults: list[float], refresh: bool, pflat: list[torch.Tensor]) -> None:
        sample = None
        if refresh and ("update_ratio" in self.features_on or "param_norm" in self.features_on):
            # The update's size from a fixed strided sample of each tensor (at most ~1024
            # elements each, weighted by the stride): no copy of the parameters is made.
            strides = [max(1, p.numel() // _SAMPLE) for p in pflat]
            sample = [p.detach().reshape(-1)[::k].clone() for p, k in zip(pflat, strides)]
        saved = []
        for g, m in zip(self.param_groups, mults):
            saved.append(g["lr"])
            g["lr"] = g["lr"] * m
            g["nested_mult"] = m
        try:
            self._base_step_call()
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
        if sample is not None:
            after = [p.detach().reshape(-1)[::k] for p, k in zip(pflat, strides)]
            n, off = len(pflat), 0
            host, _ = host_sq_norms([*torch._foreach_sub(after, sample), *sample])
            for i, g in enumerate(self.param_groups):
                k = sum(1 for p in g["params"] if p.grad is not None)
                d = sum(host[j] * strides[j] for j in range(off, off + k))
                q = sum(host[n + j] * strides[j] for j in range(off, off + k))
                c = sum(pflat[j].numel() for j in range(off, off + k))
                self._update_ratio[i] = math.sqrt(d / q) if q > 0 else 0.0
                self._param_rms[i] = math.sqrt(q / c) if c else 0.0  # of the parameters before the step
                off += k

    # -- features --------------------------------------------------------------------------------
    def _features(self, g_rms: list[float], loss_v: float | None,
                  head_stats: dict[str, Sequence[float]] | None) -> np.ndarray:
        G = len(self.param_groups)
        if loss_v is not None:
            if self._loss_prev is None:
                dl = 0.0
            else:
                dl = (loss_v - self._loss_prev) / max(abs(self._loss_ema or loss_v), 1e-12)
            self._dloss_ema = 0.9 * self._dloss_ema + 0.1 * dl
            self._loss_prev = loss_v
            self._loss_ema = loss_v if self._loss_ema is None else 0.95 * self._loss_ema + 0.05 * loss_v
        else:
            dl = 0.0
        raw: dict[str, list[float]] = {}
        cols: list[list[float]] = []
        for name in self.features_on:
            if name == "grad_norm":
                vals = [[math.log(max(r, _TINY))] for r in g_rms]
            elif name == "param_norm":
                vals = [[math.log(max(r, _TINY))] for r in self._param_rms]
            elif name == "depth":
                vals = [[float(g.get("depth", i / max(G - 1, 1)))] for i, g in enumerate(self.param_groups)]
            elif name == "update_ratio":
                vals = [[math.log(max(r, _TINY))] for r in self._update_ratio]
            elif name == "loss":
                vals = [[dl, self._dloss_ema]] * G
            elif name == "val":
                v = self._val
                vals = [[v["delta"], v["gap"], v["dev"]]] * G  # type: ignore[list-item]
            elif name == "heads":
                vals = self._head_features(g_rms, head_stats)
            elif name == "mult":
                scale = max(-self.log_lo, self.log_hi)
                vals = [[math.log(g["nested_mult"]) / scale] for g in self.param_groups]
            else:  # curvature
                vals = [[math.log(max(c, _TINY))] for c in self._curv]
            raw[name] = [row[0] for row in vals]
            cols.append(vals)  # type: ignore[arg-type]
        self.last_raw = raw
        if not cols:
            return np.zeros((G, 1))
        return np.array([[v for col in cols for v in col[i]] for i in range(G)], dtype=np.float64)

    def _head_features(self, g_rms: list[float], head_stats: dict[str, Sequence[float]] | None) -> list[list[float]]:
        if head_stats is not None:
            out = torch.zeros(len(self.param_groups), 3)
            losses = list(head_stats.get("loss", ()))
            aucs = list(head_stats.get("auc", ()))
            gns = list(head_stats.get("grad_norm", ()))
            head_groups = [(i, g["head"]) for i, g in enumerate(self.param_groups) if "head" in g]
            if not gns:  # the head's own group's gradient RMS
                gns = [0.0] * (1 + max((h for _, h in head_groups), default=-1))
                for i, h in head_groups:
                    gns[h] = g_rms[i]
            mean_l = sum(losses) / len(losses) if losses else 1.0
            mean_g = sum(gns) / len(gns) if gns else 1.0
            for i, h in head_groups:
                if h < len(losses):
                    out[i, 0] = math.log(max(losses[h], _TINY) / max(mean_l, _TINY))
                if h < len(aucs):
                    out[i, 1] = aucs[h] - 0.5
                if h < len(gns):
                    out[i, 2] = math.log(max(gns[h], _TINY) / max(mean_g, _TINY))
            self._heads = out
        return self._heads.tolist()

    def _curvature(self, have: list[list[torch.Tensor]]) -> None:
        ps = [p for grp in have for p in grp]
        gs = [p.grad for p in ps]
        buf = self._buffers
        if "prev_grad" in buf and len(buf["prev_grad"]) == len(ps):
            dg = torch._foreach_sub(gs, buf["prev_grad"])
            dp = torch._foreach_sub(ps, buf["prev_param"])
            n, off = len(ps), 0
            host, _ = host_sq_norms([*dg, *dp])
            for i, grp in enumerate(have):
                k = len(grp)
                a, b = sum(host[off:off + k]), sum(host[n + off:n + off + k])
                self._curv[i] = math.sqrt(a / b) if b > 0 else self._curv[i]
                off += k
            torch._foreach_copy_(buf["prev_grad"], gs)
            torch._foreach_copy_(buf["prev_param"], ps)
        else:
            buf["prev_grad"] = [g.detach().clone() for g in gs]
            buf["prev_param"] = [p.detach().clone() for p in ps]

    def _normalise(self, x_raw: np.ndarray) -> np.ndarray | None:
        if not np.isfinite(x_raw).all():
            return None
        x = self.norm(x_raw)
        for c in self._raw_cols:  # already on a fixed scale: kept as they are
            x[:, c] = x_raw[:, c]
        self.last_features = x
        return x

    # -- training the controller -------------------------------------------------------------------
    def _controller_update(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        with torch.enable_grad():
            self.controller_opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            if not bool(torch.isfinite(loss)):
                self.counters["controller_skipped"] += 1
                return
            loss.backward()
        grads = [p.grad for p in self.controller.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.counters["controller_skipped"] += 1
            return
        self.controller_opt.step()
        self.counters["controller_updates"] += 1

    def _reinforce(self, reward: float, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                   noise: torch.Tensor | None) -> None:
        """REINFORCE with a running baseline: push the mean log multiplier toward the explored one
        when the reward beat its running average."""
        if noise is None or not math.isfinite(reward):
            return
        b = self._baseline
        b["n"] += 1
        adv = reward - b["mean"]
        std = math.sqrt(max(b["sq"] - b["mean"] ** 2, 1e-12)) if b["n"] > 1 else max(abs(reward), 1e-12)
        b["mean"] = 0.9 * b["mean"] + 0.1 * reward
        b["sq"] = 0.9 * b["sq"] + 0.1 * reward * reward
        adv = max(min(adv / std, 3.0), -3.0)
        coef = (adv * noise / max(self.explore, 1e-12)).detach()

        def loss_fn() -> torch.Tensor:
            total = torch.zeros(())
            for x, mem in inputs:
                z, _ = self.controller(x, mem if self.controller.scratchpad else None)
                total = total - (coef * self._to_mult(z)).sum()
            return total / len(inputs)

        self._controller_update(loss_fn)

    # -- hindsight ---------------------------------------------------------------------------------
    def _record_window(self, x: torch.Tensor, mem: torch.Tensor, own: list[float], mults: list[float],
                       params: list[torch.Tensor]) -> None:
        """Called before the base step of step ``t``: open a window or add this step to it. ``own``:
        the controller's multipliers; ``mults``: the ones stepped with (``own`` times the scale)."""
        pos = self.counters["steps"] % self.period
        w = self._window
        if pos == self.period - self.window:
            w.update(snap=_snapshot(self.base, params), grads=[], lrs=[], inputs=[])
        if w["snap"] is None:
            return
        w["grads"].append([None if p.grad is None else p.grad.detach().clone() for p in params])
        w["lrs"].append([g["lr"] * m for g, m in zip(self.param_groups, mults)])
        w["inputs"].append((x, mem.clone(), torch.tensor(own).log()))

    def _hindsight(self, closure: Callable[[], torch.Tensor], loss_v: float | None, params: list[torch.Tensor]) -> None:
        w = self._window
        if w["snap"] is None or len(w["grads"]) < self.window:
            return
        real_grads = [p.grad for p in params]
        now = _snapshot(self.base, params)
        scores = {}
        for m in self.grid:
            if m == 1.0:
                scores[m] = loss_v if loss_v is not None else math.inf
                continue
            _restore(self.base, params, w["snap"])
            for grads, lrs in zip(w["grads"], w["lrs"]):
                for p, g in zip(params, grads):
                    p.grad = g
                saved = [g["lr"] for g in self.param_groups]
                for g, lr in zip(self.param_groups, lrs):
                    g["lr"] = lr * m
                self.base.step()
                for g, lr in zip(self.param_groups, saved):
                    g["lr"] = lr
                self.counters["replay_steps"] += 1
            for p in params:
                p.grad = None
            with torch.enable_grad():
                val = float(closure().detach())
            self.counters["replay_closures"] += 1
            scores[m] = val if math.isfinite(val) else math.inf
        _restore(self.base, params, now)
        for p, g in zip(params, real_grads):
            p.grad = g
        self.counters["replays"] += 1
        best = hindsight_label(scores, self.label_shift)
        self.last_hindsight = {"scores": scores, "best": best}
        inputs = w["inputs"]
        w.update(snap=None, grads=[], lrs=[], inputs=[])
        if not math.isfinite(scores[best]):
            return
        if self.follow > 0:  # the scale takes label ** follow; the controller learns the rest
            self._scale = min(max(self._scale * best ** self.follow, self._lo), self._hi)
            if self.follow == 1.0:
                return
        log_grid = (1.0 - self.follow) * torch.tensor([math.log(m) for m in self.grid])
        label = self.grid.index(best)
        tau = 0.5

        def loss_fn() -> torch.Tensor:
            total = torch.zeros(())
            for x, mem, logm_used in inputs:
                z, _ = self.controller(x, mem if self.controller.scratchpad else None)
                mu = self._to_mult(z)  # (G,)
                centres = (logm_used[:, None] + log_grid[None, :]).clamp(self.log_lo, self.log_hi)
                logits = -((mu[:, None] - centres) ** 2) / (2 * tau * tau)
                total = total + nn.functional.cross_entropy(logits, torch.full((len(mu),), label))
            return total / len(inputs)

        for _ in range(4):
            self._controller_update(loss_fn)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = self.base.state_dict()
        params = self._params()
        index = {id(p): i for i, p in enumerate(params)}
        w = self._window
        sd["nested"] = {
            "controller": copy.deepcopy(self.controller.state_dict()),
            "controller_opt": copy.deepcopy(self.controller_opt.state_dict()),
            "norm": self.norm.state(),
            "memory": self.memory.clone(),
            "counters": dict(self.counters),
            "generator": self._gen.get_state(),
            "scalars": {"loss_prev": self._loss_prev, "loss_ema": self._loss_ema, "dloss_ema": self._dloss_ema,
                        "val": dict(self._val), "param_rms": list(self._param_rms),
                        "update_ratio": list(self._update_ratio), "curv": list(self._curv),
                        "baseline": dict(self._baseline), "scale": self._scale},
            "heads": self._heads.clone(),
            "last_features": torch.from_numpy(self.last_features.copy()),
            "buffers": {k: [t.clone() for t in v] for k, v in self._buffers.items()},
            "pending": copy.deepcopy(self._pending),
            "val_noise": None if self._val_noise is None else self._val_noise.clone(),
            "val_inputs": copy.deepcopy(self._val_inputs),
            "window": {
                "snap": None if w["snap"] is None else {
                    "params": [t.clone() for t in w["snap"]["params"]],
                    "state": copy.deepcopy(w["snap"]["state"]),
                    "groups": copy.deepcopy(w["snap"]["groups"])},
                "grads": [[None if g is None else g.clone() for g in row] for row in w["grads"]],
                "lrs": copy.deepcopy(w["lrs"]),
                "inputs": copy.deepcopy(w["inputs"]),
            },
            "n_params": len(index),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        nested = sd.pop("nested", None)
        if nested is None:
            raise ValueError("state_dict is invalid for NestedOptimizer: it has no 'nested' entry "
                             "(was it saved from the base optimizer?)")
        self.base.load_state_dict(sd)
        self.param_groups = self.base.param_groups  # torch replaces the list on load
        self.state = self.base.state
        params = self._params()
        if nested["n_params"] != len(params):
            raise ValueError(f"state_dict is for {nested['n_params']} parameters, this optimizer has {len(params)}")
        self.controller.load_state_dict(nested["controller"])
        self.controller_opt.load_state_dict(nested["controller_opt"])
        self.norm.load(nested["norm"])
        self.memory = nested["memory"].clone()
        self.counters = dict(nested["counters"])
        self._gen.set_state(nested["generator"])
        sc = nested["scalars"]
        self._loss_prev, self._loss_ema, self._dloss_ema = sc["loss_prev"], sc["loss_ema"], sc["dloss_ema"]
        self._val = dict(sc["val"])
        self._param_rms, self._update_ratio, self._curv = list(sc["param_rms"]), list(sc["update_ratio"]), list(sc["curv"])
        self._baseline = dict(sc["baseline"])
        self._scale = float(sc.get("scale", 1.0))  # absent from state saved before ``follow`` existed
        self._heads = nested["heads"].clone()
        self.last_features = nested["last_features"].double().numpy().copy()
        dev = params[0].device if params else torch.device("cpu")
        self._buffers = {k: [t.to(dev).clone() for t in v] for k, v in nested["buffers"].items()}
        self._pending = copy.deepcopy(nested["pending"])
        self._val_noise = None if nested["val_noise"] is None else nested["val_noise"].clone()
        self._val_inputs = copy.deepcopy(nested["val_inputs"])
        w = nested["window"]
        snap = None
        if w["snap"] is not None:
            snap = {"params": [t.to(p.device).clone() for t, p in zip(w["snap"]["params"], params)],
                    "state": [None if st is None else {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v)
                                                        for k, v in copy.deepcopy(st).items()}
                              for st, p in zip(w["snap"]["state"], params)],
                    "groups": copy.deepcopy(w["snap"]["groups"])}
        self._window = {"snap": snap,
                        "grads": [[None if g is None else g.to(p.device).clone() for g, p in zip(row, params)]
                                  for row in w["grads"]],
                        "lrs": copy.deepcopy(w["lrs"]), "inputs": copy.deepcopy(w["inputs"])}
