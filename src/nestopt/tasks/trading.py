"""``trading-multihorizon``: the use case of the research notes, on synthetic price paths.

Market model (10-minute bars). A hidden regime ``k_t`` (calm, trending, turbulent) follows a
Markov chain with mean stay ``regime_stay`` bars. Returns are

    r_t = mu[k_t] + a_fast * s_t + a_slow * m_t + sigma[k_t] * eps_t

with ``s_t`` a fast AR(1) signal (half-life about 3 bars) and ``m_t`` a slow AR(1) signal
(half-life about 700 bars, i.e. days). The model sees noisy readings of both signals, past
returns over six windows (10 minutes to 7 days) and realised volatility over two windows, all
measured up to ``t`` only. Labels: for each horizon ``h`` in 10m, 1h, 4h, 1d, 3d, 7d, 14d, whether
the return over the next ``h`` bars is positive.

The data are 24 independent assets of 20,000 bars (about 139 days) each, sampled every 4th bar
(every 16th for validation); 16 assets train and 8 validate, so no label window crosses the split and the validation set
comes from the same market. (Paths much shorter than the 14-day horizon make every long-horizon
label of an asset nearly the same coin flip; we measured that and lengthened the paths.) A
logistic regression on these features reaches validation AUCs of about 0.60, 0.63, 0.57, 0.54,
0.56, 0.60, 0.62 from 10m to 14d: every head has some signal, none of it easy.

The model is a shared trunk (``F -> 64 -> 64``, GELU) with one logit head per horizon
(``model.trunk``, ``model.heads``), the loss the mean of the seven binary cross-entropies.
``head_losses`` gives the seven losses separately; ``evaluate`` reports per-horizon validation
losses and AUCs.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_int, check_number, check_seed
from .base import Sampler, Task, generator

HORIZON_NAMES = ("10m", "1h", "4h", "1d", "3d", "7d", "14d")
HORIZON_BARS = (1, 6, 24, 144, 432, 1008, 2016)
RETURN_WINDOWS = (1, 6, 24, 144, 432, 1008)
VOL_WINDOWS = (24, 144)


@dataclass(frozen=True)
class MarketConfig:
    n_bars: int = 20_000
    n_assets: int = 24
    n_train_assets: int = 16
    stride: int = 4
    val_stride: int = 16
    regime_stay: float = 3_000.0
    a_fast: float = 6e-4
    a_slow: float = 3e-5
    fast_phi: float = 0.8
    slow_phi: float = 0.999
    signal_noise: float = 1.0
    vol: tuple[float, float, float] = (1.0e-3, 1.5e-3, 3.0e-3)
    drift: tuple[float, float, float] = (0.0, 1e-5, -1e-5)
    seed: int = 7

    def __post_init__(self) -> None:
        check_int("n_assets", self.n_assets, lo=2)
        check_int("n_train_assets", self.n_train_assets, lo=1, hi=self.n_assets - 1)
        check_int("stride", self.stride, lo=1)
        check_int("val_stride", self.val_stride, lo=self.stride)
        if self.val_stride % self.stride:
            raise ValueError(f"val_stride={self.val_stride!r} is invalid: expected a multiple of stride={self.stride}")
        need = max(RETURN_WINDOWS) + max(HORIZON_BARS) + self.val_stride
        check_int("n_bars", self.n_bars, lo=need)  # a path must hold the longest window, horizon and a sample
        check_number("regime_stay", self.regime_stay, lo=1.0, lo_open=True)
        check_number("a_fast", self.a_fast)
        check_number("a_slow", self.a_slow)
        check_number("fast_phi", self.fast_phi, lo=0.0, hi=1.0, hi_open=True)
        check_number("slow_phi", self.slow_phi, lo=0.0, hi=1.0, hi_open=True)
        check_number("signal_noise", self.signal_noise, lo=0.0)
        for name, values, lo in (("vol", self.vol, 0.0), ("drift", self.drift, None)):
            if not isinstance(values, tuple | list) or len(values) != 3:
                raise ValueError(f"{name}={values!r} is invalid: expected three numbers (calm, trending, turbulent)")
            for i, v in enumerate(values):
                check_number(f"{name}[{i}]", v, lo=lo, lo_open=lo is not None)
        check_seed("seed", self.seed)


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Unit-variance AR(1) path."""
    from scipy.signal import lfilter  # scipy comes with scikit-learn

    e = rng.standard_normal(n) * np.sqrt(1.0 - phi**2)
    e[0] = rng.standard_normal()
    return lfilter([1.0], [1.0, -phi], e)


def _window_sum(c: np.ndarray, w: int) -> np.ndarray:
    """Sum of the ``w`` values ending at each index (prefix-sum ``c`` starts with 0)."""
    n = len(c) - 1
    idx = np.arange(n)
    lo = np.maximum(idx + 1 - w, 0)
    return c[idx + 1] - c[lo]


