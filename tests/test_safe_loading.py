"""No code runs from a file that a user loads: every place nestopt reads a file back refuses a
crafted pickle (one that creates a marker file when unpickled) with a clear error, and the marker
never appears."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from nestopt import cli
from nestopt.guards import TrainingGuard
from nestopt.meta.train import CheckpointError, MetaConfig, meta_train
from nestopt.nets import HybridAdamNet, load_net
from nestopt.optim import NestedOptimizer

ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this opens (creates) ``marker``: code from the file would have run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _meta_checkpoint(tmp_path: Path) -> tuple[MetaConfig, Path]:
    cfg = MetaConfig(families=("quadratic",), unroll=2, horizon=4, outer_steps=2, checkpoint_every=1, seed=0)
    ckpt = tmp_path / "checkpoint.pt"
    meta_train(HybridAdamNet(), cfg, checkpoint=ckpt)
    return cfg, ckpt


def test_a_meta_train_resume_refuses_a_crafted_checkpoint(tmp_path):
    cfg, ckpt = _meta_checkpoint(tmp_path)
    marker = tmp_path / "marker"
    saved = torch.load(ckpt, weights_only=True)
    saved["history"].append({"row": Evil(marker)})
    torch.save(saved, ckpt)  # what a swapped file on a shared disk could hold
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain values"):
        meta_train(HybridAdamNet(), MetaConfig(**{**cfg.__dict__, "outer_steps": 4}), checkpoint=ckpt, resume=True)
    assert not marker.exists()


def test_the_cli_refuses_a_crafted_checkpoint_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["meta-train", "--net", "linear", "--families", "quadratic", "--unroll", "2", "--horizon", "4"]
    assert cli.main([*args, "--steps", "2", "--out", str(out)]) == 0
    marker = tmp_path / "marker"
    torch.save({"format": 1, "net": Evil(marker)}, out / "checkpoint.pt")
    capsys.readouterr()
    assert cli.main([*args, "--steps", "4", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0] and "does not unpickle them" in err[0], err
    assert not marker.exists()


def test_a_checkpoint_from_a_newer_format_is_refused_naming_it(tmp_path):
    cfg, ckpt = _meta_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["format"] = 99
    torch.save(saved, ckpt)
    with pytest.raises(CheckpointError, match="has format 99, newer than"):
        meta_train(HybridAdamNet(), MetaConfig(**{**cfg.__dict__, "outer_steps": 4}), checkpoint=ckpt, resume=True)


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    cfg, ckpt = _meta_checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"checkpoint '.*checkpoint.pt' is damaged or truncated"):
        meta_train(HybridAdamNet(), MetaConfig(**{**cfg.__dict__, "outer_steps": 4}), checkpoint=ckpt, resume=True)


def _guarded(tmp_path: Path, make_opt) -> tuple[nn.Module, TrainingGuard]:
    """Three guarded steps of a small model, checkpointing to ``tmp_path / "ck"`` every step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = make_opt(model.parameters())
    guard = TrainingGuard(model, opt, checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if guard.step(loss):
            opt.step()
    return model, guard


def test_a_guard_rollback_refuses_a_crafted_checkpoint_file(tmp_path):
    _, guard = _guarded(tmp_path, lambda ps: torch.optim.SGD(ps, lr=0.1))
    files = sorted((tmp_path / "ck").glob("*.pt"))
    assert files, "the guard wrote no checkpoint file"
    marker = tmp_path / "marker"
    for f in files:  # every checkpoint it could roll back to is swapped
        torch.save({"model": Evil(marker)}, f)
    with pytest.raises(ValueError, match="guard checkpoint .* holds objects other than tensors"):
        guard.step(torch.tensor(float("nan")))  # a non-finite loss rolls back to the last checkpoint
    assert not marker.exists()


def test_a_guard_checkpoint_it_wrote_rolls_back_through_the_safe_load(tmp_path):
    model, guard = _guarded(tmp_path, lambda ps: torch.optim.AdamW(ps, lr=0.1))
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.step(torch.tensor(float("nan"))) is False
    assert torch.isfinite(model.weight).all()


def test_load_net_refuses_a_pickle_in_place_of_safetensors(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "net.safetensors"
    torch.save({"w": Evil(marker)}, path)
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        load_net(path)
    assert not marker.exists()


def test_a_nested_optimizer_state_refuses_a_crafted_inner_state(tmp_path):
    model = nn.Linear(3, 2)
    opt = NestedOptimizer(model.parameters())
    sd = opt.state_dict()
    buf = io.BytesIO()
    marker = tmp_path / "marker"
    torch.save({"controller": Evil(marker)}, buf)
    sd["param_groups"][0]["nested"] = buf.getvalue()
    with pytest.raises(ValueError, match="holds objects other than tensors and plain values"):
        opt.load_state_dict(sd)
    assert not marker.exists()


def test_no_user_facing_load_unpickles_freely():
    # the only full-pickle loads left are the meta-trainer's worker payloads: bytes made in this
    # process for its own worker processes, never read from a file
    hits = []
    for f in (ROOT / "src").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "weights_only=False" in line:
                hits.append(f"{f.relative_to(ROOT)}:{i}")
    assert hits and all(h.startswith("src/nestopt/meta/unrolls.py") for h in hits), hits


@pytest.mark.parametrize("name", sorted(__import__("_helpers").OPTIMIZERS))
def test_every_optimizers_state_loads_with_weights_only(name):
    from _helpers import OPTIMIZERS, mse_closure, regression_data, tiny_mlp

    model = tiny_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = regression_data(8)
    for _ in range(3):
        opt.step(mse_closure(opt, model, x, y))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
