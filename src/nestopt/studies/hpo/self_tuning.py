"""Section 5b: a self-tuning network for dropout and weight decay against a 4x4 grid."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn import functional as F

from ...hyper import SelfTuningMLP, STNTrainer
from ...train import train_loop
from .data import digits_split, seeded


def stn_vs_grid(seeds: tuple[int, ...] = (0, 1, 2), steps: int = 600) -> dict[str, Any]:
    wds = (1e-5, 1e-4, 1e-3, 1e-2)
    dps = (0.0, 0.2, 0.4, 0.6)
    rows = []
    for seed in seeds:
        data = digits_split(seed)
        t0 = time.perf_counter()
        grid = {}
        for wd in wds:
            for dp in dps:
                grid[(wd, dp)] = _train_plain(data, wd, dp, steps, seed)
        grid_wall = time.perf_counter() - t0
        best = min(grid, key=lambda k: grid[k]["val_loss"])
        with seeded(seed):  # the initialisation, the perturbations and dropout
            model = SelfTuningMLP([64, 64, 10])
            trainer = STNTrainer(model, weight_decay=1e-3, dropout=0.2, lr=3e-3, hyper_lr=3e-2, train_steps=1)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step((data["xt"], data["yt"]), (data["xv"], data["yv"]))
            stn_wall = time.perf_counter() - t0
            with torch.no_grad():
                logits = trainer.predict(data["xs"])
                stn_acc = float((logits.argmax(1) == data["ys"]).float().mean())
        rows.append({"seed": seed, "grid_best": {"weight_decay": best[0], "dropout": best[1], **grid[best]},
                     "grid_wall_s": grid_wall, "stn_test_acc": stn_acc, "stn_wall_s": stn_wall,
                     "stn_final": trainer.hparams,
                     "stn_path": [(r["weight_decay"], r["dropout"]) for r in trainer.history[::10]],
                     "grid": [{"weight_decay": k[0], "dropout": k[1], **v} for k, v in grid.items()]})
    return {"rows": rows, "steps": steps}


def _train_plain(data, wd: float, dp: float, steps: int, seed: int) -> dict[str, float]:
    with seeded(seed):  # the initialisation and dropout
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(dp), torch.nn.Linear(64, 10))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        n = data["xt"].shape[0]

        def loss(_: int) -> torch.Tensor:
            pen = sum((m.weight ** 2).sum() for m in net if isinstance(m, torch.nn.Linear))
            return F.cross_entropy(net(data["xt"]), data["yt"]) + wd * pen / n

        train_loop(opt, steps, loss, divergence=None, catch=())
    net.eval()
    with torch.no_grad():
        return {"val_loss": float(F.cross_entropy(net(data["xv"]), data["yv"])),
                "test_acc": float((net(data["xs"]).argmax(1) == data["ys"]).float().mean())}
