"""Writing a benchmark's outputs: ``results.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_savefig as _savefig, atomic_write_text
from . import figstyle
from .scoring import TAU_MAX, entries_of


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


def entry_styles(doc: dict[str, Any]) -> dict[str, figstyle.Style]:
    """Entry -> :class:`~nestopt.bench.figstyle.Style` for a results document: every entry of its
    table and runs, by the families an optional ``summary["families"]`` names, else the registry's."""
    s = doc["summary"]
    chosen = {tuple(k.split("|")): v for k, v in s.get("chosen_lr", {}).items()}
    entries = set(s.get("table", {})) | set(entries_of(doc.get("runs", []), chosen))
    return figstyle.assign(entries, s.get("families") or {})


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LW, LW_HIGHLIGHT, LW_MUTED = 1.3, 2.4, 0.8
FONT = 7  # legend and end-label font size (points)


def _draw_kw(entry: str, style: figstyle.Style, highlighted: set[str]) -> dict[str, Any]:
    """How ``entry`` is drawn: its style; with a highlight, thicker and on top if it is highlighted,
    else thin light grey behind."""
    if not highlighted:
        return {**style.kwargs(), "lw": LW, "zorder": 2}
    if entry in highlighted:
        return {**style.kwargs(), "lw": LW_HIGHLIGHT, "zorder": 4}
    return {"color": figstyle.MUTED, "linestyle": "-", "lw": LW_MUTED, "zorder": 1}


def _legend_rows(styles: dict[str, figstyle.Style], highlighted: set[str], max_cols: int) -> list[list[tuple[str, Any]]]:
    """The legend's columns, each a list of ``(label, what)``: ``what`` is an entry, ``None`` for a
    family's header, or ``""`` for the grey "others" of a highlight."""
    shown = {e: st for e, st in styles.items() if not highlighted or e in highlighted}
    cols = [[item for fam, members in col for item in [(fam, None), *((e, e) for e in members)]]
            for col in figstyle.legend_columns(figstyle.legend_order(shown), max_cols)]
    if highlighted and len(shown) < len(styles):
        cols = cols or [[]]
        cols[-1].append(("others", ""))
    return cols


def _legend(fig: Any, styles: dict[str, figstyle.Style], highlighted: set[str], cols: list[list[tuple[str, Any]]]) -> Any:
    """A legend below the plots, one family (or a few small ones) per column, family names in bold.
    An item's ``what`` may also be a ready handle (the target line)."""
    from matplotlib.lines import Line2D

    height = max(len(c) for c in cols)
    handles, labels, bold = [], [], []
    for col in cols:
        for label, what in col + [("", None)] * (height - len(col)):
            if what is None:
                handles.append(Line2D([], [], linestyle="none"))
            elif what == "":
                handles.append(Line2D([], [], color=figstyle.MUTED, lw=LW_MUTED))
            elif isinstance(what, str):
                kw = _draw_kw(what, styles[what], highlighted)
                kw.pop("zorder")
                handles.append(Line2D([], [], **kw))
            else:
                handles.append(what)
            labels.append(label)
            bold.append(what is None)
    leg = fig.legend(handles, labels, loc="outside lower center", ncol=len(cols), fontsize=FONT, frameon=False,
                     handlelength=3.2, columnspacing=1.4, labelspacing=0.35)
    for t, b in zip(leg.get_texts(), bold):
        if b:
            t.set_fontweight("bold")
    return leg


def _legend_height(rows: int) -> float:
    """Inches a legend of ``rows`` rows takes below the plots."""
    return 0.25 + rows * FONT * 1.45 / 72


def _end_labels(ax: Any, items: list[tuple[str, float, float, str]]) -> list[tuple[Any, float]]:
    """Label each ``(entry, x, y, colour)`` at the right of the axes, level with its line's end
    ``(x, y)`` (data) and joined to it; :func:`_nudge_labels` spaces them once the layout is done.
    Returns ``(annotation, the line end's height in axes fraction)`` for each."""
    ax.get_xlim(), ax.get_ylim()  # (the limits are final: the labels' targets follow from them)
    to_axes = ax.transAxes.inverted()
    anns = []
    for entry, x, y, color in items:
        ty = float(to_axes.transform(ax.transData.transform((x, y)))[1])
        a = ax.annotate(entry, xy=(x, y), xycoords="data", xytext=(1.03, ty), textcoords="axes fraction",
                        fontsize=FONT, color=color, va="center", ha="left", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "shrinkA": 1, "shrinkB": 0},
                        gid=f"end-label:{entry}")
        anns.append((a, ty))
    return anns


