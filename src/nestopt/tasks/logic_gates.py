r"""``logic-gates``: a polynomial-attention network learns the truth table of a fixed set of gates.

**Data.** Every one of the ``2^n`` input vectors of ``n`` bits, encoded ``+-1`` (``+1`` is true),
and as targets the outputs of a fixed list of boolean gates, each over fixed bits, also ``+-1``.
The default (``n = 6``, 8 gates)::

    AND(b0, b1)  OR(b2, b3)  XOR(b4, b5)  NAND(b1, b2)  NOR(b3, b4)  XNOR(b0, b5)  MAJ(b0, b2, b4)  XOR(b1, b3, b5)

Train and validation are the *same* rows, all ``2^n`` of them: the task is to learn one exact
function (the truth table), there is no unseen input to generalise to, and holding rows out would
only make some gates unidentifiable (a gate's table has 4 or 8 cells). Training is full-batch
(``batch_size = 2^n``, the sampler returns the whole table every step), so a rise of the training
loss is the optimizer's doing, never a new minibatch's.

**Loss.** Mean squared error on the ``+-1`` targets, averaged over rows and outputs. Every gate is
a polynomial of degree at most 3 in the ``+-1`` bits (``XOR(a, b) = -ab``,
``MAJ(a, b, c) = (a + b + c - abc) / 2``), which the network can represent, so the minimum
``f* = 0`` is attainable: the value Polyak's rule with ``f_star = 0`` aims at. ``evaluate`` returns
``val_loss`` (the same MSE on all rows) and ``val_accuracy``, the fraction of output bits whose
sign is right.

**Model** (:class:`PolyAttention`, "polynomial attention"). Each input bit is a token; token
``i`` is ``x_i = b_i * e + p_i`` with a learned value embedding ``e`` and learned position
embeddings ``p_i`` (width ``d``). Each of ``depth`` layers is softmax-free attention

.. math::  x \leftarrow x + \frac{(x W_q)(x W_k)^\top}{L} (x W_v)

over the ``L = n`` tokens, so a layer adds a homogeneous cubic in its input (no softmax, no
normalisation, no bias) and the network's output has degree up to ``3^depth`` in the bits (27 at
depth 3). The read-out is a linear map from the mean of the tokens to the gate outputs. The
weights start at ``N(0, init_scale^2 / d)`` so the cubic terms are small against the residual at
init (``init_scale = 1``: a layer's update is 0.2 to 0.4 of its input's norm). Every layer's
tensors are separate and named by layer (``embed.value``, ``embed.pos``, ``layers.0.q``,
``layers.0.k``, ``layers.0.v``, ..., ``readout.weight``, ``readout.bias``), so per-layer
gradient norms can be read from ``named_parameters()`` (:func:`layer_of` maps a name to its layer).

:func:`logic_gates` with its defaults is the ``logic-gates`` task (the only variant with a
``goal``); :class:`LogicGatesFamily` samples the number of bits, the gates, the depth and the
width from a seed.

    >>> task = logic_gates()
    >>> model = task.init(0)
    >>> loss = task.loss(model, task.sampler(0)(0))
    >>> sorted(task.evaluate(model))
    ['val_accuracy', 'val_loss']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._checks import check_int, check_number, check_seed
from .base import Sampler, Task, TaskFamily

# name -> (arity, truth function on boolean arrays)
GATES: dict[str, tuple[int, Callable[..., np.ndarray]]] = {
    "AND": (2, lambda a, b: a & b),
    "OR": (2, lambda a, b: a | b),
    "XOR": (2, lambda a, b: a ^ b),
    "NAND": (2, lambda a, b: ~(a & b)),
    "NOR": (2, lambda a, b: ~(a | b)),
    "XNOR": (2, lambda a, b: ~(a ^ b)),
    "MAJ": (3, lambda a, b, c: (a & b) | (a & c) | (b & c)),
    "XOR3": (3, lambda a, b, c: a ^ b ^ c),
}

Gate = tuple[str, tuple[int, ...]]

DEFAULT_BITS = 6
DEFAULT_GATES: tuple[Gate, ...] = (
    ("AND", (0, 1)), ("OR", (2, 3)), ("XOR", (4, 5)), ("NAND", (1, 2)),
    ("NOR", (3, 4)), ("XNOR", (0, 5)), ("MAJ", (0, 2, 4)), ("XOR3", (1, 3, 5)),
)

# What tuned AdamW reaches on the tested seeds (0-2) within the default budget, with margin: measured, AdamW
# (weight decay 0) at lr 1e-2 ends at accuracy 1.0 on each of seeds 0-9 in 400 steps (lr 3e-2, the
# rate ``nestopt study polyak`` picks by final loss, on 9 of those 10 seeds; 0.85 on seed 4).
LOGIC_GATES_GOAL = {"val_accuracy": 0.99}


def _check_gates(n_bits: int, gates: Sequence[Gate]) -> tuple[Gate, ...]:
    out = []
    if not isinstance(gates, Sequence) or isinstance(gates, str) or not gates:
        raise ValueError(f"gates={gates!r} is invalid: expected a non-empty sequence of (name, bits) pairs")
    for g in gates:
        if not (isinstance(g, tuple | list) and len(g) == 2 and g[0] in GATES):
            raise ValueError(f"gate {g!r} is invalid: expected (name, bits) with name one of {', '.join(GATES)}")
        name, bits = g[0], tuple(g[1])
        if len(bits) != GATES[name][0] or len(set(bits)) != len(bits) or not all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n_bits for b in bits):
            raise ValueError(f"gate {g!r} is invalid: {name} takes {GATES[name][0]} distinct bits in [0, {n_bits})")
        out.append((name, bits))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def truth_table(n_bits: int = DEFAULT_BITS,
                gates: tuple[Gate, ...] = DEFAULT_GATES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: all ``2^n_bits`` inputs ``(2^n, n)`` and the gate outputs ``(2^n, len(gates))``,
    both float32 in ``+-1`` (``+1`` true). Row ``r`` holds the bits of ``r``, most significant first."""
    check_int("n_bits", n_bits, lo=1, hi=16)
    gates = _check_gates(n_bits, gates)
    rows = np.arange(2 ** n_bits)
    bits = ((rows[:, None] >> np.arange(n_bits)[::-1]) & 1).astype(bool)
    outs = np.stack([GATES[name][1](*(bits[:, b] for b in idx)) for name, idx in gates], axis=1)
    return _pm(bits), _pm(outs)


