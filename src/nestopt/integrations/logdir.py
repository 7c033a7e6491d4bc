"""``--log-dir`` of ``nestopt bench``, ``nestopt study`` and ``nestopt meta-train``: what a finished
command wrote, as TensorBoard event files (needs the ``tensorboard`` package).

- ``bench``: every run's curve (``curves/{task}/{optimizer}/lr={lr}/seed={seed}/val_loss`` and
  ``train_loss`` against the step), and the figures;
- ``study``: the figures;
- ``meta-train``: each outer step's numbers from ``history.json`` (``meta/meta_loss``, ...).

Figures are images (``figures/{name}``). The event files go to ``log_dir`` itself:
``tensorboard --logdir LOG_DIR`` shows them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def writer(log_dir: str | Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise ImportError("--log-dir writes TensorBoard event files, which needs the tensorboard package: "
                          "pip install 'nestopt[integrations]'") from e
    return SummaryWriter(str(log_dir))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def add_figures(w: Any, figures: Iterable[Path]) -> int:
    """Each PNG as an image (``figures/{stem}``); returns how many."""
    import matplotlib.image as mpimg

    n = 0
    for f in sorted(figures):
        img = mpimg.imread(str(f))
        w.add_image(f"figures/{f.stem}", img[..., :3] if img.ndim == 3 else img, 0, dataformats="HWC" if img.ndim == 3 else "HW")
        n += 1
    return n


def bench(log_dir: str | Path, runs: Sequence[Mapping[str, Any]], figures: Iterable[Path]) -> None:
    w = writer(log_dir)
    try:
        for r in runs:
            curve = r.get("curve") or {}
            head = f"curves/{r['task']}/{r['optimizer']}/lr={r['lr']:g}/seed={r['seed']}"
            for key in ("val_loss", "train_loss"):
                for step, v in zip(curve.get("step", ()), curve.get(key, ())):
                    if _finite(v):
                        w.add_scalar(f"{head}/{key}", v, int(step))
        add_figures(w, figures)
    finally:
        w.close()


def study(log_dir: str | Path, figures: Iterable[Path]) -> None:
    w = writer(log_dir)
    try:
        add_figures(w, figures)
    finally:
        w.close()


def meta_train(log_dir: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
    w = writer(log_dir)
    try:
        for row in history:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k != "step" and _finite(v):
                    w.add_scalar(f"meta/{k}", v, step)
    finally:
        w.close()