def label_gap(ax: Any) -> float:
    """The least vertical distance (axes fraction) between two end labels of ``ax``: a line of
    :data:`FONT`-point text and a little more, at the axes' height in the figure."""
    height_in = ax.get_position().height * ax.figure.get_figheight()
    return FONT * 1.4 / 72 / height_in


def _nudge_labels(fig: Any, labelled: list[tuple[Any, list[tuple[Any, float]]]]) -> None:
    """Run the layout (it made room for the labels at their first places), fix it, and space each
    axes' labels at least :func:`label_gap` apart near their lines' ends."""
    if not any(anns for _, anns in labelled):
        return
    fig.canvas.draw()
    fig.set_layout_engine("none")
    for ax, anns in labelled:
        ys = figstyle.spread([ty for _, ty in anns], label_gap(ax), lo=0.0, hi=1.0)
        for (a, _), y in zip(anns, ys):
            a.xyann = (a.xyann[0], y)


def _by_entry_task(doc: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    chosen = {tuple(k.split("|")): v for k, v in doc["summary"]["chosen_lr"].items()}
    runs_by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e, rs in entries_of(doc["runs"], chosen).items():
        for r in rs:
            runs_by[(e, r["task"])].append(r)
    return runs_by


def curves_figure(doc: dict[str, Any], task: str, *, highlight: str | Sequence[str] | None = None) -> Any:
    """The validation-loss curves of every entry (each seed a line) on ``task``, with the target;
    with ``highlight``, those entries on top and labelled at their ends, the rest in light grey."""
    plt = _pyplot()
    styles = entry_styles(doc)
    hl = figstyle.resolve_highlight(highlight, styles)
    runs_by = _by_entry_task(doc)
    drawn = {e: rs for e in sorted(styles) if (rs := runs_by.get((e, task)))}
    tg = doc["summary"]["targets"].get(task)
    cols = _legend_rows({e: styles[e] for e in drawn}, hl, max_cols=4) if drawn else []
    if cols and tg:
        from matplotlib.lines import Line2D

        cols[-1].append(("target", Line2D([], [], color="k", ls="--", lw=0.8)))
    rows = max((len(c) for c in cols), default=0)
    fig, ax = plt.subplots(figsize=(6.4, 4.2 + (_legend_height(rows) if cols else 0)), layout="constrained")
    ends = []
    for e in sorted(drawn, key=lambda e: e in hl):  # (highlighted last: on top)
        kw = _draw_kw(e, styles[e], hl)
        for r in drawn[e]:
            c = r["curve"]
            pts = [(st, v) for st, v in zip(c["step"], c["val_loss"]) if v is not None and v > 0]
            if pts:
                ax.plot(*zip(*pts), alpha=0.9, gid=e, label=e, **kw)
                if e in hl and (not ends or ends[-1][0] != e):
                    ends.append((e, *pts[-1], kw["color"]))
    if tg:
        ax.axhline(tg["val_loss"], color="k", ls="--", lw=0.8, zorder=3, gid="target")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(task)
    if cols:  # (an interrupted run may have no curve here)
        _legend(fig, styles, hl, cols)
    _nudge_labels(fig, [(ax, _end_labels(ax, ends))])
    return fig


def profile_figure(doc: dict[str, Any], *, highlight: str | Sequence[str] | None = None, top_k: int = 5) -> Any:
    """The performance profiles (time and steps) of every entry. The ``top_k`` entries by score are
    labelled at their lines' ends; with ``highlight``, only those entries are, drawn on top, and the
    rest in light grey behind."""
    plt = _pyplot()
    s = doc["summary"]
    styles = entry_styles(doc)
    hl = figstyle.resolve_highlight(highlight, styles)
    entries = [e for e in sorted(s["table"]) if e in s["profile"]["time"] or e in s["profile"]["steps"]]
    cols = _legend_rows({e: styles[e] for e in entries}, hl, max_cols=6) if entries else []
    rows = max((len(c) for c in cols), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + (_legend_height(rows) if cols else 0)), sharey=True,
                             layout="constrained")
    tau = s["profile"]["tau"]
    labelled = []
    for ax, kind in zip(axes, ("time", "steps")):
        prof = s["profile"][kind]
        for e in sorted(entries, key=lambda e: e in hl):
            if e in prof:
                ax.step(tau, prof[e], where="post", gid=e, label=e, **_draw_kw(e, styles[e], hl))
        ax.set_xscale("log")
        ax.set_xlim(tau[0], tau[-1])
        ticks = [2.0 ** i for i in range(int(math.log2(tau[-1])) + 1)] if tau[-1] > tau[0] == 1 else []
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"tau (ratio to fastest {kind}-to-target)")
        ax.set_title(f"performance profile ({kind})")
        scores = {e: v for e, v in s["scores"][kind].items() if e in prof and e in styles}
        named = sorted(hl & set(scores), key=lambda e: (-scores[e], e)) if hl else figstyle.top_k(scores, top_k)
        # (reversed: of labels at one height, the best comes out on top)
        labelled.append((ax, _end_labels(ax, [(e, tau[-1], prof[e][-1], styles[e].color) for e in named[::-1]])))
    axes[0].set_ylabel("fraction of tasks within tau")
    if cols:
        _legend(fig, styles, hl, cols)
    _nudge_labels(fig, labelled)
    return fig