def _pm(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(a, 1.0, -1.0).astype(np.float32))


class PolyAttentionLayer(nn.Module):
    """``x + (x Wq)(x Wk)^T (x Wv) / L``: softmax-free attention, a homogeneous cubic added to ``x``
    (``x`` is ``(batch, L, d)``). ``q``, ``k``, ``v`` are ``(d, d)`` parameters (``x @ q``)."""

    def __init__(self, width: int, init_scale: float = 1.0) -> None:
        super().__init__()
        std = init_scale / math.sqrt(width)
        self.q = nn.Parameter(torch.randn(width, width) * std)
        self.k = nn.Parameter(torch.randn(width, width) * std)
        self.v = nn.Parameter(torch.randn(width, width) * std)

    def cubic(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term alone: ``(x Wq)(x Wk)^T (x Wv) / L``."""
        q, k, v = x @ self.q, x @ self.k, x @ self.v
        return (q @ k.transpose(-1, -2)) @ v / x.shape[-2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cubic(x)


class TokenEmbedding(nn.Module):
    """Bit ``b_i`` (``+-1``) at position ``i`` -> ``b_i * value + pos[i]``."""

    def __init__(self, n_bits: int, width: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.pos = nn.Parameter(torch.randn(n_bits, width) / math.sqrt(width))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return bits[..., None] * self.value + self.pos


class PolyAttention(nn.Module):
    """Token embedding, ``depth`` :class:`PolyAttentionLayer` s, mean pooling, a linear read-out.
    The output is a polynomial of degree up to ``3^depth`` in the input bits."""

    def __init__(self, n_bits: int, n_out: int, width: int = 8, depth: int = 3, init_scale: float = 1.0) -> None:
        super().__init__()
        self.embed = TokenEmbedding(n_bits, width)
        self.layers = nn.ModuleList(PolyAttentionLayer(width, init_scale) for _ in range(depth))
        self.readout = nn.Linear(width, n_out)
        with torch.no_grad():
            self.readout.weight.normal_(0.0, 1.0 / math.sqrt(width))
            self.readout.bias.zero_()

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        x = self.embed(bits)
        for layer in self.layers:
            x = layer(x)
        return self.readout(x.mean(dim=-2))


def layer_of(name: str) -> str:
    """The layer a :class:`PolyAttention` parameter belongs to: ``"embed"``, ``"attn1"`` ...
    ``"attn<depth>"`` (``layers.0`` is ``attn1``, nearest the input) or ``"readout"``."""
    head = name.split(".")
    if head[0] == "layers":
        return f"attn{int(head[1]) + 1}"
    if head[0] in ("embed", "readout"):
        return head[0]
    raise ValueError(f"name={name!r} is invalid: not a PolyAttention parameter")


class LogicGatesTask(Task):
    """The truth table of ``gates`` over ``n_bits`` bits, learned by a :class:`PolyAttention`
    network, full batch, MSE on ``+-1`` targets (see the module docstring)."""

    kind = "regression"
    has_accuracy = True

    def __init__(self, n_bits: int = DEFAULT_BITS, gates: Sequence[Gate] = DEFAULT_GATES, *, depth: int = 3,
                 width: int = 16, init_scale: float = 1.0, steps: int = 400, name: str = "logic-gates",
                 goal: dict[str, float] | None = None) -> None:
        check_int("n_bits", n_bits, lo=3, hi=12)
        self.gates = _check_gates(n_bits, gates)
        check_int("depth", depth, lo=0)
        check_int("width", width, lo=1)
        check_number("init_scale", init_scale, lo=0.0, lo_open=True)
        check_int("steps", steps, lo=1)
        if not isinstance(name, str):
            raise TypeError(f"name={name!r} is invalid: expected a string")
        self.n_bits, self.depth, self.width, self.init_scale = n_bits, depth, width, init_scale
        self.name = name
        self.default_steps = steps
        self.batch_size = 2 ** n_bits
        self.goal = None if goal is None else dict(goal)
        self.description = (f"polynomial attention (depth {depth}, width {width}, degree <= {3 ** depth}) on the truth "
                            f"table of {len(self.gates)} gates over {n_bits} bits, full batch, MSE on +-1")

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return truth_table(self.n_bits, self.gates)

    def init(self, seed: int) -> PolyAttention:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PolyAttention(self.n_bits, len(self.gates), self.width, self.depth, self.init_scale)

    def sampler(self, seed: int) -> Sampler:
        check_seed("seed", seed, lo=None)
        batch = self.data()
        return lambda step: batch  # full batch: the whole table every step

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model(x.to(_dtype(model)))
        return nn.functional.mse_loss(out, y.to(out.dtype))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.data()
        out = model(x.to(_dtype(model)))
        y = y.to(out.dtype)
        return {"val_loss": float(nn.functional.mse_loss(out, y)),
                "val_accuracy": float((torch.sign(out) == y).to(torch.float64).mean())}


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def logic_gates(depth: int = 3, width: int = 16, n_bits: int = DEFAULT_BITS, gates: Sequence[Gate] = DEFAULT_GATES,
                *, init_scale: float = 1.0, steps: int = 400, name: str = "logic-gates") -> LogicGatesTask:
    """The logic-gates task; the defaults are the registered ``logic-gates`` task, the only
    variant that carries ``goal``."""
    default = (depth, width, n_bits, tuple(tuple(g) for g in gates), init_scale, steps, name) == (
        3, 16, DEFAULT_BITS, DEFAULT_GATES, 1.0, 400, "logic-gates")
    return LogicGatesTask(n_bits, gates, depth=depth, width=width, init_scale=init_scale, steps=steps, name=name,
                          goal=LOGIC_GATES_GOAL if default else None)


class LogicGatesFamily(TaskFamily):
    """Logic-gates variants: 6 to 8 input bits, 4 to 8 gates drawn from :data:`GATES` over random
    distinct bits, depth 2 or 3, width 8, 12 or 16; deterministic in the seed."""

    name = "logic-gates"
    description = "polynomial attention on the truth tables of random gate sets, random bits, depth and width"

    def sample(self, seed: int) -> LogicGatesTask:
        rng = np.random.default_rng(check_seed("seed", seed))
        n_bits = int(rng.integers(6, 9))
        n_gates = int(rng.integers(4, 9))
        names = list(GATES)
        gates = []
        for _ in range(n_gates):
            g = names[int(rng.integers(0, len(names)))]
            bits = tuple(int(b) for b in rng.choice(n_bits, size=GATES[g][0], replace=False))
            gates.append((g, bits))
        depth = int(rng.integers(2, 4))
        width = int(rng.choice([8, 12, 16]))
        label = "+".join(f"{g}{''.join(map(str, b))}" for g, b in gates)
        return LogicGatesTask(n_bits, gates, depth=depth, width=width, steps=400,
                              name=f"logic-gates[bits={n_bits},depth={depth},width={width},gates={label}]")
