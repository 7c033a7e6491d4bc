"""``trading-daily``: one continuous synthetic market, refit every day on a trailing window.

The market (10-minute bars, 144 a day, ``n_days`` days, ``n_assets`` assets) has one hidden
regime shared by all assets (calm, trending, turbulent; a Markov chain with a mean stay of
``regime_stay_days``), and signal strengths that drift slowly: ``a_fast(t)`` and ``a_slow(t)`` are
their base values times ``exp(drift * z(t))``, ``z`` a unit-variance AR(1) with a half-life of
``drift_days``. Each asset's return is

    r_t = mu[k_t] + a_fast(t) * s_t + a_slow(t) * m_t + sigma[k_t] * eps_t

with ``s`` and ``m`` the fast and slow AR(1) signals of :mod:`.trading`, and the model sees the same
ten causal features as ``trading-multihorizon`` (noisy signal readings, six past-return windows,
two realised volatilities), sampled every ``stride`` bars.

Day ``d``'s refit (:class:`DailyTradingTask`, ``TradingDailyFamily().sample(d)``):

- trains on the samples of the trailing ``window_days`` days that end with day ``d``;
- uses a horizon's label only where it has closed by the end of day ``d`` (``mask``: a 14-day label
  of day ``d - 3`` is not yet known, so the 14-day head learns from older samples only; a head's
  loss averages over its known labels);
- standardises the features with the window's own mean and spread;
- validates on day ``d + 1`` (every label known: the evaluation looks ahead, the refit does not).

Everything of the refit is computed from the path cut at the end of day ``d``
(:func:`refit_arrays`), so no later price can reach it; ``tests/test_daily.py`` changes every price
after day ``d`` and checks the refit data bitwise. ``evaluate`` reports the validation loss, each
horizon's AUC and the next-day PnL of the position rule :func:`position` (in basis points).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_int, check_number, check_seed
from .base import Sampler, Task, TaskFamily, generator
from .trading import HORIZON_BARS, HORIZON_NAMES, RETURN_WINDOWS, VOL_WINDOWS, MultiHorizonModel, _ar1, auc

BARS_PER_DAY = 144
LONGEST = max(HORIZON_BARS)
MONITOR_DAYS = 17  # monitor_stats reads the window's last 17 days: every head has known labels there
MONITOR_EVERY = 12  # ... every 12th sample of them (about 2,400)


@dataclass(frozen=True)
class DailyMarketConfig:
    n_days: int = 120
    n_assets: int = 48
    window_days: int = 30
    stride: int = 4
    regime_stay_days: float = 6.0
    drift_days: float = 20.0
    drift: float = 0.5
    a_fast: float = 8e-4
    a_slow: float = 6e-5
    fast_phi: float = 0.8
    slow_phi: float = 0.999
    signal_noise: float = 1.0
    vol: tuple[float, float, float] = (1.0e-3, 1.5e-3, 3.0e-3)
    mu: tuple[float, float, float] = (0.0, 1e-5, -1e-5)
    seed: int = 11

    def __post_init__(self) -> None:
        check_int("n_assets", self.n_assets, lo=2)
        check_int("window_days", self.window_days, lo=1)
        check_int("stride", self.stride, lo=1, hi=BARS_PER_DAY)
        if BARS_PER_DAY % self.stride:
            raise ValueError(f"stride={self.stride!r} is invalid: expected a divisor of {BARS_PER_DAY} (bars a day)")
        need = LONGEST // BARS_PER_DAY + 3  # a refit day, its validation day and the longest horizon after it
        check_int("n_days", self.n_days, lo=need)
        check_number("regime_stay_days", self.regime_stay_days, lo=1.0 / BARS_PER_DAY, lo_open=True)
        check_number("drift_days", self.drift_days, lo=0.0, lo_open=True)
        check_number("drift", self.drift, lo=0.0)
        check_number("a_fast", self.a_fast)
        check_number("a_slow", self.a_slow)
        check_number("fast_phi", self.fast_phi, lo=0.0, hi=1.0, hi_open=True)
        check_number("slow_phi", self.slow_phi, lo=0.0, hi=1.0, hi_open=True)
        check_number("signal_noise", self.signal_noise, lo=0.0)
        for name, values, lo in (("vol", self.vol, 0.0), ("mu", self.mu, None)):
            if not isinstance(values, tuple | list) or len(values) != 3:
                raise ValueError(f"{name}={values!r} is invalid: expected three numbers (calm, trending, turbulent)")
            for i, v in enumerate(values):
                check_number(f"{name}[{i}]", v, lo=lo, lo_open=lo is not None)
        check_seed("seed", self.seed)

    @property
    def n_bars(self) -> int:
        return self.n_days * BARS_PER_DAY

    @property
    def days(self) -> range:
        """The days that can be refit and validated: day ``d + 1`` needs its 14-day labels."""
        return range(0, self.n_days - 1 - -(-LONGEST // BARS_PER_DAY))


@dataclass(frozen=True)
class MarketPath:
    """The raw market: ``returns``, ``fast`` and ``slow`` (signal readings the model sees), each
    ``(assets, bars)``; ``regime`` ``(bars,)``; the drifting strengths ``a_fast``, ``a_slow`` ``(bars,)``."""

    returns: np.ndarray
    fast: np.ndarray
    slow: np.ndarray
    regime: np.ndarray
    a_fast: np.ndarray
    a_slow: np.ndarray


@functools.lru_cache(maxsize=4)
def market_path(config: DailyMarketConfig = DailyMarketConfig()) -> MarketPath:
    """The market of ``config`` (deterministic in its seed)."""
    rng = np.random.default_rng(config.seed)
    n = config.n_bars
    stay = config.regime_stay_days * BARS_PER_DAY
    switches = rng.random(n) < 1.0 / stay
    switches[0] = False
    regime = (int(rng.integers(0, 3)) + np.cumsum(switches * rng.integers(1, 3, size=n))) % 3
    phi = 0.5 ** (1.0 / (config.drift_days * BARS_PER_DAY))
    a_fast = config.a_fast * np.exp(config.drift * _ar1(rng, n, phi))
    a_slow = config.a_slow * np.exp(config.drift * _ar1(rng, n, phi))
    vol, mu = np.asarray(config.vol)[regime], np.asarray(config.mu)[regime]
    rets, fast, slow = [], [], []
    for _ in range(config.n_assets):
        s, m = _ar1(rng, n, config.fast_phi), _ar1(rng, n, config.slow_phi)
        rets.append(mu + a_fast * s + a_slow * m + vol * rng.standard_normal(n))
        fast.append(s + config.signal_noise * rng.standard_normal(n))
        slow.append(m + config.signal_noise * rng.standard_normal(n))
    return MarketPath(np.stack(rets), np.stack(fast), np.stack(slow), regime, a_fast, a_slow)


def _features(returns: np.ndarray, fast: np.ndarray, slow: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``(assets * len(t), 10)`` causal features at bars ``t`` (asset-major): each reads bars ``<= t`` only."""
    c = np.concatenate([np.zeros((len(returns), 1)), np.cumsum(returns, axis=1)], axis=1)
    c2 = np.concatenate([np.zeros((len(returns), 1)), np.cumsum(returns**2, axis=1)], axis=1)
    cols = [fast[:, t], slow[:, t]]
    for w in RETURN_WINDOWS:
        cols.append((c[:, t + 1] - c[:, np.maximum(t + 1 - w, 0)]) / np.sqrt(w))
    for w in VOL_WINDOWS:
        lo = np.maximum(t + 1 - w, 0)
        n = (t + 1 - lo)[None, :]
        cols.append(np.log(np.sqrt((c2[:, t + 1] - c2[:, lo]) / n) + 1e-12))
    return np.stack(cols, axis=-1).reshape(-1, len(cols))


