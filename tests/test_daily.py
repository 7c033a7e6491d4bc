"""The walk-forward market (``trading-daily``): no look-ahead, the label masks, the family and its
day ranges, and a user's family by import path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import nestopt.tasks as T
from nestopt.tasks import daily
from nestopt.tasks.base import Task, TaskFamily

SMALL = daily.DailyMarketConfig(n_days=40, n_assets=4, window_days=10, seed=3)
B = daily.BARS_PER_DAY


def _path_changed_after(path: daily.MarketPath, bar: int, seed: int = 0) -> daily.MarketPath:
    """``path`` with every return and signal reading from ``bar`` on replaced by other values."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in dataclasses.fields(path):
        a = getattr(path, f.name).copy()
        if a.ndim == 2:
            a[:, bar:] = rng.standard_normal(a[:, bar:].shape) * (a.std() + 1.0)
        out[f.name] = a
    return daily.MarketPath(**out)


@pytest.mark.parametrize("day", [0, 5, 12, 20])
def test_no_look_ahead_changing_any_later_price_leaves_the_refit_data_bitwise_unchanged(day):
    path = daily.market_path(SMALL)
    before = daily.refit_arrays(path, SMALL, day)
    after = daily.refit_arrays(_path_changed_after(path, (day + 1) * B), SMALL, day)
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), k
        assert before[k].tobytes() == after[k].tobytes(), k


def test_the_look_ahead_test_would_notice_a_change_inside_the_window():
    """The control: a price of the refit day's last sampled bar does change the refit data."""
    path = daily.market_path(SMALL)
    day = 12
    before = daily.refit_arrays(path, SMALL, day)
    after = daily.refit_arrays(_path_changed_after(path, (day + 1) * B - SMALL.stride), SMALL, day)
    assert not np.array_equal(before["x"], after["x"])
    assert not np.array_equal(before["regime"], after["regime"])


