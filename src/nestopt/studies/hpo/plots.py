"""The hypergradient study's figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_savefig


def figures(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, ex in doc["exactness"].items():
        for solver, ls in (("cg", "-"), ("neumann", "--")):
            rows = [r for r in ex["rows"] if r["solver"] == solver]
            its = [r["iters"] for r in rows]
            label = f"{solver}, cond(X) {ex['feature_cond']:.0f}, decay {ex['decay']:g}"
            axes[0].semilogx(its, [r["cosine"] for r in rows], ls, marker="o", label=label)
            axes[1].loglog(its, [max(r["rel_error"], 1e-17) for r in rows], ls, marker="o", label=label)
    axes[0].set(xlabel="solver iterations (Hessian-vector products)", ylabel="cosine to dense hypergradient",
                title="Exactness: logistic regression, 50 per-feature decays")
    axes[1].set(xlabel="solver iterations", ylabel="relative error", title="Relative error to dense")
    axes[0].axhline(0.999, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / "exactness.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = doc["hpo"]["rows"]
    ax.scatter([r["tpe"]["wall_s"] for r in rows], [r["tpe"]["test_acc"] for r in rows], label="TPE, one global decay")
    ax.scatter([r["implicit"]["wall_s"] for r in rows], [r["implicit"]["test_acc"] for r in rows],
               label="implicit, one decay per weight")
    ax.set(xlabel="tuning wall-clock (s)", ylabel="retrained test accuracy", title="Weight decay on digits MLP")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, out / "hpo.png", dpi=120)
    plt.close(fig)

    syn, real = doc["distill"]["images"]
    _image_rows(out / "distill.png", [syn, real], ["distilled", "random real (the starting point)"])
    clean, aug = doc["augment"]["examples"]
    _image_rows(out / "augment.png", [clean, aug], ["clean", "learned augmentation"])

    r0 = doc["stn"]["rows"][0]
    wds = sorted({g["weight_decay"] for g in r0["grid"]})
    dps = sorted({g["dropout"] for g in r0["grid"]})
    grid = {(g["weight_decay"], g["dropout"]): g["val_loss"] for g in r0["grid"]}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    img = [[grid[(wd, dp)] for wd in wds] for dp in dps]
    ax.imshow(img, origin="lower", cmap="viridis", aspect="auto",
              extent=(math.log10(wds[0]) - 0.5, math.log10(wds[-1]) + 0.5, -0.1, dps[-1] + 0.1))
    path = r0["stn_path"]
    ax.plot([math.log10(p[0]) for p in path], [p[1] for p in path], "w.-", label="STN hyperparameters over training")
    ax.set(xlabel="log10 weight decay", ylabel="dropout rate", title="Grid validation loss (colour) and STN path")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / "stn.png", dpi=120)
    plt.close(fig)


def _image_rows(path: Path, rows: list[torch.Tensor], titles: list[str]) -> None:
    """One row of 8x8 digit images per tensor in ``rows``, titled on the left."""
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n, 1.2 * len(rows)))
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            axes[r, c].imshow(images[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