def _labels(returns: np.ndarray, t: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (return over the next ``h`` bars > 0) and their mask (closed before bar ``end``)."""
    c = np.concatenate([np.zeros((len(returns), 1)), np.cumsum(returns, axis=1)], axis=1)
    ys, ms = [], []
    for h in HORIZON_BARS:
        known = t + h < end
        hi = np.where(known, t + 1 + h, t + 1)  # an unknown label reads nothing past the cut
        ys.append(np.where(known[None, :], c[:, hi] - c[:, t + 1] > 0, False))
        ms.append(np.broadcast_to(known, (len(returns), len(t))))
    return (np.stack(ys, axis=-1).reshape(-1, len(HORIZON_BARS)).astype(np.float32),
            np.stack(ms, axis=-1).reshape(-1, len(HORIZON_BARS)))


def refit_arrays(path: MarketPath, config: DailyMarketConfig, day: int) -> dict[str, np.ndarray]:
    """Day ``day``'s refit data from ``path`` cut at the end of that day: ``x`` (standardised),
    ``y``, ``mask`` (labels known by then), and the standardisation ``mean`` and ``std``."""
    end = (day + 1) * BARS_PER_DAY
    cut = {k: getattr(path, k)[:, :end] for k in ("returns", "fast", "slow")}
    t = np.arange(max(0, day + 1 - config.window_days) * BARS_PER_DAY, end, config.stride)
    x = _features(cut["returns"], cut["fast"], cut["slow"], t)
    y, mask = _labels(cut["returns"], t, end)
    mean, std = x.mean(0), x.std(0) + 1e-12
    c = np.concatenate([np.zeros((len(cut["returns"]), 1)), np.cumsum(cut["returns"], axis=1)], axis=1)
    known = t + config.stride < end  # the holding period after a sample has closed
    hi = np.where(known, t + 1 + config.stride, t + 1)
    ret = np.where(known[None, :], c[:, hi] - c[:, t + 1], 0.0).reshape(-1)
    return {"x": ((x - mean) / std).astype(np.float32), "y": y, "mask": mask, "mean": mean, "std": std,
            "t": np.repeat(t[None, :], len(cut["returns"]), axis=0).reshape(-1), "ret": ret,
            "ret_known": np.broadcast_to(known, (len(cut["returns"]), len(t))).reshape(-1),
            "regime": regime_estimate(cut["returns"])}


def regime_estimate(returns: np.ndarray) -> np.ndarray:
    """The research note's market-regime estimate from recent returns (bars up to the cut only):
    log(realised volatility of the last day / of the last 20 days) and the last day's mean return
    over its volatility (a trend z-score), across assets."""
    last, month = returns[:, -BARS_PER_DAY:], returns[:, -20 * BARS_PER_DAY:]
    vol_day, vol_month = float(np.sqrt((last**2).mean())), float(np.sqrt((month**2).mean()))
    trend = float(last.mean() / (vol_day / np.sqrt(last.size) + 1e-12))
    return np.array([np.log((vol_day + 1e-12) / (vol_month + 1e-12)), trend])


def validation_arrays(path: MarketPath, config: DailyMarketConfig, day: int, mean: np.ndarray,
                      std: np.ndarray) -> dict[str, np.ndarray]:
    """Day ``day + 1``'s samples, standardised with the refit's ``mean`` and ``std``: ``x``, ``y``
    (every horizon known) and ``ret``, each sample's return over the next ``stride`` bars (the
    holding period of :func:`position`)."""
    t = np.arange((day + 1) * BARS_PER_DAY, (day + 2) * BARS_PER_DAY, config.stride)
    x = _features(path.returns, path.fast, path.slow, t)
    y, mask = _labels(path.returns, t, path.returns.shape[1])
    if not mask.all():
        raise ValueError(f"day={day!r} is invalid: day {day + 1}'s {HORIZON_NAMES[-1]} labels reach past the market's "
                         f"last day ({config.n_days - 1}); refit days are {config.days.start}..{config.days.stop - 1}")
    c = np.concatenate([np.zeros((len(path.returns), 1)), np.cumsum(path.returns, axis=1)], axis=1)
    ret = (c[:, t + 1 + config.stride] - c[:, t + 1]).reshape(-1)
    return {"x": ((x - mean) / std).astype(np.float32), "y": y, "ret": ret}


def position(logits: torch.Tensor) -> torch.Tensor:
    """The PnL's position rule: per sample, the mean over the heads of ``2 * sigmoid(z) - 1`` (in
    ``[-1, 1]``: long when the heads expect a rise), held for ``stride`` bars."""
    return (2.0 * torch.sigmoid(logits) - 1.0).mean(-1)


@functools.lru_cache(maxsize=256)
def _day(config: DailyMarketConfig, day: int) -> dict[str, torch.Tensor]:
    path = market_path(config)
    fit = refit_arrays(path, config, day)
    val = validation_arrays(path, config, day, fit["mean"], fit["std"])
    end = (day + 1) * BARS_PER_DAY
    recent = np.flatnonzero(fit["t"] >= end - MONITOR_DAYS * BARS_PER_DAY)[::MONITOR_EVERY]
    return {"x_train": torch.from_numpy(fit["x"]), "y_train": torch.from_numpy(fit["y"]),
            "mask_train": torch.from_numpy(np.ascontiguousarray(fit["mask"])),
            "x_val": torch.from_numpy(val["x"]), "y_val": torch.from_numpy(val["y"]),
            "ret_val": torch.from_numpy(val["ret"]), "monitor": torch.from_numpy(recent),
            "ret_train": torch.from_numpy(fit["ret"]), "ret_known": torch.from_numpy(np.ascontiguousarray(fit["ret_known"])),
            "regime": torch.from_numpy(fit["regime"])}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


class DailyTradingTask(Task):
    """Day ``day``'s refit of the multi-horizon model (see the module docstring)."""

    kind = "trading"
    default_steps = 150
    batch_size = 256
    horizons = HORIZON_NAMES

    def __init__(self, day: int, config: DailyMarketConfig = DailyMarketConfig()) -> None:
        if not isinstance(config, DailyMarketConfig):
            raise TypeError(f"config={config!r} is invalid: expected a DailyMarketConfig")
        days = config.days
        check_int("day", day, lo=days.start, hi=days.stop - 1)
        self.day, self.config = day, config
        self.name = f"trading-daily[day={day}]"
        self.description = f"day {day}'s refit on its trailing {config.window_days} days, validated on day {day + 1}"

    def data(self) -> dict[str, torch.Tensor]:
        return _day(self.config, self.day)

    def init(self, seed: int) -> MultiHorizonModel:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MultiHorizonModel(self.data()["x_train"].shape[1], len(HORIZON_BARS))

    def sampler(self, seed: int) -> Sampler:
        d = self.data()
        x, y, m = d["x_train"], d["y_train"], d["mask_train"]
        g = generator(seed, stream=6)

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(x), (self.batch_size,), generator=g)
            return x[idx], y[idx], m[idx]

        return next_batch

    def head_losses(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-horizon binary cross-entropies over the known labels, shape ``(7,)`` (0 for a head
        with no known label in the batch)."""
        x, y, mask = batch
        bce = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")
        w = mask.to(bce.dtype)
        return (bce * w).sum(0) / w.sum(0).clamp(min=1.0)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.head_losses(model, batch).mean()

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        """``evaluate(model)["val_loss"]`` alone (no AUCs, no PnL): what a curve needs at each point."""
        d = self.data()
        was = model.training
        model.eval()
        logits = model(d["x_val"])
        model.train(was)
        return float(nn.functional.binary_cross_entropy_with_logits(logits, d["y_val"], reduction="none").mean(0).mean())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        d = self.data()
        was = model.training
        model.eval()
        logits = model(d["x_val"])
        model.train(was)
        y = d["y_val"]
        per_head = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        pnl = (position(logits).double() * d["ret_val"]).sum() / self.config.n_assets
        out: dict[str, float] = {"val_loss": float(per_head.mean()), "val_pnl_bp": float(1e4 * pnl)}
        for i, h in enumerate(HORIZON_NAMES):
            out[f"val_loss_{h}"] = float(per_head[i])
            out[f"val_auc_{h}"] = auc(logits[:, i], y[:, i])
        return out

    @torch.no_grad()
    def monitor_stats(self, model: nn.Module) -> dict[str, list[float]]:
        """The research note's trading signals, from the refit's own data (the window's last
        ``MONITOR_DAYS`` days, known labels only; nothing of the validation day): per horizon
        ``loss``, ``auc`` and ``alignment`` (the correlation of the head's probability with its
        label), the simulated ``pnl`` of :func:`position` (bp per asset), and ``regime``
        (:func:`regime_estimate`)."""
        d = self.data()
        idx = d["monitor"]
        x, y, m = d["x_train"][idx], d["y_train"][idx], d["mask_train"][idx]
        was = model.training
        model.eval()
        logits = model(x)
        model.train(was)
        prob = torch.sigmoid(logits)
        loss, aucs, align = [], [], []
        for k in range(logits.shape[1]):
            known = m[:, k]
            zk, yk = logits[known, k], y[known, k]
            loss.append(float(nn.functional.binary_cross_entropy_with_logits(zk, yk)) if len(zk) else 0.0)
            a = auc(zk, yk) if len(zk) else float("nan")
            aucs.append(0.5 if a != a else a)
            align.append(_corr(prob[known, k].double(), yk.double()) if len(zk) > 1 else 0.0)
        held = d["ret_known"][idx]
        pnl = float((position(logits[held]).double() * d["ret_train"][idx][held]).sum()) / self.config.n_assets
        return {"loss": loss, "auc": aucs, "alignment": align, "pnl": [1e4 * pnl], "regime": d["regime"].tolist()}

    def info(self) -> dict:
        return {**super().info(), "day": self.day, "horizons": list(HORIZON_NAMES), "market": asdict(self.config)}


class TradingDailyFamily(TaskFamily):
    """``sample(day)``: day ``day``'s refit of one continuous market (``config``)."""

    name = "trading-daily"
    description = "daily refits of the multi-horizon model on one walk-forward market (sample(day))"

    def __init__(self, config: DailyMarketConfig = DailyMarketConfig()) -> None:
        if not isinstance(config, DailyMarketConfig):
            raise TypeError(f"config={config!r} is invalid: expected a DailyMarketConfig")
        self.config = config

    @property
    def days(self) -> range:
        return self.config.days

    def sample(self, seed: int) -> DailyTradingTask:
        return DailyTradingTask(seed, self.config)
