"""Task families: distributions over task variants, for meta-training and held-out tests.

``sample(seed)`` is deterministic: the same seed gives the same task (same structure, same data).

- ``quadratic``: rotated quadratics, dimension 2 to 32, condition number 1 to 1e4 (log-uniform);
- ``teacher-mlp``: regression on generated data, a random tanh teacher network and a student
  MLP of random width;
- ``digits-mlp``: digits MLPs of random width (16 to 128), depth (1 or 2), activation and batch size;
- ``digits-cnn``: the digits CNN with random channel widths (conv1 4, 8 or 16; conv2 8, 16 or 32)
  and batch size (32, 64 or 128);
- ``gru-seq``: the GRU temporal-order task with random hidden size (16, 32 or 64), sequence length
  (12 to 32) and batch size (32, 64 or 128);
- ``trading``: multi-horizon trading tasks on markets with random signal strengths and volatility.

(The ``logic-gates`` family lives with its task, in :mod:`nestopt.tasks.logic_gates`.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .._checks import check_seed
from .analytic import RotatedQuadratic
from .base import Task, TaskFamily
from .sequence import gru_sequence
from .supervised import ArrayTask, digits_cnn, digits_mlp
from .trading import MarketConfig, TradingTask


class QuadraticFamily(TaskFamily):
    name = "quadratic"
    description = "rotated quadratics, dim 2-32, condition number 1-1e4"

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng(check_seed("seed", seed))
        dim = int(rng.integers(2, 33))
        cond = float(10 ** rng.uniform(0.0, 4.0))
        task = RotatedQuadratic(cond=cond, dim=dim, structure_seed=seed)
        task.name = f"quadratic[dim={dim},cond={cond:.3g}]"
        return task


def teacher_regression(seed: int) -> ArrayTask:
    """Regression on 512 + 256 generated points labelled by a random tanh teacher, plus noise."""
    rng = np.random.default_rng(check_seed("seed", seed))
    d_in = int(rng.integers(4, 17))
    width = int(rng.choice([16, 32, 64]))
    noise = float(rng.uniform(0.0, 0.3))
    x = rng.standard_normal((768, d_in)).astype(np.float32)
    w1 = rng.standard_normal((d_in, 16)) / math.sqrt(d_in)
    w2 = rng.standard_normal(16) / 4.0
    y = (np.tanh(x @ w1) @ w2 + noise * rng.standard_normal(768)).astype(np.float32)
    y = (y - y[:512].mean()) / (y[:512].std() + 1e-8)
    data = (torch.from_numpy(x[:512]), torch.from_numpy(y[:512]), torch.from_numpy(x[512:]), torch.from_numpy(y[512:]))
    return ArrayTask(f"teacher-mlp[in={d_in},width={width},noise={noise:.2f}]", lambda: data,
                     lambda: nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, 1)),
                     classification=False, steps=300, batch_size=32, kind="regression",
                     description="student MLP on a random tanh teacher")


class TeacherMLPFamily(TaskFamily):
    name = "teacher-mlp"
    description = "regression on generated teacher-network data, random sizes and noise"

    def sample(self, seed: int) -> Task:
        return teacher_regression(seed)


class DigitsMLPFamily(TaskFamily):
    name = "digits-mlp"
    description = "digits MLPs with random width, depth, activation and batch size"

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng(check_seed("seed", seed))
        width = int(rng.choice([16, 32, 64, 128]))
        depth = int(rng.integers(1, 3))
        act = [nn.ReLU, nn.Tanh, nn.GELU][int(rng.integers(0, 3))]
        batch = int(rng.choice([32, 64, 128]))
        return digits_mlp(width, depth, act, name=f"digits-mlp[w={width},d={depth},{act.__name__},b={batch}]",
                          steps=300, batch_size=batch)


class DigitsCNNFamily(TaskFamily):
    name = "digits-cnn"
    description = "digits CNNs with random channel widths and batch size"

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng(check_seed("seed", seed))
        c1 = int(rng.choice([4, 8, 16]))
        c2 = int(rng.choice([8, 16, 32]))
        batch = int(rng.choice([32, 64, 128]))
        return digits_cnn(c1, c2, name=f"digits-cnn[c1={c1},c2={c2},b={batch}]", steps=300, batch_size=batch)


class GRUSeqFamily(TaskFamily):
    name = "gru-seq"
    description = "GRU temporal-order tasks with random hidden size, sequence length and batch size"

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng(check_seed("seed", seed))
        hidden = int(rng.choice([16, 32, 64]))
        length = int(rng.integers(12, 33))
        batch = int(rng.choice([32, 64, 128]))
        return gru_sequence(hidden, length, name=f"gru-seq[h={hidden},len={length},b={batch}]", steps=200,
                            batch_size=batch)


class TradingFamily(TaskFamily):
    name = "trading"
    description = "multi-horizon trading on markets with random signal strengths and volatility"

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng(check_seed("seed", seed))
        base = float(rng.uniform(0.7e-3, 1.5e-3))
        cfg = MarketConfig(a_fast=float(rng.uniform(3e-4, 9e-4)), a_slow=float(rng.uniform(1e-5, 6e-5)),
                           vol=(base, 1.5 * base, 3.0 * base), seed=int(seed) + 10_000)
        return TradingTask(cfg, name=f"trading[a_fast={cfg.a_fast:.1e},a_slow={cfg.a_slow:.1e}]")
