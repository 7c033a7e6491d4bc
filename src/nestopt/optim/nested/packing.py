"""The nested optimizer's own state as it is saved: one bytes value of tensors and plain values
(read back with ``weights_only=True``), and the conversion of the layout saved before the
optimizer was in parts (nestopt 407dc63 and earlier)."""

from __future__ import annotations

import io
from typing import Any

import torch


def old_layout(sd: dict[str, Any], signal: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The pre-parts layout's top-level ``"nested"`` entry as this layout's, and its counters."""
    old, sc = sd["nested"], sd["nested"]["scalars"]
    buf = old["buffers"]
    new = {k: old[k] for k in ("controller", "controller_opt", "norm", "memory", "last_features", "n_params")}
    new.update(loss={"prev": sc["loss_prev"], "ema": sc["loss_ema"], "dloss_ema": sc["dloss_ema"]}, val=sc["val"],
               param_rms=sc["param_rms"], update_ratio=sc["update_ratio"],
               features={"curvature": {"curv": sc["curv"], "prev_grad": buf.get("prev_grad", []),
                                       "prev_param": buf.get("prev_param", [])},
                         "heads": {"rows": old["heads"]}},
               signal={"name": signal, "scale": sc.get("scale", 1.0), "window": old["window"],
                       "generator": old["generator"], "baseline": sc["baseline"], "pending": old["pending"],
                       "held": old["val_noise"], "inputs": old["val_inputs"]})
    return new, dict(old["counters"])


def pack(state: dict[str, Any]) -> bytes:
    """The nested optimizer's own state as one bytes value: its structure changes as training runs
    (the hindsight window fills and empties), and torch's distributed-checkpoint helpers load in
    place, into a state of the same structure; a bytes leaf they carry as it is."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack(state: bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(state, dict):
        return state
    # tensors come back on the devices they were saved from (CPU where there is no GPU); the
    # per-parameter caches then move to their parameter's device
    where = None if torch.cuda.is_available() else "cpu"
    try:
        return torch.load(io.BytesIO(state), map_location=where, weights_only=True)  # runs no code
    except Exception as e:  # a crafted or damaged entry: never unpickled beyond plain values
        kind = "holds objects other than tensors and plain values" if "GLOBAL" in str(e) else "is damaged"
        raise ValueError(f"state_dict['param_groups'][0]['nested'] {kind}; NestedOptimizer does not unpickle it "
                         f"({type(e).__name__})") from None
