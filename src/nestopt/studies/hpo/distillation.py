"""Section 4: dataset distillation, one learned image per digit class against 10 random real images."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import functional as F

from ...hyper import unrolled_hypergradient
from .data import digits_split, mlp, seeded, weights


def distill(seeds: tuple[int, ...] = (0, 1, 2), outer_steps: int = 300, unroll: int = 30,
            eval_inits: int = 5) -> dict[str, Any]:
    rows = []
    images = None
    for seed in seeds:
        data = digits_split(seed)
        xtr = torch.cat([data["xt"], data["xv"]])  # distillation fits to 600 real digits
        ytr = torch.cat([data["yt"], data["yv"]])
        g = torch.Generator().manual_seed(seed)
        # start from 10 random real images, one per class: they are also the baseline, so the table shows
        # what distillation adds to them
        idx = [int(torch.nonzero(ytr == c)[torch.randint(0, int((ytr == c).sum()), (1,), generator=g)]) for c in range(10)]
        real = xtr[idx].clone()
        syn = {"x": real.clone(), "loglr": torch.tensor(math.log(0.3))}
        labels = torch.arange(10)
        net = mlp((64, 32, 10), seed)
        opt = torch.optim.Adam([syn["x"].requires_grad_(True), syn["loglr"].requires_grad_(True)], lr=0.01)

        def fresh(i: int) -> dict[str, torch.Tensor]:
            with seeded(10_000 * seed + i):
                for m in net:
                    if isinstance(m, torch.nn.Linear):
                        m.reset_parameters()
            return weights(net)

        def inner(p, h):
            return F.cross_entropy(functional_call(net, p, (h["x"],)), labels)

        def outer(p, h):
            return F.cross_entropy(functional_call(net, p, (xtr,)), ytr)

        t0 = time.perf_counter()
        for step in range(outer_steps):
            hg = unrolled_hypergradient(inner, outer, fresh(step), {k: v.detach() for k, v in syn.items()},
                                        steps=unroll, lr=lambda h: h["loglr"].exp())
            syn["x"].grad, syn["loglr"].grad = hg["x"], hg["loglr"]
            opt.step()
            with torch.no_grad():
                syn["x"].clamp_(0.0, 1.0)
        wall = time.perf_counter() - t0

        def evaluate(x, lr):
            accs = []
            for i in range(eval_inits):
                p = {k: v.requires_grad_(True) for k, v in fresh(1_000_000 + i).items()}
                for _ in range(unroll):
                    gr = torch.autograd.grad(F.cross_entropy(functional_call(net, p, (x,)), labels), list(p.values()))
                    p = {k: (v - lr * gi).detach().requires_grad_(True) for (k, v), gi in zip(p.items(), gr)}
                with torch.no_grad():
                    accs.append(float((functional_call(net, p, (data["xs"],)).argmax(1) == data["ys"]).float().mean()))
            return statistics.mean(accs)

        lr = float(syn["loglr"].detach().exp())
        distilled = evaluate(syn["x"].detach(), lr)
        # the same real images with the step size tuned for them over a grid (on the test split, which
        # favours the baseline)
        real_accs = {lr_: evaluate(real, lr_) for lr_ in (0.1, 0.3, 1.0, 3.0)}
        rows.append({"seed": seed, "distilled_acc": distilled, "learned_lr": lr, "real_acc_best_lr": max(real_accs.values()),
                     "real_acc_by_lr": real_accs, "wall_s": wall})
        if images is None:
            images = (syn["x"].detach().clone(), real.clone())
    return {"rows": rows, "unroll": unroll, "outer_steps": outer_steps, "images": images}