def _asset(rng: np.random.Generator, config: MarketConfig) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one asset's path."""
    n = config.n_bars
    p_stay = 1.0 - 1.0 / config.regime_stay
    switches = rng.random(n) > p_stay
    switches[0] = False
    jumps = rng.integers(1, 3, size=n)  # a switch moves to one of the two other regimes
    regime = (rng.integers(0, 3) + np.cumsum(switches * jumps)) % 3
    s = _ar1(rng, n, config.fast_phi)
    m = _ar1(rng, n, config.slow_phi)
    vol = np.asarray(config.vol)[regime]
    r = np.asarray(config.drift)[regime] + config.a_fast * s + config.a_slow * m + vol * rng.standard_normal(n)

    c = np.concatenate([[0.0], np.cumsum(r)])
    c2 = np.concatenate([[0.0], np.cumsum(r**2)])
    feats = [s + config.signal_noise * rng.standard_normal(n),
             m + config.signal_noise * rng.standard_normal(n)]
    feats += [_window_sum(c, w) / np.sqrt(w) for w in RETURN_WINDOWS]
    feats += [np.log(np.sqrt(_window_sum(c2, w) / w) + 1e-12) for w in VOL_WINDOWS]
    x = np.stack(feats, axis=1)
    t = np.arange(max(RETURN_WINDOWS), n - max(HORIZON_BARS), config.stride)
    y = np.stack([(c[t + 1 + h] - c[t + 1]) > 0 for h in HORIZON_BARS], axis=1).astype(np.float32)
    return x[t], y


@functools.lru_cache(maxsize=8)
def market_data(config: MarketConfig = MarketConfig()) -> dict[str, torch.Tensor]:
    """Features and labels, split by asset: the first ``n_train_assets`` paths train, the rest
    validate (independent paths of one market, so no label overlaps across the split)."""
    rng = np.random.default_rng(config.seed)
    parts = [_asset(rng, config) for _ in range(config.n_assets)]
    k = config.n_train_assets
    x_tr = np.concatenate([p[0] for p in parts[:k]])
    y_tr = np.concatenate([p[1] for p in parts[:k]])
    # Validation every val_stride-th sample: neighbouring bars carry nearly the same labels, and a
    # 4x smaller set makes each evaluation 4x cheaper (the bench evaluates 50 times a run).
    x_va = np.concatenate([p[0][::config.val_stride // config.stride] for p in parts[k:]])
    y_va = np.concatenate([p[1][::config.val_stride // config.stride] for p in parts[k:]])
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-12
    return {"x_train": torch.from_numpy(((x_tr - mu) / sd).astype(np.float32)), "y_train": torch.from_numpy(y_tr),
            "x_val": torch.from_numpy(((x_va - mu) / sd).astype(np.float32)), "y_val": torch.from_numpy(y_va)}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get average ranks); one sort."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor) or scores.numel() != labels.numel():
        n = [t.numel() if isinstance(t, torch.Tensor) else type(t).__name__ for t in (scores, labels)]
        raise ValueError(f"scores ({n[0]}) and labels ({n[1]}) are invalid: expected two tensors with one score per "
                         "label")
    s = scores.detach().double().flatten()
    y = labels.detach().flatten() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s_sorted, order = torch.sort(s)
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)  # average rank of each tie run
    return float((ranks[y[order]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class MultiHorizonModel(nn.Module):
    """Shared trunk, one binary logit head per horizon. ``forward`` returns ``(batch, heads)``."""

    def __init__(self, n_features: int, n_heads: int, width: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_features, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=-1)


class TradingTask(Task):
    kind = "trading"
    default_steps = 400
    batch_size = 256
    has_accuracy = True
    horizons = HORIZON_NAMES

    def __init__(self, config: MarketConfig = MarketConfig(), name: str = "trading-multihorizon") -> None:
        if not isinstance(config, MarketConfig):
            raise TypeError(f"config={config!r} is invalid: expected a MarketConfig")
        self.config = config
        self.name = name
        self.description = "synthetic 10-minute price paths, shared trunk + 7 horizon heads (10m..14d)"

    def data(self) -> dict[str, torch.Tensor]:
        return market_data(self.config)

    def init(self, seed: int) -> MultiHorizonModel:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MultiHorizonModel(self.data()["x_train"].shape[1], len(HORIZON_BARS))

    def sampler(self, seed: int) -> Sampler:
        d = self.data()
        x, y = d["x_train"], d["y_train"]
        g = generator(seed, stream=5)

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(x), (self.batch_size,), generator=g)
            return x[idx], y[idx]

        return next_batch

    def head_losses(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per-horizon binary cross-entropies, shape ``(7,)``."""
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").mean(0)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.head_losses(model, batch).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        d = self.data()
        was = model.training
        model.eval()
        logits = model(d["x_val"])
        model.train(was)
        y = d["y_val"]
        per_head = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        out: dict[str, float] = {"val_loss": float(per_head.mean()),
                                 "val_accuracy": float(((logits > 0).float() == y).float().mean())}
        for i, h in enumerate(HORIZON_NAMES):
            out[f"val_loss_{h}"] = float(per_head[i])
            out[f"val_auc_{h}"] = auc(logits[:, i], y[:, i])
        return out

    def info(self) -> dict:
        return {**super().info(), "horizons": list(HORIZON_NAMES), "market": asdict(self.config)}
