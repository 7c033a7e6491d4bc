"""The nested optimizer itself: validation, the step's order of work, and state. The method is
described in the package docstring (:mod:`nestopt.optim.nested`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from ..._checks import check_choice, check_int, check_number
from ...nets.controller import Controller, RunningNorm
from ..base import NestoptOptimizer, refuse_sparse
from ..distributed import group_token, is_dtensor, local, mean_values, sample_view, sq_norms
from ..counters import bump, ensure
from ..groups import LR_MAX, check_group, check_loadable, decay_within_rate, finite, number, rate, shape_fits
from ..tensors import host_sq_norms
from ..transaction import commit, current, enter, evaluate
from .features import DEFAULT_FEATURES, Feature, LossTracker, StepView, make_features
from .hindsight import Hindsight
from .signals import Frozen, Proxy, Signal, Validation, noisy
from .basecheck import base_supports, base_unsupported_why, check_base_values, constructor_keys
from .packing import old_layout, pack, unpack
from .undo import keep_controller, undo_point
from . import device
from .wrapper import MultRange, call_step_unhooked, raw_step, step_scaled

SIGNALS = ("hindsight", "proxy", "validation", "frozen")
DEFAULT_GRID = (0.1, 0.5, 1.0, 1.5, 2.0)
_SAMPLE = 1024  # elements per tensor sampled for the update ratio


class NestedOptimizer(NestoptOptimizer):
    """Wraps ``base`` (any ``torch.optim.Optimizer`` class) and scales each group's ``lr`` by a
    multiplier from a learned controller. See :mod:`nestopt.optim.nested`.

    Args:
        params: parameters or param-group dicts (a group may carry ``"depth"``, and whatever a
            feature object reads, such as ``"head"``).
        base: the optimizer class to wrap; ``base_kwargs`` go to it (``lr=...``, ``fused=True``...).
        controller: a :class:`~nestopt.nets.Controller` (its ``n_features`` must match the
            features), a path to a controller file (``nestopt meta-train --net controller`` writes
            one), or ``None`` for a fresh one.
        signal: ``"hindsight"``, ``"proxy"``, ``"validation"`` or ``"frozen"``.
        features: names from :data:`FEATURES` or :class:`Feature` objects (default: the
            controller's own, for one made for a given set such as a meta-trained one, else
            :data:`DEFAULT_FEATURES`).
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

    counter_reasons = ("controller_updates", "controller_skipped", "replays", "replay_steps", "replay_closures")
    counter_entry = "nested_counters"  # the groups are the base's too, which may keep "counters"
    group_spec = {"lr": number(0.0, LR_MAX)}  # the base's own values are the base's to check
    group_rules = (decay_within_rate,)

    def __init__(self, params: Iterable[Any], base: type[Optimizer] = torch.optim.AdamW, *,
                 controller: Controller | str | Path | None = None, signal: str = "hindsight",
                 features: Sequence[str | Feature] | None = None, mult_range: tuple[float, float] = (0.1, 10.0),
                 scratchpad: int = 0, hidden: int = 32, controller_lr: float = 3e-3, stats_every: int = 8,
                 window: int = 8, period: int = 32, grid: Sequence[float] = DEFAULT_GRID, label_shift: float = 2.0,
                 follow: float = 0.0, explore: float = 0.2,
                 seed: int = 0, per_tensor_groups: bool = False, process_group: Any = "auto",
                 capturable: bool | None = None, **base_kwargs: Any) -> None:
        if per_tensor_groups:
            params = list(params)
            if not any(isinstance(g, dict) for g in params):  # groups a user gave are kept as given
                n = len(params)
                params = [{"params": [p], "depth": i / max(n - 1, 1)} for i, p in enumerate(params)]
        if not (isinstance(base, type) and issubclass(base, Optimizer)):
            raise ValueError(f"base={base!r} is invalid: expected a torch.optim.Optimizer subclass")
        if issubclass(base, torch.optim.LBFGS) or getattr(base, "needs_loss", False):
            raise ValueError(f"base={base.__name__} is invalid: its step needs a closure or the loss, and the nested "
                             "optimizer steps its base without either (and replays it); use a base such as AdamW or SGD")
        for k, v in base_kwargs.items():  # the base checks its own; torch's accept inf for some
            finite(k, v)
        if "lr" in base_kwargs and not torch.is_tensor(base_kwargs["lr"]):
            check_number("lr", base_kwargs["lr"], lo=0.0, hi=LR_MAX)
        check_choice("signal", signal, SIGNALS)
        if isinstance(controller, str | Path):
            from ...nets import load_net

            try:
                controller = load_net(controller)
            except ValueError as e:
                raise ValueError(f"controller={str(controller)!r} is invalid: {e}") from None
            if not isinstance(controller, Controller):
                raise ValueError(f"controller file holds a {controller.config()['kind']} network, not a nested "
                                 "optimizer's controller")
        known = controller.features if isinstance(controller, Controller) else None
        if features is None:
            features = known if known is not None else DEFAULT_FEATURES
        feats = make_features(features)
        names = tuple(f.name for f in feats)
        if known is not None and names != known:
            raise ValueError(f"features={list(names)!r} is invalid for this controller: it was made for "
                             f"{list(known)}")
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
        check_int("seed", seed, lo=0, hi=2**63 - 1)  # torch's generators take a 64-bit seed
        check_int("scratchpad", scratchpad, lo=0, hi=1024)
        check_int("hidden", hidden, lo=1, hi=4096)
        n_features = sum(f.width for f in feats)
        if controller is None:
            controller = Controller(max(n_features, 1), hidden, scratchpad, seed=seed)
        if not isinstance(controller, Controller):
            raise ValueError(f"controller={controller!r} is invalid: expected a nestopt Controller")
        if controller.n_features != max(n_features, 1) or controller.scratchpad != scratchpad:
            raise ValueError(f"controller has n_features={controller.n_features}, scratchpad={controller.scratchpad}; "
                             f"the features {list(names)} need n_features={n_features}, scratchpad={scratchpad}")
        try:
            self.base = base(params, **base_kwargs)
        except Exception as e:  # the base's own checks (torch raises several types): name what it was given
            given = ", ".join(f"{k}={v!r}" for k, v in base_kwargs.items())
            raise ValueError(f"base={base.__name__} refused its arguments ({given or 'none'}): {e}") from None
        # what a step re-checks when a group's values change: lr, and every number the base reads
        # must be finite (module-level checks: this dict is pickled with the optimizer)
        self._step_checks = {"lr": rate, **{k: finite for k in self.base.defaults if k != "lr"}}
        self._base_keys = constructor_keys(self.base)  # found once: a changed group is checked often
        self._raw_base_step = raw_step(self.base)  # the base's step without torch's hook wrapper
        self._ready = False
        self.process_group = process_group
        self.capturable = capturable
        super().__init__(self.base.param_groups, dict(self.base.defaults))
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._ready = True
        self.features, self.features_on = feats, names
        self._reads = {f.reads for f in feats if f.reads}
        # columns of the raw features, which the running standardisation leaves as they are
        starts = [sum(f.width for f in feats[:i]) for i in range(len(feats))]
        self._raw_cols = [c for f, s in zip(feats, starts) if f.raw for c in range(s, s + f.width)]
        self.range = MultRange(lo, hi)
        self.stats_every = stats_every
        self.explore = explore
        self.signal = signal
        self.signal_impl: Signal = {
            "hindsight": lambda: Hindsight(window, period, grid_t, label_shift, follow, lo, hi),
            "proxy": lambda: Proxy(explore, seed), "validation": lambda: Validation(explore, seed),
            "frozen": Frozen}[signal]()
        self.controller = controller
        self.controller_opt = torch.optim.Adam(controller.parameters(), lr=controller_lr)
        self.norm = RunningNorm(max(n_features, 1))
        G = len(self.param_groups)
        self.memory = torch.zeros(G, controller.scratchpad)
        self.last_features = np.zeros((G, controller.n_features))
        self.last_raw: dict[str, list[float]] = {}
        self.loss_tracker = LossTracker()
        self._val: dict[str, float | None] = {"prev": None, "ema": None, "delta": 0.0, "gap": 0.0, "dev": 0.0}
        self._param_rms: list[float] = [0.0] * G
        self._update_ratio: list[float] = [0.0] * G
        for g in self.param_groups:
            g.setdefault("nested_mult", 1.0)
            ensure(g, self.counter_reasons, self.counter_entry)
            for f in feats:
                f.add_group()
        if capturable:
            device.check(self)

    def supported(self) -> frozenset[str]:
        return base_supports(self.__dict__.get("base"))

    @property
    def unsupported_why(self) -> dict[str, str]:  # type: ignore[override]
        return base_unsupported_why(self.base)

    def step_spec(self) -> dict[str, Any]:
        return self.__dict__.get("_step_checks") or self.group_spec

    def check_changed_group(self, group: dict[str, Any], where: str, spec: Any) -> None:
        check_group(group, where, spec)
        for rule in self.group_rules:
            rule(group, where)
        check_base_values(self.base, group, where, self.__dict__.setdefault("_base_seen", {}),
                          self.__dict__.get("_base_keys", ()))

    # -- plumbing ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:  # during Optimizer.__init__: the groups are the base's own dicts
            return super().add_param_group(param_group)
        where = f"param_groups[{len(self.param_groups)}]"
        self._check_params(param_group, where)
        spec = self.step_spec()
        check_group(param_group, where, {k: c for k, c in spec.items() if k in param_group})
        self.base.add_param_group(param_group)
        self.__dict__["_seen"] = None
        self.param_groups[-1].setdefault("nested_mult", 1.0)
        ensure(self.param_groups[-1], self.counter_reasons, self.counter_entry)
        self.memory = torch.cat([self.memory, torch.zeros(1, self.controller.scratchpad)])
        self.last_features = np.concatenate([self.last_features, np.zeros((1, self.controller.n_features))])
        self._param_rms.append(0.0)
        self._update_ratio.append(0.0)
        for f in self.features:
            f.add_group()
        self.signal_impl.reset()

    def _from_old_layout(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        nested, counts = old_layout(state_dict, self.signal)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:
            g[self.counter_entry] = dict(counts)
        groups[0]["nested"] = nested
        return {k: v for k, v in state_dict.items() if k != "nested"} | {"param_groups": groups}

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups: a copy would lack its base,
        # controller, features and signal. The unwrapped base step is looked up again on load.
        self._flush_device()
        return {**{k: v for k, v in self.__dict__.items()
                   if k not in ("_raw_base_step", "_sync", "_sync_for", "_pending", "_live", device.KEY,
                                "_device_controller", "_device_strides")},
                "_process_group": group_token(self.__dict__.get("_process_group", "auto"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "base" in state:
            self._raw_base_step = raw_step(self.base)

    @property
    def steps(self) -> int:
        """Steps taken (``counters["steps"]``, read without building the view)."""
        return self.param_groups[0][self.counter_entry]["steps"]

    def count(self, key: str) -> None:
        """Add one to ``key`` of the counters (every group's: counts of the whole optimizer)."""
        bump(self.param_groups, key, 1, self.counter_entry)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def _scale(self) -> float:
        """The share of the hindsight labels followed directly (1 unless ``follow > 0``)."""
        return self.signal_impl.scale

    @property
    def last_hindsight(self) -> dict[str, Any] | None:
        """The last hindsight replay's scores per grid multiplier and its label."""
        return getattr(self.signal_impl, "last", None)

    def cache_numel(self) -> int:
        """Elements held outside ``self.state``: the hindsight window's gradients and snapshot, and
        the curvature feature's previous gradient and parameters (0 when those are off)."""
        return self.signal_impl.cache_numel() + sum(f.cache_numel() for f in self.features)

    def multipliers(self) -> list[float]:
        """The multiplier each group stepped with last (1 before the first step)."""
        self._flush_device()
        return [g["nested_mult"] for g in self.param_groups]

    def _group_telemetry(self) -> dict[str, list[float]]:
        return {**super()._group_telemetry(), "mult": self.multipliers()}

    def telemetry(self) -> dict[str, float]:
        out = super().telemetry()
        last = self.last_hindsight
        if last is not None:
            out["hindsight_label"] = float(last["best"])
        return out

    def feature_table(self) -> dict[str, list[float]]:
        """Raw (unnormalised) features of the last step, per name, one value per group."""
        self._flush_device()
        return {k: list(v) for k, v in self.last_raw.items()}

    # -- validation ------------------------------------------------------------------------------
    def observe_validation(self, val_loss: float | torch.Tensor) -> None:
        """Feed a validation loss (call after each evaluation). Drives the ``val`` features and the
        ``"validation"`` signal; a non-finite value is ignored (counted)."""
        v = float(val_loss.detach()) if torch.is_tensor(val_loss) else float(val_loss)
        v = mean_values(self, [v])[0]  # each rank's own validation batch: the ranks' mean
        self._flush_device()  # the host values, which this updates (a capturable step re-reads them)
        self._drop_device()
        if not math.isfinite(v):
            self.count("controller_skipped")
            return
        st = self._val
        prev, ema = st["prev"], st["ema"]
        scale = max(abs(prev if prev is not None else v), 1e-12)
        st["delta"] = 0.0 if prev is None else (v - prev) / scale
        loss_ema = self.loss_tracker.ema
        st["gap"] = 0.0 if loss_ema is None else (v - loss_ema) / max(abs(v), 1e-12)
        st["ema"] = v if ema is None else 0.8 * ema + 0.2 * v
        st["dev"] = (v - st["ema"]) / max(abs(st["ema"]), 1e-12)
        self.signal_impl.on_validation(self, prev, v, scale)
        st["prev"] = v

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, loss: torch.Tensor | float | None = None,
             **inputs: Any) -> Any:
        """One step: features, controller, base step at ``lr * multiplier`` per group.

        ``closure`` (re-evaluates the loss and gradients) or ``loss`` (already backpropagated)
        gives the training loss; ``"hindsight"`` needs the closure, ``"proxy"`` needs one of them.
        Further keywords go to the features that read them (a feature's ``reads``), for example
        ``head_stats=`` for :class:`~nestopt.studies.head_features.HeadFeatures`: a value, or a
        function returning it, called after the closure (for values the closure computes).
        """
        unknown = set(inputs) - self._reads
        if unknown:
            raise TypeError(f"step() got {', '.join(sorted(unknown))}: no feature of this optimizer reads "
                            f"{'it' if len(unknown) == 1 else 'them'} (features read: {sorted(self._reads) or 'nothing'})")
        sig = self.signal_impl
        # micro-batch losses recorded since the last step (without a closure: now; with one, after it,
        # whose backward may record the last of them)
        observed = self.take_observed_loss() if closure is None else None
        if closure is None and loss is None and observed is None and (sig.needs_closure or sig.needs_loss) \
                and self._no_input_step():
            return None
        scorer = self.__dict__.pop("_scorer", None) if closure is None else None
        if sig.needs_closure and closure is None and scorer is None:
            raise ValueError("signal='hindsight' replays cached gradients and scores them with the closure: "
                             "call step(closure), or opt.score_with(fn) before step() (a loop that cannot hand "
                             "over a closure: Hugging Face's Trainer, GradScaler.step)")
        if scorer is not None:
            txn = current(self)
            if txn is not None:
                txn.on_rollback(lambda: self.__dict__.__setitem__("_scorer", scorer))
        if closure is not None:
            loss = evaluate(self, closure)
            observed = self.take_observed_loss()
        enter(self, "a feature's step input")
        inputs = {k: self._rank_mean(v() if callable(v) else v) for k, v in inputs.items()}
        enter(self, "the step's checks")
        if sig.needs_loss and loss is None and observed is None:
            raise ValueError("signal='proxy' needs the training loss: call step(closure) or step(loss=...)")
        groups = self.param_groups
        params = self._params()
        have = [[p for p in g["params"] if p.grad is not None] for g in groups]
        grads = [p.grad for ps in have for p in ps]
        if not grads:
            return loss
        refuse_sparse(self, grads)
        t = self.steps
        refresh = t % self.stats_every == 0
        sizes = [len(ps) for ps in have]
        # Read in reverse: the base optimizer then starts on the gradients read last (still cached).
        # the loss the features read: the recorded micro-batches' mean where there is one; the
        # hindsight replay scores against the closure's own value (the same batch as its replays)
        extra = tuple(x for x in (observed if observed is not None else loss,
                                  loss if observed is not None else None) if x is not None)
        if self._device_step(grads):
            device.step(self, extra[0] if extra else None)
            return loss
        # the one host sync of a step (over several ranks also its one collective: the loss
        # averaged, sharded norms summed; see nestopt.optim.distributed)
        gsq, vals = sq_norms(self, grads[::-1], *extra)
        gsq, loss_v = gsq[::-1], (vals[0] if vals else None)
        raw_v = vals[1] if len(vals) > 1 else loss_v
        pflat = [p for ps in have for p in ps]
        if not all(map(math.isfinite, gsq)) or (loss_v is not None and not math.isfinite(loss_v)):
            self.count("nonfinite")
            return loss
        txn = current(self)
        if txn is not None:  # from here the step changes the controller's state: keep a way back
            txn.on_rollback(self._undo_point())
        enter(self, "the features and the signal's update")
        numel = [p.numel() for p in pflat]
        g_rms, off = [], 0
        for k in sizes:
            s, c = sum(gsq[off:off + k]), sum(numel[off:off + k])
            g_rms.append(math.sqrt(s / c) if c else 0.0)
            off += k
        sig.before_features(self, loss_v)
        self.loss_tracker.observe(loss_v)
        view = StepView(groups, g_rms, self._param_rms, self._update_ratio, self.loss_tracker, self._val,
                        max(-self.range.log_lo, self.range.log_hi), inputs)
        x = self._normalise(self._features(view, have))
        if x is None:  # non-finite feature: keep the multipliers, step the base with them
            self.count("controller_skipped")
            commit(self, "the base optimizer's step")
            self._base_step([g["nested_mult"] for g in groups], refresh, pflat)
            self.count("steps")
            return loss
        enter(self, "the hindsight replay")
        # (with a scorer the replay scores the current parameters with it too: its batch, not the loss's)
        sig.replay(self, closure if closure is not None else scorer, raw_v if scorer is None else None, params)
        enter(self, "the controller")
        mem_in = self.memory
        z, mem = self.controller.forward_numpy(x, mem_in.double().numpy() if self.controller.scratchpad else None)
        logm = self.range.to_log_mult_numpy(z)
        xt = torch.from_numpy(x).float() if sig.trains else None
        noise = sig.noise(self, len(groups), xt, mem_in)
        logm = noisy(logm, noise, self.explore, self.range.log_lo, self.range.log_hi)
        if not np.isfinite(logm).all():
            self.count("controller_skipped")
            mults = [g["nested_mult"] for g in groups]  # as they were (the scale already in them)
            own = [m / sig.scale for m in mults]
        else:
            own = mults = np.exp(logm).tolist()
            if mem is not None:
                self.memory = torch.from_numpy(mem).float()
            if sig.scale != 1.0:  # the followed share of the hindsight labels, on top of the controller's
                mults = [self.range.clip(sig.scale * m) for m in mults]
        sig.after_decision(self, loss_v, xt, mem_in, own, mults, noise, params)
        commit(self, "the base optimizer's step")
        self._base_step(mults, refresh, pflat)
        self.count("steps")
        return loss

    def _device_step(self, grads: list[torch.Tensor]) -> bool:
        """Whether this step runs on the device (:mod:`.device`): ``capturable=True`` (checked), or
        ``None`` with CUDA parameters where the device step can run."""
        if self.__dict__.get("_capturable") is None and grads[0].device.type == "cuda":
            try:
                device.check(self)
            except ValueError:
                return False
        if not self.on_device(grads[:1]):
            return False
        device.check(self)
        return True

    # -- what a capturable step keeps on the device (see :mod:`.device`) ------------------------------
    def _flush_device(self) -> None:
        super()._flush_device()
        device.flush(self)

    def _has_device_values(self) -> bool:
        return super()._has_device_values() or device.KEY in self.__dict__

    def _drop_device(self) -> None:
        super()._drop_device()
        self.__dict__.pop(device.KEY, None)

    def score_with(self, fn: Callable[[], torch.Tensor]) -> None:
        """For the next step without a closure: ``fn()`` returns the loss on the current batch at the
        current parameters (no backward needed), which the hindsight replay scores its replays with.
        What a loop that calls ``step()`` itself uses in place of a closure (``NestoptTrainer`` for
        Hugging Face, a ``GradScaler`` loop); the step forgets it."""
        if not callable(fn):
            raise ValueError(f"fn={fn!r} is invalid: expected a function returning the loss")
        self.__dict__["_scorer"] = fn

    def _rank_mean(self, value: Any) -> Any:
        """A step input (a number, a tensor, or a list of numbers, such as head statistics) from
        each rank's own batch, averaged over the ranks (as it is without a sync)."""
        from ..distributed import sync_of

        if sync_of(self) is None:
            return value
        if torch.is_tensor(value):
            return torch.tensor(mean_values(self, value.detach().double().reshape(-1).tolist()),
                                dtype=value.dtype, device=value.device).reshape(value.shape)
        if isinstance(value, int | float):
            return mean_values(self, [float(value)])[0]
        if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
            return type(value)(mean_values(self, [float(v) for v in value]))
        if isinstance(value, list | tuple) and all(isinstance(r, list | tuple) and all(isinstance(v, int | float) for v in r)
                                                   for r in value):
            flat = mean_values(self, [float(v) for r in value for v in r])
            out, i = [], 0
            for r in value:
                out.append(type(r)(flat[i:i + len(r)]))
                i += len(r)
            return type(value)(out)
        raise TypeError(f"step input of type {type(value).__name__} cannot be averaged over the ranks: give a number, "
                        "a tensor or a list of numbers, or construct the optimizer with process_group=None")

    def _no_input_step(self) -> bool:
        """A step given neither closure nor loss, where its signal needs one: with every gradient
        ``None`` it does nothing (as torch's optimizers do); with every gradient zero it only makes
        the base optimizer's state, stepping it at rate 0 (what torch's distributed-checkpoint
        helpers ask of a fresh optimizer). ``False``: the step raises as usual."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return True
        if any(bool(local(g).any()) for g in grads):
            return False
        commit(self, "the base optimizer's state")
        saved = [g["lr"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["lr"] = 0.0 * g["lr"] if torch.is_tensor(g["lr"]) else 0.0
            call_step_unhooked(self.base, self._raw_base_step)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
        return True

    # -- a failed step puts everything back (see :mod:`.undo`) --------------------------------------
    def _undo_point(self) -> Callable[[], None]:
        return undo_point(self)

    def keep_controller(self) -> None:
        """Called before the controller trains inside a step (see :func:`.undo.keep_controller`)."""
        keep_controller(self)

    def _base_step(self, mults: list[float], refresh: bool, pflat: list[torch.Tensor]) -> None:
        for f in self.features:
            f.commit()
        sample = None
        if refresh and ("update_ratio" in self.features_on or "param_norm" in self.features_on):
            # The update's size from a fixed strided sample of each tensor (at most ~1024
            # elements each, weighted by the stride): no copy of the parameters is made.
            strides = [max(1, p.numel() // _SAMPLE) for p in pflat]
            sample = [sample_view(p, k).clone() for p, k in zip(pflat, strides)]
        step_scaled(self.base, self.param_groups, mults, self._raw_base_step)
        if sample is not None:
            after = [sample_view(p, k) for p, k in zip(pflat, strides)]
            n, off = len(pflat), 0
            diffs = [*torch._foreach_sub(after, sample), *sample]
            sharded = any(map(is_dtensor, pflat))
            host, _ = sq_norms(self, diffs, partial=True) if sharded else host_sq_norms(diffs)
            for i, g in enumerate(self.param_groups):
                k = sum(1 for p in g["params"] if p.grad is not None)
                d = sum(host[j] * strides[j] for j in range(off, off + k))
                q = sum(host[n + j] * strides[j] for j in range(off, off + k))
                c = sum(pflat[j].numel() for j in range(off, off + k))
                self._update_ratio[i] = math.sqrt(d / q) if q > 0 else 0.0
                self._param_rms[i] = math.sqrt(q / c) if c else 0.0  # of the parameters before the step
                off += k

    def _features(self, view: StepView, have: list[list[torch.Tensor]]) -> np.ndarray:
        G = len(self.param_groups)
        raw: dict[str, list[float]] = {}
        cols: list[list[list[float]]] = []
        for f in self.features:
            f.update(view, have)
            vals = f.values(view)
            raw[f.name] = [row[0] for row in vals]
            cols.append(vals)
        self.last_raw = raw
        if not cols:
            return np.zeros((G, 1))
        return np.array([[v for col in cols for v in col[i]] for i in range(G)], dtype=np.float64)

    def _normalise(self, x_raw: np.ndarray) -> np.ndarray | None:
        if not np.isfinite(x_raw).all():
            return None
        x = self.norm(x_raw)
        for c in self._raw_cols:  # already on a fixed scale: kept as they are
            x[:, c] = x_raw[:, c]
        self.last_features = x
        return x

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self, *, controller: bool = True) -> dict[str, Any]:
        """The base optimizer's ``state_dict``, with this optimizer's own state under
        ``param_groups[0]["nested"]`` (see :mod:`nestopt.optim.nested`). ``controller=False`` leaves out
        the controller's weights and its optimizer: loading such a state keeps the ones in use
        (how the meta-trainer rewinds a run while it changes the controller)."""
        self._flush_device()
        sd = self.base.state_dict()
        groups = [{k: (dict(v) if isinstance(v, dict) else v) for k, v in g.items()} for g in sd["param_groups"]]
        own = {"controller": copy.deepcopy(self.controller.state_dict()),
               "controller_opt": copy.deepcopy(self.controller_opt.state_dict())} if controller else {}
        groups[0]["nested"] = {
            **own,
            "norm": self.norm.state(),
            "memory": self.memory.clone(),
            "loss": self.loss_tracker.state_dict(),
            "val": dict(self._val),
            "param_rms": list(self._param_rms),
            "update_ratio": list(self._update_ratio),
            "last_features": torch.from_numpy(self.last_features.copy()),
            "features": {f.name: f.state_dict() for f in self.features},
            "signal": {"name": self.signal, **self.signal_impl.state_dict()},
            "n_params": len(self._params()),
        }
        groups[0]["nested"] = pack(groups[0]["nested"])
        return {**sd, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict={type(state_dict).__name__} is invalid for NestedOptimizer: expected the "
                             "dict its state_dict() returned")
        if "nested" in state_dict:  # saved before the optimizer was in parts (nestopt 407dc63 and earlier)
            state_dict = self._from_old_layout(state_dict)
        groups = [dict(g) for g in state_dict.get("param_groups", ())]
        nested = groups[0].pop("nested", None) if groups else None
        if nested is None:
            raise ValueError("state_dict is invalid for NestedOptimizer: its first param group has no 'nested' entry "
                             "(was it saved from the base optimizer?)")
        # the base's keys must all be there (its step reads them); the nested optimizer checks lr
        # only lr is required: a base saved by an older torch may lack keys its loader fills in
        check_loadable(self, {**state_dict, "param_groups": groups}, self.group_spec, self._known, shape_fits)
        nested = unpack(nested)
        params = self._params()
        if nested["n_params"] != len(params):
            raise ValueError(f"state_dict is for {nested['n_params']} parameters, this optimizer has {len(params)}")
        if nested["signal"]["name"] != self.signal:
            raise ValueError(f"state_dict is for signal={nested['signal']['name']!r}, this optimizer has "
                             f"signal={self.signal!r}")
        self.base.load_state_dict({**state_dict, "param_groups": groups})
        self.param_groups = self.base.param_groups  # torch replaces the list on load
        self.state = self.base.state
        if "controller" in nested:
            self.controller.load_state_dict(nested["controller"])
            self.controller_opt.load_state_dict(nested["controller_opt"])
        self.norm.load(nested["norm"])
        self.memory = nested["memory"].clone()
        for g in self.param_groups:
            ensure(g, self.counter_reasons, self.counter_entry)
        self.loss_tracker.load_state_dict(nested["loss"])
        self._val = dict(nested["val"])
        self._param_rms, self._update_ratio = list(nested["param_rms"]), list(nested["update_ratio"])
        self.last_features = nested["last_features"].double().numpy().copy()
        dev = params[0].device if params else torch.device("cpu")
        for f in self.features:
            f.load_state_dict(copy.deepcopy(nested["features"].get(f.name, f.state_dict())), dev)
        self.signal_impl.load_state_dict(nested["signal"], params)
        self._drop_device()
