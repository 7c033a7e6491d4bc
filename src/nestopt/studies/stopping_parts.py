"""The parts of ``nestopt study stopping``: the paper's backward training and price, the training arms
of the note's claims, pruning, and the noisy-label trading task.

- :func:`fit_backward`: Becker et al.'s method. On ``n_train`` simulated paths, the network of date
  ``N-1`` is trained first (Adam, the one training loop of :mod:`nestopt.train`), its hard decisions
  update each path's continuation reward, then date ``N-2`` (started from the weights of date
  ``N-1``), and so on to date ``1``; date ``0`` stops if ``g_0`` is at least the mean continuation.
- :func:`lower_bound`: the rule's mean reward on ``n_paths`` fresh paths, simulated from a seed no
  training path came from, with its standard error.
- :func:`train_arm`: one run of the joint task (:class:`~nestopt.tasks.stopping.StoppingTask`) by SGD
  with momentum as the note's arms set it up: ``plain`` (constant rate, nothing else),
  ``bema-clip`` (constant rate, clipping at ``1.0``, evaluated on the BEMA average), ``recipe``
  (:class:`~nestopt.schedule.LargeLRConfig`'s warmup and cosine stretched to the run, clipping,
  weight decay).
- :class:`NoisyTradingTask`: ``trading-multihorizon`` with each training label flipped at
  ``noise_rate`` (a fixed draw), the validation labels clean; ``loss="ce"`` or ``"jal"``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..losses import jal_loss
from ..optim import BEMA
from ..schedule import LargeLRConfig, LargeLRScheduler
from ..tasks.base import generator
from ..tasks.stopping import MaxCall, StoppingNets, StoppingTask, TradeExit, rule_rewards
from ..tasks.trading import HORIZON_NAMES, TradingTask, auc
from ..train import train_loop

ARMS = ("plain", "bema-clip", "recipe")


def fit_backward(problem: MaxCall | TradeExit, *, seed: int, n_train: int = 131_072, steps: int = 400,
                 batch: int = 8192, lr: float = 1e-3, width: int | None = None) -> dict[str, Any]:
    """Train the date networks backwards in time (see the module docstring)."""
    data = problem.simulate(n_train, seed=seed, stream=0)
    x, g = data["x"], data["g"]
    N = problem.dates
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nets = StoppingNets(problem.n_features, N, width or problem.n_features - 1 + 40)
    cf = g[:, N].clone()
    gen = generator(seed, stream=4)
    seconds = 0.0
    for n in range(N - 1, 0, -1):
        net = nets.nets[n - 1]
        if n < N - 1:
            net.load_state_dict(nets.nets[n].state_dict())
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
        xn, gn, c = x[:, n], g[:, n], cf

        def loss(idx: torch.Tensor, net: nn.Module = net, xn: torch.Tensor = xn, gn: torch.Tensor = gn,
                 c: torch.Tensor = c) -> torch.Tensor:
            p = net(xn[idx])
            gi, ci = gn[idx].float(), c[idx].float()
            return (torch.maximum(gi, ci) - (gi * p + ci * (1 - p))).mean()

        res = train_loop(opt, steps, loss, batch=lambda s: torch.randint(len(g), (batch,), generator=gen),
                         scheduler=sched, divergence=None)
        seconds += res.train_time
        net.eval()
        with torch.no_grad():
            cf = torch.where(net(xn) >= 0.5, gn, cf)
    nets.eval()
    start_stop = bool(problem.decide_at_start and float(g[0, 0]) >= float(cf.mean()))
    return {"nets": nets, "start_stop": start_stop, "train_seconds": seconds, "n_train": n_train, "steps": steps,
            "batch": batch, "lr": lr, "seed": seed, "in_sample": float(cf.mean())}


@torch.no_grad()
def lower_bound(problem: MaxCall | TradeExit, nets: StoppingNets, start_stop: bool, *, n_paths: int, seed: int,
                chunk: int = 262_144) -> dict[str, float]:
    """Mean reward and standard error of the rule on fresh paths (stream ``3`` of ``seed``)."""
    nets.eval()
    total, total2, n, done = 0.0, 0.0, 0, 0
    part = 0
    while done < n_paths:
        k = min(chunk, n_paths - done)
        d = problem.simulate(k, seed=seed, stream=3 + 1000 * part) if isinstance(problem, MaxCall) else \
            problem.simulate(None, seed=seed, stream=3 + part)
        r = d["g"][:, 0] if start_stop else rule_rewards(nets(d["x"]) >= 0.5, d["g"])
        total, total2, n = total + float(r.sum()), total2 + float((r * r).sum()), n + len(r)
        done += k if isinstance(problem, MaxCall) else n_paths
        part += 1
    mean = total / n
    var = max(total2 / n - mean * mean, 0.0)
    return {"mean": mean, "se": math.sqrt(var / n), "paths": n, "seed": seed}


def train_arm(task: StoppingTask, arm: str, lr: float, seed: int, steps: int, eval_every: int = 20,
              clip: float = 1.0) -> dict[str, Any]:
    """One run of ``arm`` (``plain``, ``bema-clip`` or ``recipe``) at ``lr``: the final value, the
    value curve, whether it diverged, and the model that was evaluated."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is invalid: expected one of {', '.join(ARMS)}")
    cfg = LargeLRConfig()
    model = task.init(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay if arm == "recipe" else 0.0)
    sched = LargeLRScheduler(opt, cfg.schedule(base_lr=lr, total=steps)) if arm == "recipe" else None
    avg = BEMA(model) if arm == "bema-clip" else None
    shown = avg.module if avg is not None else model
    curve: list[tuple[int, float]] = []

    def on_step(step: int, loss: float, r: Any) -> None:
        if avg is not None:
            avg.update_parameters(model)

    def evaluate() -> dict[str, float]:
        if not all(bool(torch.isfinite(p).all()) for p in shown.parameters()):
            return {"val_loss": math.inf, "val_value": -math.inf}
        return task.evaluate(shown)

    def on_eval(step: int, metrics: dict[str, float], r: Any) -> None:
        curve.append((step, metrics["val_value"]))

    res = train_loop(opt, steps, lambda b: task.loss(model, b), batch=task.sampler(seed),
                     clip_norm=clip if arm != "plain" else None, scheduler=sched, evaluate=evaluate,
                     eval_every=eval_every, on_step=on_step, on_eval=on_eval)
    value = curve[-1][1] if curve and not res.diverged else -math.inf
    return {"arm": arm, "lr": lr, "seed": seed, "steps": steps, "diverged": res.diverged,
            "value": value if math.isfinite(value) else None, "curve": [[s, v if math.isfinite(v) else None]
                                                                        for s, v in curve],
            "train_seconds": res.train_time, "model": shown}