def lr_figure(doc: dict[str, Any]) -> Any | None:
    """Worst-seed final validation loss / target against the learning rate, per tuned optimizer
    (``None`` if nothing was tuned)."""
    plt = _pyplot()
    s = doc["summary"]
    chosen = {tuple(k.split("|")): v for k, v in s["chosen_lr"].items()}
    tasks = sorted({r["task"] for r in doc["runs"]})
    tuned = sorted({o for (_, o) in chosen})
    if not tuned:
        return None
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
    return fig


def write_figures(doc: dict[str, Any], out: str | Path, highlight: str | Sequence[str] | None = None, *,
                  top_k: int = 5) -> list[str]:
    """Loss curves per task, the performance profiles, and learning-rate sensitivity, as PNGs in
    ``out``; returns their file names. ``highlight`` (an entry name, an optimizer name for its
    ``-tuned``/``-default`` entries, or a sequence of them) draws those entries on top and the
    others in light grey (a ``ValueError`` lists the valid names if one matches nothing); the
    profile labels the ``top_k`` entries by score at their lines' ends, or the highlighted ones."""
    out = Path(out)
    figstyle.resolve_highlight(highlight, entry_styles(doc))  # (a bad name fails before any file is written)
    plt = _pyplot()
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        try:
            _savefig(fig, out / name, dpi=110, bbox_inches="tight", pad_inches=0.08)
        finally:
            plt.close(fig)
        names.append(name)

    for t in sorted({r["task"] for r in doc["runs"]}):
        save(curves_figure(doc, t, highlight=highlight), f"curves_{t}.png")
    save(profile_figure(doc, highlight=highlight, top_k=top_k), "profile.png")
    fig = lr_figure(doc)
    if fig is not None:
        save(fig, "lr_sensitivity.png")
    return names


def redraw(results: str | Path, out: str | Path | None = None,
           highlight: str | Sequence[str] | None = None, *, top_k: int = 5) -> list[str]:
    """Draw the figures of an existing ``results.json`` again (into ``out``, by default the file's
    folder), e.g. with another ``highlight``; returns the file names written. Figures only: the
    report and the results stay as they are."""
    from .schema import validate

    path = Path(results)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"results={str(results)!r} is invalid: {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"results={str(results)!r} is invalid: {str(path)!r} is not JSON ({e})") from None
    errors = validate(doc)
    if errors:
        raise ValueError(f"results={str(results)!r} is invalid: {str(path)!r} is not a bench results document ("
                         + "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "") + ")")
    dest = path.parent if out is None else Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    return write_figures(doc, dest, highlight, top_k=top_k) if doc["runs"] else []