def test_a_label_is_known_only_once_its_horizon_has_closed():
    day = 20
    fit = daily.refit_arrays(daily.market_path(SMALL), SMALL, day)
    end = (day + 1) * B
    for k, h in enumerate(daily.HORIZON_BARS):
        np.testing.assert_array_equal(fit["mask"][:, k], fit["t"] + h < end)
    # the example: a 14-day label of day d - 3 is not yet known; one of day d - 15 is
    k14 = daily.HORIZON_NAMES.index("14d")
    assert not fit["mask"][fit["t"] // B == day - 3, k14].any()
    assert fit["mask"][fit["t"] // B == day - 15, k14].all()
    # unknown labels are zeros, not tomorrow's outcome
    assert (fit["y"][~fit["mask"]] == 0).all()


def test_labels_and_validation_are_the_returns_they_name():
    path = daily.market_path(SMALL)
    day = 20
    fit = daily.refit_arrays(path, SMALL, day)
    i = int(np.flatnonzero(fit["mask"][:, 3])[7])  # a known 1-day label
    asset, t = i // (len(fit["t"]) // SMALL.n_assets), int(fit["t"][i])
    assert fit["y"][i, 3] == float(path.returns[asset, t + 1:t + 1 + 144].sum() > 0)
    val = daily.validation_arrays(path, SMALL, day, fit["mean"], fit["std"])
    assert len(val["x"]) == SMALL.n_assets * B // SMALL.stride
    first = (day + 1) * B
    assert val["ret"][0] == pytest.approx(path.returns[0, first + 1:first + 1 + SMALL.stride].sum())
    np.testing.assert_allclose(fit["x"].mean(0), 0.0, atol=1e-4)  # standardised by the window's own statistics


def test_the_window_trails_the_day():
    fit = daily.refit_arrays(daily.market_path(SMALL), SMALL, 20)
    assert fit["t"].min() == (20 + 1 - SMALL.window_days) * B and fit["t"].max() < 21 * B
    assert daily.refit_arrays(daily.market_path(SMALL), SMALL, 2)["t"].min() == 0  # a short history: what there is


def test_the_family_samples_days_and_refuses_days_it_cannot_validate():
    fam = daily.TradingDailyFamily(SMALL)
    assert fam.days == range(0, SMALL.n_days - 15)
    task = fam.sample(7)
    assert task.day == 7 and task.name == "trading-daily[day=7]"
    with pytest.raises(ValueError, match="day=25"):
        fam.sample(25)
    a, b = fam.sample(7).init(1), fam.sample(7).init(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_head_losses_average_known_labels_only():
    task = daily.DailyTradingTask(10, SMALL)
    model = task.init(0)
    x, y, m = task.sampler(0)(0)
    m = m.clone()
    m[:, 6] = False  # no known 14-day label in this batch
    y2 = y.clone()
    y2[:, 6] = 1 - y2[:, 6]  # so its labels must not matter
    losses = task.head_losses(model, (x, y, m))
    assert losses[6] == 0
    assert torch.equal(losses, task.head_losses(model, (x, y2, m)))
    losses.mean().backward()
    assert torch.count_nonzero(model.heads[6].weight.grad) == 0


def test_evaluate_and_monitor_stats():
    task = daily.DailyTradingTask(10, SMALL)
    model = task.init(0)
    ev = task.evaluate(model)
    assert {"val_loss", "val_pnl_bp", "val_auc_14d", "val_loss_10m"} <= set(ev)
    assert task.validation_loss(model) == ev["val_loss"]  # the curves' fast path measures the same loss
    st = task.monitor_stats(model)
    assert len(st["loss"]) == len(st["auc"]) == len(st["alignment"]) == 7
    assert len(st["regime"]) == 2 and len(st["pnl"]) == 1
    # the monitor reads the refit's data only: tomorrow's validation set does not enter it
    d = task.data()
    saved = d["x_val"].clone()
    d["x_val"].normal_()
    try:
        assert task.monitor_stats(model) == st
    finally:
        d["x_val"].copy_(saved)


def test_position_rule():
    z = torch.tensor([[10.0] * 7, [-10.0] * 7, [0.0] * 7])
    assert torch.allclose(daily.position(z), torch.tensor([1.0, -1.0, 0.0]), atol=1e-4)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="stride=5"):
        daily.DailyMarketConfig(stride=5)
    with pytest.raises(ValueError, match="n_days=10"):
        daily.DailyMarketConfig(n_days=10)


# -- the registry: a family's days, and a user's family by import path -----------------------------

class CountingTask(Task):
    """A tiny day task: regression of y = day * x."""

    default_steps = 20
    batch_size = 8

    def __init__(self, day: int) -> None:
        self.day = day
        self.name = f"counting[day={day}]"

    def init(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(1, 1)

    def sampler(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        return lambda step: torch.randn(self.batch_size, 1, generator=g)

    def loss(self, model, batch):
        return ((model(batch) - self.day * batch) ** 2).mean()

    def evaluate(self, model):
        x = torch.linspace(-1, 1, 16)[:, None]
        with torch.no_grad():
            return {"val_loss": float(((model(x) - self.day * x) ** 2).mean())}


class CountingFamily(TaskFamily):
    name = "counting"
    days = range(0, 10)

    def sample(self, seed: int) -> Task:
        return CountingTask(seed)


def test_a_family_by_import_path_and_a_day_range():
    fam = T.family(f"{__name__}:CountingFamily")
    assert isinstance(fam, CountingFamily)
    ranged = T.family(f"{__name__}:CountingFamily@2:5")
    assert [ranged.sample(s).day for s in range(5)] == [2, 3, 4, 2, 3]
    assert [T.family("trading-daily@0:60").sample(s).day for s in (0, 59, 60, 61)] == [0, 59, 0, 1]


@pytest.mark.parametrize("spec, match", [
    ("trading-daily@5:3", "LO:HI"), ("trading-daily@x", "LO:HI"), ("trading-daily@0:500", "has days 0:105"),
    ("nestopt_no_such_module:Fam", "cannot be imported"), (f"{__name__}:CountingTask", "not a nestopt.tasks.TaskFamily"),
    ("nope", "unknown task family"),
])
def test_bad_family_specs_say_what_is_wrong(spec, match):
    with pytest.raises(KeyError, match=match):
        T.family(spec)
