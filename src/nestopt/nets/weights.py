"""The update-network file format: weights and configuration in one ``.safetensors`` file (no
pickle: loading a file runs no code), and the networks nestopt ships."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path
from .controller import Controller
from .update import KINDS, HybridAdamNet

WEIGHTS = Path(__file__).resolve().parent / "shipped"
SHIPPED = WEIGHTS / "default.safetensors"  # the linear network
SHIPPED_NETS = {"default": SHIPPED, "mlp": WEIGHTS / "mlp.safetensors"}  # names that load a shipped file
FORMAT = "nestopt-update-net/1"


def build(config: dict[str, object]) -> nn.Module:
    """The network a saved ``config()`` describes (weights not loaded): an update network, or a
    nested optimizer's :class:`~nestopt.nets.Controller` (kind ``nested-controller``)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config={config!r} is invalid: expected a dict like net.config() ({{'kind': ..., ...}})")
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind != "nested-controller" and kind not in KINDS:
        raise ValueError(f"config kind={kind!r} is invalid: expected one of {', '.join(KINDS)}, nested-controller")
    cls = Controller if kind == "nested-controller" else KINDS[kind]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in cfg if k not in accepted]
    if unknown:
        raise ValueError(f"config={dict(config)!r} is invalid: {', '.join(map(repr, unknown))} "
                         f"{'is not an option' if len(unknown) == 1 else 'are not options'} of kind={kind!r}; "
                         f"accepted: {', '.join(accepted)}")
    if kind == "nested-controller":
        return Controller(**cfg)  # type: ignore[return-value,arg-type]
    if kind == "hybrid":
        betas = cfg.pop("betas", (0.9, 0.999))
        return HybridAdamNet(betas=tuple(betas), **cfg)  # type: ignore[arg-type]
    return KINDS[kind](**cfg)  # type: ignore[arg-type]


def save_net(net: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``net``'s weights and configuration to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    if not isinstance(net, nn.Module) or not callable(getattr(net, "config", None)):
        raise TypeError(f"net={type(net).__name__} is invalid: expected a network with a config() "
                        "(an UpdateNet or a Controller)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(net.config()), "meta": json.dumps(meta or {})}
    with atomic_path(path) as tmp:  # written whole under a temporary name, then renamed
        save_file(tensors, str(tmp), metadata=header)
    return path


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"net={str(path)!r} is invalid: no such file (expected a .safetensors file "
                         "written by nestopt.nets.save_net)")
    return path


def load_net(path: str | Path) -> torch.nn.Module:
    """The network stored at ``path`` (see :func:`save_net`); ``ValueError`` naming the file if
    it is missing, unreadable, of another format, or its tensors do not fit its configuration."""
    path = _existing(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"net file {str(path)!r} could not be read as safetensors: {e}") from e
    if header.get("format") != FORMAT:
        raise ValueError(f"net file {str(path)!r} has format {header.get('format')!r}; expected {FORMAT!r}")
    try:
        net = build(json.loads(header["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"net file {str(path)!r} has an invalid configuration: {e}") from e
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise ValueError(f"net file {str(path)!r} does not match its configuration {net.config()}: "
                         f"expected tensors {expected}, found {got}")
    net.load_state_dict(tensors)
    return net


def net_metadata(path: str | Path) -> dict[str, Any]:
    """The ``meta`` record stored with a network file (how it was made), ``{}`` if none; ``ValueError``
    naming the file if it is missing or unreadable."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"net file {str(path)!r} could not be read as safetensors: {e}") from e
