"""Writing a benchmark's outputs: ``results.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .._io import atomic_savefig as _savefig, atomic_write_text
from .scoring import TAU_MAX


def write_json(doc: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False))


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _ratio(x: float | None) -> str:
    return "miss" if x is None else f"{x:.2f}"


def write_report(doc: dict[str, Any], out: Path, figures: list[str]) -> None:
    s = doc["summary"]
    cfg = doc["config"]
    env = doc["environment"]
    table = s["table"]
    tasks = sorted({t for pt in table.values() for t in pt})
    entries = sorted(table, key=lambda e: -s["scores"]["time"].get(e, 0.0))
    lines = [
        f"# nestopt bench: suite `{cfg['suite']}`",
        "",
        f"{'Complete' if doc['complete'] else '**Interrupted**: partial results'}; {len(doc['runs'])} runs, "
        f"{cfg['seeds']} seed(s); written {doc['created']}.",
        f"nestopt {env['nestopt']}, torch {env['torch']}, Python {env['python']}, {env['cores']} cores, "
        f"{env['workers']} worker process(es), {env['platform']}.",
        "",
        f"Command: `{cfg.get('command', 'nestopt bench')}`",
        "",
        "**Target** per task: the final validation loss that AdamW reaches on every seed at its best grid "
        "learning rate (worst seed at the rate whose worst seed is best). **Ratio**: median time-to-target "
        "over seeds divided by the fastest entry's on that task; `miss` = target not reached by the median "
        "seed. **Score**: mean of the performance profile over log tau in [1, "
        f"{TAU_MAX:g}] (1 = fastest on every task). Time is training time only (forward, backward, step).",
        "",
        "## Scores",
        "",
        "| entry | score (time) | score (steps) | tasks reached | diverged runs |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        pt = table[e]
        reached = sum(1 for t in pt.values() if t["time_to_target_median"] is not None)
        div = sum(t["diverged"] for t in pt.values())
        lines.append(f"| {e} | {s['scores']['time'].get(e, 0):.3f} | {s['scores']['steps'].get(e, 0):.3f} "
                     f"| {reached}/{len(pt)} | {div} |")
    lines += ["", "## Time-to-target ratio per task", "",
              "| entry | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for e in entries:
        lines.append(f"| {e} | " + " | ".join(_ratio(s["ratios"]["time"][e].get(t)) if t in table[e] else ""
                                              for t in tasks) + " |")
    lines += ["", "## Targets", "", "| task | target val loss | AdamW rate |", "|---|---|---|"]
    for t in tasks:
        tg = s["targets"].get(t)
        lines.append(f"| {t} | {_fmt(tg['val_loss']) if tg else 'none (AdamW diverged everywhere)'} | "
                     f"{_fmt(tg['adamw_lr']) if tg else '-'} |")
    edges = sorted(k.replace("|", ": ") for k, c in s["chosen_lr"].items() if c.get("at_grid_edge"))
    if edges:
        lines += ["", "Chosen at the edge of its grid (the best rate may lie outside it): " + ", ".join(edges) + "."]
    for t in tasks:
        lines += ["", f"## {t}", "",
                  "| entry | lr | final val loss (mean ± sd) | final train loss | val acc | steps to target "
                  "| time to target (s) | ms/step | reached | diverged |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            r = table[e].get(t)
            if r is None:
                continue
            lines.append(
                f"| {e} | {_fmt(r['lr'], 2)} | {_fmt(r['final_val_loss_mean'])} ± {_fmt(r['final_val_loss_sd'], 2)} "
                f"| {_fmt(r['final_train_loss_mean'])} | {_fmt(r['final_val_accuracy_mean'], 3)} "
                f"| {_fmt(r['steps_to_target_median'])} | {_fmt(r['time_to_target_median'], 3)} "
                f"| {r['ms_per_step_mean']:.3f} | {r['reached']}/{r['seeds']} | {r['diverged']} |")
    per_head = _trading_heads(doc["runs"], s)
    if per_head:
        lines += ["", "## Per-horizon validation AUC (trading-multihorizon, mean over seeds)", "", *per_head]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _trading_heads(runs: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    rows = defaultdict(list)
    chosen = {k.split("|")[1]: v["lr"] for k, v in s["chosen_lr"].items() if k.startswith("trading-multihorizon|")}
    for r in runs:
        if r["task"] != "trading-multihorizon" or r["diverged"]:
            continue
        if r["optimizer"] in chosen and r["lr"] != chosen[r["optimizer"]]:
            continue
        rows[r["optimizer"]].append(r["metrics"])
    if not rows:
        return []
    heads = [k[len("val_auc_"):] for k in next(iter(rows.values()))[0] if k.startswith("val_auc_")]
    out = ["| optimizer | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name, ms in sorted(rows.items()):
        vals = [statistics.fmean(m[f"val_auc_{h}"] for m in ms if m.get(f"val_auc_{h}") is not None) for h in heads]
        out.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return out


def write_figures(doc: dict[str, Any], out: Path) -> list[str]:
    """Loss curves per task, the performance profiles, and learning-rate sensitivity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    table = s["table"]
    entries = sorted(table)
    colors = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(entries)}
    runs_by = defaultdict(list)
    from .scoring import entries_of

    chosen = {tuple(k.split("|")): v for k, v in s["chosen_lr"].items()}
    for e, rs in entries_of(doc["runs"], chosen).items():
        for r in rs:
            runs_by[(e, r["task"])].append(r)
    names: list[str] = []
    tasks = sorted({r["task"] for r in doc["runs"]})
    for t in tasks:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for e in entries:
            rs = runs_by.get((e, t))
            if not rs:
                continue
            for i, r in enumerate(rs):
                c = r["curve"]
                pts = [(st, v) for st, v in zip(c["step"], c["val_loss"]) if v is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colors[e], alpha=0.85, lw=1.2, label=e if i == 0 else None)
        tg = s["targets"].get(t)
        if tg:
            ax.axhline(tg["val_loss"], color="k", ls="--", lw=0.8, label="target")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(t)
        if ax.get_legend_handles_labels()[0]:  # (an interrupted run may have no curve here)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"curves_{t}.png"
        _savefig(fig, out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("time", "steps")):
        for e in entries:
            ax.step(s["profile"]["tau"], s["profile"][kind][e], where="post", color=colors[e], label=e)
        ax.set_xscale("log")
        ax.set_xlabel(f"tau (ratio to fastest {kind}-to-target)")
        ax.set_title(f"performance profile ({kind})")
    axes[0].set_ylabel("fraction of tasks within tau")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "profile.png", dpi=110)
    plt.close(fig)
    names.append("profile.png")

    tuned = sorted({o for (_, o) in chosen})
    if tuned:
        fig, axes = plt.subplots(1, len(tuned), figsize=(4.2 * len(tuned), 3.8), squeeze=False)
        for ax, o in zip(axes[0], tuned):
            for i, t in enumerate(tasks):
                c = chosen.get((t, o))
                if not c:
                    continue
                xs = [float(k) for k in c["by_lr"]]
                ys = [v if v is not None else float("nan") for v in c["by_lr"].values()]
                tg = s["targets"].get(t, {}).get("val_loss")
                ys = [y / tg if tg else y for y in ys]
                ax.plot(xs, ys, marker="o", ms=3, label=t, color=plt.get_cmap("tab10")(i % 10))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(o)
            ax.set_xlabel("learning rate")
        axes[0][0].set_ylabel("worst-seed final val loss / target")
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        _savefig(fig, out / "lr_sensitivity.png", dpi=110)
        plt.close(fig)
        names.append("lr_sensitivity.png")
    return names
