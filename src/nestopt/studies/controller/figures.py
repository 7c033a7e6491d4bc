"""The controller study's figures: time to target against the base rate, the ablations, the
per-head AUCs with one run's multipliers, and the multiplier traces."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..._io import atomic_savefig
from .plan import ROBUST


def _save(fig: Any, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_savefig(fig, out / name, dpi=100)
    plt.close(fig)
    return name


def _log_y(ax: Any) -> None:
    """Log y axis when the axes hold positive data (an empty panel stays linear)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys:
        ax.set_yscale("log")


def _figures(rob: dict[str, Any], abl: list[dict[str, Any]], heads: dict[str, Any], head_runs: list[dict[str, Any]],
             traces: list[dict[str, Any]], tasks: tuple[str, ...], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    n = len(tasks)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(16, 3.6 * math.ceil(n / cols)), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for label, m in rob.items():
            ys = [m["tasks"][t]["ttt"][str(f)] for f in ROBUST]
            ax.plot(ROBUST, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlim(0.07, 14)
        _log_y(ax)
        ax.set_title(t)
        ax.set_xlabel("base learning rate / tuned AdamW's")
        ax.set_ylabel("time to target (s)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("time to tuned AdamW's target against the base rate (median over seeds; gaps: target not reached)")
    files.append(_save(fig, out, "robustness.png"))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['config']} vs {r['reference']}" for r in abl]
    vals = [r["geo_ratio"] if r["geo_ratio"] else float("nan") for r in abl]
    ax.barh(labels, vals, color=["tab:green" if v < 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="k", lw=0.8)
    if any(math.isfinite(v) and v > 0 for v in vals):
        ax.set_xscale("log")
    ax.set_xlabel("geometric mean of final val loss ratio (config / reference); < 1 is better")
    ax.set_title("ablations: paired over tasks, base rates lr* x (0.1, 1, 10) and seeds")
    files.append(_save(fig, out, "ablations.png"))

    from ...tasks.trading import HORIZON_NAMES

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    x = range(len(HORIZON_NAMES))
    w = 0.8 / max(len(heads), 1)
    for i, (c, h) in enumerate(heads.items()):
        axes[0].bar([j + i * w for j in x], [h[n]["mean"] for n in HORIZON_NAMES], width=w,
                    yerr=[h[n]["sd"] for n in HORIZON_NAMES], label=c, capsize=2)
    axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[0].set_xticks([j + 0.4 - w / 2 for j in x], HORIZON_NAMES)
    axes[0].set_ylabel("validation AUC (mean ± sd over seeds)")
    axes[0].set_title("multi-horizon task, trunk + per-head groups, tuned AdamW's rate")
    axes[0].legend(fontsize=8)
    run = next((r for r in head_runs if r["config"] == "nested-hindsight+heads" and r["seed"] == 0), None)
    if run is not None:
        tr = run["trace"]
        names = ["trunk", *HORIZON_NAMES]
        for k, nm in enumerate(names):
            axes[1].plot(tr["step"], [m[k] for m in tr["mult"]], label=nm)
        _log_y(axes[1])
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("multiplier")
        axes[1].set_title("nested-hindsight+heads, seed 0: multiplier per group")
        axes[1].legend(fontsize=8, ncol=2)
    files.append(_save(fig, out, "heads.png"))

    if traces:
        fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
        for ax, tr in zip(axes[0], traces):
            for k, nm in enumerate(tr["names"]):
                ax.plot(tr["step"], [m[k] for m in tr["mult"]], label=nm)
            _log_y(ax)
            ax.set_title(f"{tr['task']}, base lr {tr['lr']:g}")
            ax.set_xlabel("step")
            ax.set_ylabel("multiplier (per tensor)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("default nested optimizer: the multiplier of each tensor over training (seed 0)")
        files.append(_save(fig, out, "multipliers.png"))
    return files
