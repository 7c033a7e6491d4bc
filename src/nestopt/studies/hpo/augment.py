"""Section 5a: a learned data-augmentation network (implicit hypergradients through its weights)
against no augmentation."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import functional as F

from ...hyper import Bilevel
from ...train import train_loop
from .data import digits_split, mlp, weights
from .weight_decay import RETRAIN_LR, RETRAIN_STEPS


def augmentation(seeds: tuple[int, ...] = (0, 1, 2), n_train: int = 100, hyper_steps: int = 60,
                 inner_steps: int = 20) -> dict[str, Any]:
    rows = []
    examples = None
    for seed in seeds:
        data = digits_split(seed)
        xt, yt = data["xt"][:n_train], data["yt"][:n_train]
        net = mlp((64, 32, 10), seed)
        init = weights(net)
        aug_net = mlp((64 + 8, 32, 64), 100 + seed)
        for prm in aug_net.parameters():
            prm.data.mul_(0.1)
        aug0 = weights(aug_net)
        noise_g = torch.Generator().manual_seed(seed)
        noise = {"z": torch.randn(n_train, 8, generator=noise_g)}

        def augment(h, x, z):
            return (x + torch.tanh(functional_call(aug_net, h, (torch.cat([x, z], 1),)))).clamp(0, 1)

        def inner(p, h):
            return F.cross_entropy(functional_call(net, p, (augment(h, xt, noise["z"]),)), yt) + \
                1e-4 * sum((v ** 2).sum() for v in p.values())

        def outer(p, h):
            return F.cross_entropy(functional_call(net, p, (data["xv"],)), data["yv"])

        t0 = time.perf_counter()
        b = Bilevel(inner, outer, init, aug0, method="implicit", horizon="continue", inner_steps=inner_steps,
                    inner_optimizer=lambda p: torch.optim.Adam(p, lr=RETRAIN_LR),
                    hyper_optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
                    solver_kwargs={"solver": "cg", "iters": 20, "damping": 1e-3, "max_residual": 0.5},
                    on_error="skip")
        for _ in range(hyper_steps):
            noise["z"] = torch.randn(n_train, 8, generator=noise_g)  # fresh augmentations each hyper step
            b.step()
        wall = time.perf_counter() - t0
        learned = b.hparams

        def train_eval(h):
            w = {k: v.clone().requires_grad_(True) for k, v in init.items()}
            opt = torch.optim.Adam(w.values(), lr=RETRAIN_LR)
            gz = torch.Generator().manual_seed(999)

            def loss(x_in: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(functional_call(net, w, (x_in,)), yt) + 1e-4 * sum((v ** 2).sum() for v in w.values())

            # each step's images: fresh augmentations (the batch, drawn before the step)
            train_loop(opt, RETRAIN_STEPS, loss, divergence=None, catch=(),
                       batch=lambda _: xt if h is None else augment(h, xt, torch.randn(n_train, 8, generator=gz)).detach())
            with torch.no_grad():
                return float((functional_call(net, w, (data["xs"],)).argmax(1) == data["ys"]).float().mean())

        rows.append({"seed": seed, "none": train_eval(None), "learned": train_eval(learned), "wall_s": wall,
                     "skipped": int(sum(r["skipped"] for r in b.history))})
        if examples is None:
            with torch.no_grad():
                examples = (xt[:8].clone(), augment(learned, xt[:8], torch.randn(8, 8, generator=noise_g)).clone())
    return {"rows": rows, "n_train": n_train, "examples": examples}
