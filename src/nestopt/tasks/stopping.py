"""Deep optimal stopping (Becker, Cheridito & Jentzen, JMLR 2019): two problems and their tasks.

A stopping problem has dates ``0..N`` and, on each simulated path, a reward ``g[n]`` for stopping
at date ``n`` and the features ``x[n]`` known then. One small network per date ``n = 1..N-1``
gives the probability ``F_n(x_n)`` of stopping (two hidden layers of ``d + 40`` units, ReLU, batch
norm, a sigmoid output, as in the paper); the rule stops at the first date with ``F_n >= 1/2``
(date ``N`` always stops). The paper trains ``F_n`` backwards in time, ``n = N-1`` first, to
maximise ``E[g_n F_n + g_tau(n+1) (1 - F_n)]``, ``tau(n+1)`` the stopping date of the later,
already trained rules. The value of any rule on fresh paths is a lower bound of the optimal value.

Problems (:class:`MaxCall`, :class:`TradeExit`):

- **Bermudan max-call** on ``d`` assets, the paper's setting: geometric Brownian motions under the
  pricing measure, rate ``r = 5%``, dividend yield ``10%``, volatility ``20%``, strike ``100``,
  maturity ``3`` years, ``9`` exercise dates, discounted payoff ``e^{-r t} (max_i S_i - K)^+``.
  Features: the sorted log-moneyness ``log(S_i / K)`` and the payoff over ``K``. At date ``0``
  the price is ``max(g_0, E[g_tau(1)])``.
- **Trade exit** on the synthetic market of :mod:`.trading` (its regime chain, fast and slow
  signals and volatilities): a long position opened at a bar is closed on one of the days
  ``1..max_holding_days``; the reward is the position's return since entry, in percent. Features:
  the noisy signal readings, the return since entry and over the last day, the log realised
  volatility of the last day, and the day.

Tasks (:class:`StoppingTask`, registered as ``stopping-maxcall-d2``, ``stopping-maxcall-d5`` and
``stopping-exit``) train all date networks at once, so any optimizer of the benchmark can: the loss
on a batch of training paths is, summed over the dates, the regret of the soft decision against
the better of stopping and continuing, ``max(g_n, c_n) - (g_n F_n + c_n (1 - F_n))``, with the
continuation ``c_n = g_tau(n+1)`` taken from the current networks' hard decisions (no gradient).
Its gradient is the paper's; the backward-in-time training of the paper is
:func:`nestopt.studies.stopping_parts.fit_backward`. ``evaluate`` reports the value of the hard rule on
held-out paths (``val_value``, and ``val_price`` for the max-call) and ``val_loss``, the regret of
the rule against perfect foresight, ``E[max_n g_n - g_tau]``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_int, check_number, check_seed
from .base import Sampler, Task, generator
from .trading import MarketConfig, _ar1

# The reference values of the paper's table (Becker et al. 2019, Bermudan max-call, r=5%, delta=10%,
# sigma=20%, K=100, T=3, N=9): (d, S0) -> (their own lower bound L where we have it, the reference
# value the paper compares with, what that reference is). For d = 2 the paper's reference is the
# binomial lattice value (Andersen & Broadie); its own estimates of those three we could not read
# from the paper's text here, so they are left out rather than guessed. For d = 5 the literature
# gives an interval; the reference is the paper's lower bound inside it.
PAPER_MAXCALL: dict[tuple[int, int], tuple[float | None, float, str]] = {
    (2, 90): (None, 8.075, "binomial"),
    (2, 100): (None, 13.902, "binomial"),
    (2, 110): (None, 21.345, "binomial"),
    (5, 100): (26.149, 26.149, "paper L (literature interval 26.147-26.211)"),
}
BARS_PER_DAY = 144


@dataclass(frozen=True)
class MaxCall:
    """The Bermudan max-call of the paper on ``d`` assets started at ``s0``."""

    d: int = 2
    s0: float = 100.0
    rate: float = 0.05
    dividend: float = 0.10
    vol: float = 0.20
    strike: float = 100.0
    maturity: float = 3.0
    dates: int = 9

    def __post_init__(self) -> None:
        check_int("d", self.d, lo=1)
        check_number("s0", self.s0, lo=0.0, lo_open=True)
        check_number("rate", self.rate)
        check_number("dividend", self.dividend, lo=0.0)
        check_number("vol", self.vol, lo=0.0, lo_open=True)
        check_number("strike", self.strike, lo=0.0, lo_open=True)
        check_number("maturity", self.maturity, lo=0.0, lo_open=True)
        check_int("dates", self.dates, lo=1)

    decide_at_start = True  # x_0 is the same on every path: date 0 compares g_0 with the mean continuation

    @property
    def n_features(self) -> int:
        return self.d + 1

    def prices(self, n: int, seed: int, stream: int = 0) -> torch.Tensor:
        """``(n, dates + 1, d)`` asset prices at the dates (float64)."""
        check_int("n", n, lo=1)
        g = generator(seed, stream=stream)
        dt = self.maturity / self.dates
        z = torch.randn(n, self.dates, self.d, generator=g, dtype=torch.float64)
        steps = (self.rate - self.dividend - 0.5 * self.vol ** 2) * dt + self.vol * math.sqrt(dt) * z
        logs = torch.cat([torch.zeros(n, 1, self.d, dtype=torch.float64), steps.cumsum(1)], dim=1)
        return self.s0 * logs.exp()

    def rewards(self, s: torch.Tensor) -> torch.Tensor:
        t = torch.arange(self.dates + 1, dtype=s.dtype) * (self.maturity / self.dates)
        return torch.exp(-self.rate * t) * (s.max(-1).values - self.strike).clamp_min(0.0)

    def features(self, s: torch.Tensor) -> torch.Tensor:
        logm = torch.log(s / self.strike).sort(-1, descending=True).values
        pay = (s.max(-1).values - self.strike).clamp_min(0.0) / self.strike
        return torch.cat([logm, pay[..., None]], -1).float()

    def simulate(self, n: int, seed: int, stream: int = 0) -> dict[str, torch.Tensor]:
        """``x``: ``(n, dates + 1, features)`` float32; ``g``: ``(n, dates + 1)`` float64 rewards."""
        s = self.prices(n, seed, stream)
        return {"x": self.features(s), "g": self.rewards(s)}


@dataclass(frozen=True)
class TradeExit:
    """When to close a long position within ``max_holding_days`` on the :mod:`.trading` market.

    Positions open every ``entry_stride`` bars on ``n_assets`` independent paths of ``n_bars``
    bars; ``vol_scale`` multiplies the three regime volatilities (``2`` is the out-of-distribution
    regime of the study)."""

    max_holding_days: int = 7
    n_assets: int = 48
    n_bars: int = 12_000
    entry_stride: int = 24
    vol_scale: float = 1.0
    market: MarketConfig = MarketConfig()

    decide_at_start = False  # a position is held at least one day

    def __post_init__(self) -> None:
        check_int("max_holding_days", self.max_holding_days, lo=1)
        check_int("n_assets", self.n_assets, lo=1)
        check_int("entry_stride", self.entry_stride, lo=1)
        check_number("vol_scale", self.vol_scale, lo=0.0, lo_open=True)
        need = (self.max_holding_days + 1) * BARS_PER_DAY + 1
        check_int("n_bars", self.n_bars, lo=need)
        if not isinstance(self.market, MarketConfig):
            raise TypeError(f"market={self.market!r} is invalid: expected a MarketConfig")

    @property
    def dates(self) -> int:
        return self.max_holding_days

    n_features = 7

    def _asset(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cfg, n = self.market, self.n_bars
        switches = rng.random(n) > 1.0 - 1.0 / cfg.regime_stay
        switches[0] = False
        regime = (rng.integers(0, 3) + np.cumsum(switches * rng.integers(1, 3, size=n))) % 3
        s, m = _ar1(rng, n, cfg.fast_phi), _ar1(rng, n, cfg.slow_phi)
        vol = self.vol_scale * np.asarray(cfg.vol)[regime]
        r = np.asarray(cfg.drift)[regime] + cfg.a_fast * s + cfg.a_slow * m + vol * rng.standard_normal(n)
        s_read = s + cfg.signal_noise * rng.standard_normal(n)
        m_read = m + cfg.signal_noise * rng.standard_normal(n)
        c = np.concatenate([[0.0], np.cumsum(r)])
        c2 = np.concatenate([[0.0], np.cumsum(r ** 2)])
        day, k = BARS_PER_DAY, self.max_holding_days
        t0 = np.arange(day, n - k * day - 1, self.entry_stride)
        t = t0[:, None] + day * np.arange(k + 1)[None, :]  # the bar of each date (its close known)
        since = c[t + 1] - c[t0 + 1][:, None]
        last = c[t + 1] - c[t + 1 - day]
        rv = np.sqrt((c2[t + 1] - c2[t + 1 - day]) / day)
        x = np.stack([m_read[t], s_read[t], 100 * since / np.sqrt(1 + np.arange(k + 1)), 100 * last,
                      np.log(rv * 1e3), np.broadcast_to(np.arange(k + 1) / k, t.shape), np.ones(t.shape)], -1)
        return x, 100 * since

    def simulate(self, n: int | None = None, seed: int = 0, stream: int = 0) -> dict[str, torch.Tensor]:
        """Every entry of ``n_assets`` fresh paths (``n`` keeps the first ``n``): ``x``, ``g`` as for
        :class:`MaxCall`; ``g[:, 0] = 0``."""
        rng = np.random.default_rng([check_seed("seed", seed), stream, 0x57])
        parts = [self._asset(rng) for _ in range(self.n_assets)]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float()
        g = torch.from_numpy(np.concatenate([p[1] for p in parts])).double()
        if n is not None:
            x, g = x[:n], g[:n]
        return {"x": x, "g": g}


class DateNet(nn.Module):
    """The paper's per-date network: ``in -> w -> w -> 1``, batch norm and ReLU, sigmoid probability."""

    def __init__(self, n_in: int, width: int, batch_norm: bool = True) -> None:
        super().__init__()
        norm = (lambda k: nn.BatchNorm1d(k)) if batch_norm else (lambda k: nn.Identity())
        self.net = nn.Sequential(norm(n_in), nn.Linear(n_in, width), norm(width), nn.ReLU(),
                                 nn.Linear(width, width), norm(width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).squeeze(-1)


class StoppingNets(nn.Module):
    """One :class:`DateNet` per decision date ``1..N-1`` (``nets[n - 1]`` decides at date ``n``)."""

    def __init__(self, n_in: int, dates: int, width: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.dates = dates
        self.nets = nn.ModuleList(DateNet(n_in, width, batch_norm) for _ in range(dates - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stop probabilities ``(batch, dates - 1)`` for the features ``(batch, dates + 1, F)``."""
        return torch.stack([net(x[:, n]) for n, net in enumerate(self.nets, start=1)], dim=1)


def continuation(stop: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``c[:, n] = g_tau(n+1)`` for ``n = 0..N-1`` from hard decisions ``stop`` ``(batch, N-1)`` at dates ``1..N-1``."""
    dates = g.shape[1] - 1
    c = torch.empty(g.shape[0], dates, dtype=g.dtype)
    cf = g[:, dates]
    for n in range(dates - 1, -1, -1):
        c[:, n] = cf
        if n >= 1:
            cf = torch.where(stop[:, n - 1], g[:, n], cf)
    return c


def rule_rewards(stop: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The reward of the rule on each path, stopping from date 1 on (date 0 is the caller's)."""
    return continuation(stop, g)[:, 0]


def soft_regret(probs: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Mean over paths, summed over dates ``1..N-1``, of ``max(g_n, c_n) - (g_n F_n + c_n (1 - F_n))``."""
    gn, cn = g[:, 1:-1].to(probs.dtype), c[:, 1:].to(probs.dtype)
    return (torch.maximum(gn, cn) - (gn * probs + cn * (1 - probs))).sum(1).mean()


@functools.lru_cache(maxsize=8)
def _paths(problem: MaxCall | TradeExit, n: int, seed: int, stream: int) -> dict[str, torch.Tensor]:
    return problem.simulate(n, seed, stream)


class StoppingTask(Task):
    """All date networks of a stopping problem trained at once (see the module docstring)."""

    kind = "stopping"
    default_steps = 300
    has_accuracy = False

    def __init__(self, problem: MaxCall | TradeExit, name: str, n_train: int = 65_536, n_val: int = 65_536,
                 batch_size: int = 1024, data_seed: int = 11) -> None:
        if not isinstance(problem, MaxCall | TradeExit):
            raise TypeError(f"problem={problem!r} is invalid: expected a MaxCall or a TradeExit")
        check_int("n_train", n_train, lo=2)
        check_int("n_val", n_val, lo=2)
        check_int("batch_size", batch_size, lo=2)
        self.problem, self.name = problem, name
        self.n_train, self.n_val, self.batch_size, self.data_seed = n_train, n_val, batch_size, data_seed
        self.description = (f"deep optimal stopping, {type(problem).__name__}: one network per date, trained "
                            "jointly on the regret of each decision")

    def width(self) -> int:
        return self.problem.n_features - 1 + 40 if isinstance(self.problem, MaxCall) else 32

    def train_data(self) -> dict[str, torch.Tensor]:
        return _paths(self.problem, self.n_train, self.data_seed, 0)

    def val_data(self) -> dict[str, torch.Tensor]:
        return _paths(self.problem, self.n_val, self.data_seed, 1)  # another stream: never trained on

    def init(self, seed: int) -> StoppingNets:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return StoppingNets(self.problem.n_features, self.problem.dates, self.width())

    def sampler(self, seed: int) -> Sampler:
        d = self.train_data()
        g = generator(seed, stream=9)
        n = len(d["g"])

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(n, (self.batch_size,), generator=g)
            return d["x"][idx], d["g"][idx]

        return next_batch

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, g = batch
        probs = model(x)
        c = continuation(probs.detach() >= 0.5, g)
        return soft_regret(probs, g, c)

    @torch.no_grad()
    def value(self, model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """The hard rule's value on ``data`` (mean and standard error), its regret and, for the
        max-call, the price ``max(g_0, value)``."""
        was = model.training
        model.eval()
        stop = model(data["x"]) >= 0.5
        model.train(was)
        r = rule_rewards(stop, data["g"])
        out = {"val_value": float(r.mean()), "val_value_se": float(r.std() / math.sqrt(len(r))),
               "val_loss": float((data["g"].max(1).values - r).mean()),
               "val_stop_day": float((stop.float().cumsum(1) == 0).sum(1).float().add(1).mean())}
        if self.problem.decide_at_start:
            out["val_price"] = max(float(data["g"][0, 0]), out["val_value"])
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.value(model, self.val_data())

    def info(self) -> dict:
        return {**super().info(), "problem": {k: v for k, v in asdict(self.problem).items() if k != "market"}}


def maxcall_task(d: int, s0: float = 100.0) -> StoppingTask:
    return StoppingTask(MaxCall(d=d, s0=s0), name=f"stopping-maxcall-d{d}")


def exit_task(**problem: object) -> StoppingTask:
    """The trade-exit task: training entries from one set of asset paths, validation from another."""
    return StoppingTask(TradeExit(**problem), name="stopping-exit", n_train=1_000_000, n_val=1_000_000,  # all entries
                        batch_size=512)
