"""What each optimizer steps: the support table of ``docs/guarantees.md``, checked cell by cell. A supported kind
steps to a lower loss with finite parameters; an unsupported one is refused when the optimizer is
built (or, for sparse gradients, at the step), with an error naming the parameter and the dtype,
before anything has moved."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from _helpers import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("float64", "bfloat16", "float16", "complex64", "zero-element", "0-d", "channels_last", "sparse grad")
Y, N = "yes", "no"
# the docs' table: one row per configuration of tests/_helpers.OPTIMIZERS
SUPPORT = {
    "polyak":                {"float64": Y, "bfloat16": Y, "float16": Y, "complex64": Y, "zero-element": Y, "0-d": Y},
    "polyak-group-momentum": {"float64": Y, "bfloat16": Y, "float16": Y, "complex64": Y, "zero-element": Y, "0-d": Y},
    "polyak-rms":            {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": Y},
    "polyak-adam":           {"float64": Y, "bfloat16": N, "float16": N, "complex64": N, "zero-element": Y, "0-d": Y},
    "learned-default":       {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": N},
    "learned-mlp":           {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": N},
    "complex-momentum":      {"float64": Y, "bfloat16": Y, "float16": Y, "complex64": N, "zero-element": Y, "0-d": Y},
    "complex-adam":          {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": Y},
    "hypergradient-sgd":     {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": Y},
    "hypergradient-adam":    {"float64": Y, "bfloat16": Y, "float16": N, "complex64": N, "zero-element": Y, "0-d": Y},
    "nested-hindsight":      {"float64": Y, "bfloat16": Y, "float16": N, "complex64": Y, "zero-element": Y, "0-d": Y},
    "nested-proxy":          {"float64": Y, "bfloat16": Y, "float16": N, "complex64": Y, "zero-element": Y, "0-d": Y},
    "nested-validation":     {"float64": Y, "bfloat16": Y, "float16": N, "complex64": Y, "zero-element": Y, "0-d": Y},
    "nested-frozen":         {"float64": Y, "bfloat16": Y, "float16": Y, "complex64": Y, "zero-element": Y, "0-d": Y},
}
for row in SUPPORT.values():
    row.update({"channels_last": Y, "sparse grad": N})
# the docs' row for each configuration (configurations with the same row share one)
LABELS = {
    "polyak": "Polyak (any scope, with or without momentum)", "polyak-group-momentum": "Polyak (any scope, with or without momentum)",
    "polyak-rms": "Polyak (a precondition)", "polyak-adam": "PolyakAdam",
    "learned-default": "LearnedOptimizer (each shipped net)", "learned-mlp": "LearnedOptimizer (each shipped net)",
    "complex-momentum": "ComplexMomentum", "complex-adam": "ComplexAdam", "hypergradient-sgd": "HypergradientSGD",
    "hypergradient-adam": "HypergradientAdam",
    "nested-hindsight": "NestedOptimizer (AdamW base, eps=1e-8)", "nested-proxy": "NestedOptimizer (AdamW base, eps=1e-8)",
    "nested-validation": "NestedOptimizer (AdamW base, eps=1e-8)", "nested-frozen": "NestedOptimizer (SGD base)",
}


def _problem(kind: str):
    """Parameters of ``kind`` and a loss of them (an asymmetric least-squares problem)."""
    g = torch.Generator().manual_seed(0)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "complex64": torch.complex64}.get(kind, torch.float32)
    if kind == "channels_last":
        w = torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=g).to(memory_format=torch.channels_last))
        x = torch.randn(8, 3, 5, 5, generator=g)
        return [w], lambda: torch.nn.functional.conv2d(x, w).square().mean()
    if kind == "sparse grad":
        emb = torch.nn.Embedding(10, 3, sparse=True)
        idx = torch.tensor([1, 4, 4, 7])
        return [emb.weight], lambda: (emb(idx) - 1.0).square().mean()
    shape = () if kind == "0-d" else (3, 4)
    w = torch.nn.Parameter((0.5 * torch.randn(shape, generator=g)).to(dtype))
    a = torch.randn(shape, generator=g).to(dtype) + 2.0
    params = [w]
    if kind == "zero-element":
        params.append(torch.nn.Parameter(torch.zeros(0)))

    def loss():
        r = a * w - 1.0
        total = (r.abs() ** 2 if r.is_complex() else r * r).float().mean()
        return total + sum(p.sum() for p in params[1:])
    return params, loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SUPPORT)
def test_each_kind_is_stepped_correctly_or_refused_with_a_clear_error(name, kind):
    params, loss_fn = _problem(kind)
    supported = SUPPORT[name][kind] == Y
    # two groups where there are two tensors; the nested optimizer's per-tensor controller then sees both
    groups = [{"params": [p]} for p in params]
    if not supported and kind != "sparse grad":
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] (has dtype|is a 0-d tensor)"):
            OPTIMIZERS[name](groups)
        return
    opt = OPTIMIZERS[name](groups)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    if not supported:  # sparse gradients: refused at the step, nothing moved
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match="does not support sparse gradients"):
            opt.step(closure)
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        return
    first = float(loss_fn())
    for _ in range(15):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in params)
    assert float(loss_fn()) < first


def _readme_table() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    block = text.split("<!-- support-table -->", 2)[1]
    rows = [line for line in block.strip().splitlines() if line.startswith("|")]
    head = [re.sub(r"`", "", c.strip()) for c in rows[0].strip("|").split("|")]  # `0-d` is code there
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[re.sub(r"`", "", cells[0])] = dict(zip(head[1:], cells[1:]))
    return out


def test_the_readme_support_table_is_this_tests_table():
    expected: dict[str, dict[str, str]] = {}
    for name, row in SUPPORT.items():
        cells = {kind: row[kind] for kind in KINDS}
        assert expected.setdefault(LABELS[name], cells) == cells, f"{name} differs from its row in docs/guarantees.md"
    assert _readme_table() == expected
