"""Supervised tasks on data that ships with scikit-learn (nothing is downloaded).

- ``digits-logreg``: multinomial logistic regression on the 8x8 digits;
- ``digits-mlp``: a 2-layer MLP (64 -> 64 -> 10, ReLU) on digits;
- ``digits-cnn``: a small CNN (two 3x3 convolutions with 8 and 16 channels, then a linear layer)
  on digits; :func:`digits_cnn` takes other channel widths (the ``digits-cnn`` family varies them);
- ``wide-mlp``: a wide MLP (64 -> 960 -> 960 -> 10, ReLU: 994,570 parameters, about 1M) on digits,
  100 steps of batch 64: heavily over-parameterised for 1,297 training images, and the largest
  model of the suite, so an optimizer's per-parameter state and work are felt most here;
- ``diabetes-mlp``: a regression MLP (10 -> 32 -> 1, tanh) on the diabetes data, MSE on a
  standardised target.

Every split is fixed (a stratified shuffle seeded by a constant), inputs are standardised with
training statistics only, and minibatches are drawn with replacement from a generator seeded by
the run seed.

``digits-cnn`` and ``wide-mlp`` carry an absolute quality ``goal`` (a validation accuracy and
loss that tuned AdamW reaches within ``default_steps`` on the tested seeds 0-2, with margin);
variants built with other arguments carry none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .._checks import check_callable, check_int, check_seed
from .base import Sampler, Task, evaluate_classifier, generator

_SPLIT_SEED = 20240601

# Absolute quality goals: what tuned AdamW reaches on the tested seeds (0-2) within the task's default
# budget, with margin (tests/test_workloads.py checks it at AdamW's best grid rate).
DIGITS_CNN_GOAL = {"val_accuracy": 0.95, "val_loss": 0.15}
WIDE_MLP_GOAL = {"val_accuracy": 0.95, "val_loss": 0.15}


def _split(n: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return perm[n_val:], perm[:n_val]


@functools.lru_cache(maxsize=None)
def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: 1,297 / 500 digits, pixels standardised to the
    training mean and standard deviation (one scalar each, so images keep their shape)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    tr, va = _split(len(x), 500)
    mu, sd = x[tr].mean(), x[tr].std()
    x = (x - mu) / sd
    return (torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
            torch.from_numpy(x[va]), torch.from_numpy(y[va]))


@functools.lru_cache(maxsize=None)
def diabetes_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: 342 / 100 patients, features and target
    standardised with training statistics."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.float32)
    tr, va = _split(len(x), 100)
    mu, sd = x[tr].mean(0), x[tr].std(0)
    ymu, ysd = y[tr].mean(), y[tr].std()
    x = (x - mu) / sd
    y = (y - ymu) / ysd
    return (torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
            torch.from_numpy(x[va]), torch.from_numpy(y[va]))


class ArrayTask(Task):
    """A task over in-memory tensors ``(x_train, y_train, x_val, y_val)`` and a model builder."""

    def __init__(self, name: str, data: Callable[[], tuple[torch.Tensor, ...]],
                 build: Callable[[], nn.Module], *, classification: bool, steps: int,
                 batch_size: int, description: str, kind: str,
                 goal: dict[str, float] | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name={name!r} is invalid: expected a string")
        check_callable("data", data, "a function () -> (x_train, y_train, x_val, y_val)")
        check_callable("build", build, "a function () -> nn.Module")
        check_int("steps", steps, lo=1)
        check_int("batch_size", batch_size, lo=1)
        self.name = name
        self._data = data
        self._build = build
        self.classification = classification
        self.has_accuracy = classification
        self.default_steps = steps
        self.batch_size = batch_size
        self.description = description
        self.kind = kind
        self.goal = None if goal is None else {str(k): float(v) for k, v in dict(goal).items()}

    def data(self) -> tuple[torch.Tensor, ...]:
        return self._data()

    def init(self, seed: int) -> nn.Module:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._build()

    def sampler(self, seed: int) -> Sampler:
        x, y = self.data()[:2]
        g = generator(seed, stream=3)
        n, b = len(x), self.batch_size

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(n, (b,), generator=g)
            return x[idx], y[idx]

        return next_batch

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if self.classification:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(-1), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        xv, yv = self.data()[2:]
        if self.classification:
            return evaluate_classifier(model, xv, yv)
        was = model.training
        model.eval()
        loss = nn.functional.mse_loss(model(xv).squeeze(-1), yv)
        model.train(was)
        return {"val_loss": float(loss)}


class DigitsCNN(nn.Module):
    """conv3x3(``c1``) - ReLU - conv3x3 stride 2 (``c2``) - ReLU - linear, on 8x8 digits."""

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        check_int("c1", c1, lo=1)
        check_int("c2", c2, lo=1)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, stride=2)
        self.head = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def digits_logreg() -> ArrayTask:
    return ArrayTask("digits-logreg", digits_data, lambda: nn.Linear(64, 10), classification=True,
                     steps=300, batch_size=64, kind="classification",
                     description="multinomial logistic regression on sklearn digits")


def digits_mlp(width: int = 64, depth: int = 1, activation: type[nn.Module] = nn.ReLU,
               name: str = "digits-mlp", steps: int = 500, batch_size: int = 64) -> ArrayTask:
    check_int("width", width, lo=1)
    check_int("depth", depth, lo=0)
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise TypeError(f"activation={activation!r} is invalid: expected an nn.Module class (nn.ReLU, nn.Tanh, ...)")

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        d = 64
        for _ in range(depth):
            layers += [nn.Linear(d, width), activation()]
            d = width
        layers.append(nn.Linear(d, 10))
        return nn.Sequential(*layers)

    return ArrayTask(name, digits_data, build, classification=True, steps=steps,
                     batch_size=batch_size, kind="classification",
                     description=f"MLP 64-{'-'.join([str(width)] * depth)}-10 ({activation.__name__}) on digits")


def digits_cnn(c1: int = 8, c2: int = 16, name: str = "digits-cnn", steps: int = 400,
               batch_size: int = 64) -> ArrayTask:
    """The digits CNN with ``c1`` and ``c2`` channels; the defaults are the ``digits-cnn`` task
    (the only variant with a ``goal``)."""
    check_int("c1", c1, lo=1)
    check_int("c2", c2, lo=1)
    default = (c1, c2, name, steps, batch_size) == (8, 16, "digits-cnn", 400, 64)
    return ArrayTask(name, digits_data, functools.partial(DigitsCNN, c1, c2), classification=True, steps=steps,
                     batch_size=batch_size, kind="classification",
                     description=f"CNN conv3x3({c1})-conv3x3/2({c2})-linear on 8x8 digits",
                     goal=DIGITS_CNN_GOAL if default else None)


def wide_mlp() -> ArrayTask:
    """``wide-mlp``: :func:`digits_mlp` with two hidden layers of 960 (994,570 parameters)."""
    task = digits_mlp(width=960, depth=2, name="wide-mlp", steps=100, batch_size=64)
    task.goal = dict(WIDE_MLP_GOAL)
    task.description = "wide MLP 64-960-960-10 (ReLU, ~1M parameters) on digits"
    return task


def diabetes_mlp() -> ArrayTask:
    return ArrayTask("diabetes-mlp", diabetes_data,
                     lambda: nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)),
                     classification=False, steps=400, batch_size=32, kind="regression",
                     description="regression MLP 10-32-1 (tanh) on sklearn diabetes, MSE")