def prune(model: nn.Module, fraction: float) -> nn.Module:
    """A copy of ``model`` with the ``fraction`` smallest-magnitude weights of its matrices set to zero
    (one threshold over all of them)."""
    pruned = copy.deepcopy(model)
    ws = [p for p in pruned.parameters() if p.dim() >= 2]
    mags = torch.cat([w.detach().abs().flatten() for w in ws])
    k = int(fraction * mags.numel())
    if k > 0:
        cut = torch.kthvalue(mags, k).values
        with torch.no_grad():
            for w in ws:
                w.mul_((w.abs() > cut).to(w.dtype))
    return pruned


@torch.no_grad()
def rewards(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each path's reward under ``model``'s hard rule (from date 1)."""
    was = model.training
    model.eval()
    r = rule_rewards(model(data["x"]) >= 0.5, data["g"])
    model.train(was)
    return r


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over the same paths."""
    d = (a - b).double()
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def fixed_rules(data: dict[str, torch.Tensor]) -> dict[str, float]:
    """The value of always exiting on day ``k`` (``k = 1..N``) and of perfect foresight."""
    g = data["g"]
    out = {f"day {k}": float(g[:, k].mean()) for k in range(1, g.shape[1])}
    out["perfect foresight"] = float(g[:, 1:].max(1).values.mean())
    return out


class NoisyTradingTask(TradingTask):
    """``trading-multihorizon`` with training labels flipped at ``noise_rate`` (one fixed draw per
    task, seed ``flip_seed``); validation labels stay clean. ``loss`` is ``"ce"`` (binary
    cross-entropy) or ``"jal"`` (:func:`nestopt.losses.jal_loss`, one binary problem per head)."""

    def __init__(self, noise_rate: float, loss: str = "ce", flip_seed: int = 0, a: float = 5.0,
                 alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__(name=f"trading-noisy-{noise_rate:g}-{loss}")
        if not 0.0 <= noise_rate < 0.5:
            raise ValueError(f"noise_rate={noise_rate!r} is invalid: expected a number in [0, 0.5)")
        if loss not in ("ce", "jal"):
            raise ValueError(f"loss={loss!r} is invalid: expected ce or jal")
        self.noise_rate, self.kind_of_loss, self.jal = noise_rate, loss, {"a": a, "alpha": alpha, "beta": beta}
        y = super().data()["y_train"]
        g = generator(flip_seed, stream=13)
        flip = torch.rand(y.shape, generator=g) < noise_rate
        self.y_noisy = torch.where(flip, 1.0 - y, y)
        self.flipped = float(flip.float().mean())

    def sampler(self, seed: int):  # type: ignore[no-untyped-def]
        d = self.data()
        x, y = d["x_train"], self.y_noisy
        g = generator(seed, stream=5)

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(x), (self.batch_size,), generator=g)
            return x[idx], y[idx]

        return next_batch

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.kind_of_loss == "ce":
            return super().loss(model, batch)
        x, y = batch
        return jal_loss(model(x).reshape(-1), y.reshape(-1), **self.jal)

    def clean_auc(self, model: nn.Module) -> float:
        m = self.evaluate(model)
        return sum(m[f"val_auc_{h}"] for h in HORIZON_NAMES) / len(HORIZON_NAMES)


def train_noisy(noise_rate: float, loss: str, seed: int, steps: int = 400, lr: float = 3e-3) -> dict[str, Any]:
    """AdamW on the noisy-label task; the clean-label validation AUC (mean over the horizons)."""
    task = NoisyTradingTask(noise_rate, loss)
    model = task.init(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    res = train_loop(opt, steps, lambda b: task.loss(model, b), batch=task.sampler(seed), divergence=None)
    return {"noise": noise_rate, "loss": loss, "seed": seed, "steps": steps, "lr": lr,
            "flipped": task.flipped, "auc": task.clean_auc(model), "train_seconds": res.train_time}

