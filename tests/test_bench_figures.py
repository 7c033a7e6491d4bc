"""Figure styling of the bench: families, line styles, highlight and end labels (nestopt.bench.figstyle)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from matplotlib.lines import Line2D

from nestopt.bench import figstyle, registry, report
from nestopt.bench.figstyle import FAMILY_COLORS, MUTED, assign, resolve_highlight, spread
from nestopt.bench.scoring import entries_of

# A realistic 25-entry bench: entry -> family.
FAMILIES = {
    "sgd-tuned": "baseline", "sgd-momentum-tuned": "baseline", "adam-tuned": "baseline", "adamw-tuned": "baseline",
    "adamw-default": "baseline",
    "prodigy": "peer", "schedulefree-adamw": "peer", "muon-tuned": "peer", "muon-default": "peer",
    "soap-tuned": "peer", "soap-default": "peer", "kron-tuned": "peer", "ademamix-tuned": "peer",
    "polyak": "polyak", "polyak-tensor": "polyak", "polyak-rms": "polyak", "polyak-adam": "polyak",
    "learned": "learned",
    "adamw-hd": "nested", "sgd-hd": "nested", "nested-adamw": "nested",
    "sgd-largelr-tuned": "schedule",
    "complex-momentum": "games", "complex-adam": "games",
    "old-entry": "other",
}
TASKS = ["quad-asym", "quad-sym", "digits-logreg", "digits-mlp"]


def synthetic_doc(families=FAMILIES, *, carry_families=True, seed=0):
    """A results document with every entry of ``families`` on TASKS: random profiles, and curves for
    the entries whose optimizer is untuned (so scoring's ``entries_of`` maps runs to them by name)."""
    rng = random.Random(seed)
    entries = sorted(families)
    taus = [16.0 ** (i / 199) for i in range(200)]
    ratios = {e: {t: (1 + rng.expovariate(0.5) if rng.random() < 0.85 else math.inf) for t in TASKS} for e in entries}
    profile = {e: [sum(r <= tau for r in rat.values()) / len(TASKS) for tau in taus] for e, rat in ratios.items()}
    scores = {e: sum(p) / len(p) for e, p in profile.items()}
    runs = []
    for e in entries:
        for t in TASKS:
            rate = 0.02 + 0.1 * rng.random()
            steps = list(range(0, 101, 10))
            vals = [math.exp(-rate * s) + 0.01 for s in steps]
            run = {"task": t, "optimizer": e, "lr": 1e-3, "seed": 0,
                   "curve": {"step": steps, "val_loss": vals, "train_loss": vals, "time_s": steps}}
            if set(entries_of([run], {})) == {e}:  # (a run of an untuned optimizer, or one unknown)
                runs.append(run)
    summary = {
        "targets": {t: {"val_loss": 0.05, "adamw_lr": 1e-3} for t in TASKS},
        "chosen_lr": {},
        "table": {e: {t: {} for t in TASKS} for e in entries},
        "ratios": {"time": ratios, "steps": ratios},
        "profile": {"tau": taus, "time": profile, "steps": profile},
        "scores": {"time": scores, "steps": {e: scores[e] * (1 - 0.01 * i) for i, e in enumerate(entries)}},
    }
    if carry_families:
        summary["families"] = dict(families)
    return {"schema_version": 1, "created": "now", "complete": True, "environment": {}, "config": {},
            "runs": runs, "summary": summary}


def _pairs(styles):
    return [(s.color, s.linestyle) for s in styles.values()]


def test_no_entries_share_colour_and_line_style():
    styles = assign(FAMILIES, FAMILIES)
    assert len(styles) == 25
    assert len(set(_pairs(styles))) == 25
    big = {f"peer-{i:02d}": "peer" for i in range(40)} | {f"b{i}": "baseline" for i in range(40)}
    styles = assign(big, big)
    assert len(set(_pairs(styles))) == 80
    assert len({s.linestyle for e, s in styles.items() if s.family == "peer"}) == 40
    # past the named styles a marker also tells members apart
    peers = [styles[e] for e in sorted(styles) if e.startswith("peer")]
    assert all(s.marker is None for s in peers[:len(figstyle.LINESTYLES)])
    assert all(s.marker is not None for s in peers[len(figstyle.LINESTYLES):])
    # families not known to figstyle, more of them than extra colours: pairs still distinct
    many = {f"x{i}-{j}": f"fam{i}" for i in range(len(figstyle.EXTRA_COLORS) + 3) for j in range(3)}
    assert len(set(_pairs(assign(many, many)))) == len(many)


def test_colours_follow_families():
    styles = assign(FAMILIES, FAMILIES)
    by_family = {}
    for e, s in styles.items():
        assert s.family == FAMILIES[e]
        by_family.setdefault(s.family, set()).add(s.color)
    assert all(len(c) == 1 for c in by_family.values())  # one colour per family
    colours = [next(iter(c)) for c in by_family.values()]
    assert len(set(colours)) == len(colours)  # a different one for each family
    assert styles["adamw-tuned"].color == FAMILY_COLORS["baseline"]
    assert MUTED not in colours


def test_assignment_is_deterministic_and_sorted_within_family():
    names = list(FAMILIES)
    a = assign(names, FAMILIES)
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    assert assign(shuffled, dict(reversed(list(FAMILIES.items())))) == a
    baseline = sorted(e for e, f in FAMILIES.items() if f == "baseline")
    assert [a[e].linestyle for e in baseline] == list(figstyle.LINESTYLES[:len(baseline)])
    assert figstyle.legend_order(a)[0] == ("baseline", baseline)
    assert [f for f, _ in figstyle.legend_order(a)] == list(figstyle.FAMILIES)


def test_family_falls_back_to_the_registry_then_other():
    fam = figstyle.families_of(["adamw-tuned", "adamw-default", "sgd-momentum-tuned", "prodigy", "no-such-thing",
                                "muon-tuned"])
    assert fam["no-such-thing"] == "other"
    assert fam["adamw-tuned"] == fam["adamw-default"] == fam["sgd-momentum-tuned"] == "baseline"
    assert fam["prodigy"] == "peer"
    assert fam["muon-tuned"] == getattr(registry.get("muon"), "family", "other")
    assert figstyle.families_of(["adamw-tuned"], {"adamw-tuned": "mine"}) == {"adamw-tuned": "mine"}
    assert figstyle.optimizer_of("muon-default") == "muon" and figstyle.optimizer_of("-tuned") == "-tuned"


def test_resolve_highlight():
    entries = list(FAMILIES)
    assert resolve_highlight(None, entries) == set()
    assert resolve_highlight("adamw", entries) == {"adamw-tuned", "adamw-default"}
    assert resolve_highlight("adamw-tuned", entries) == {"adamw-tuned"}
    assert resolve_highlight(["muon", "polyak"], entries) == {"muon-tuned", "muon-default", "polyak"}
    assert resolve_highlight("sgd", entries) == {"sgd-tuned"}  # not sgd-momentum-tuned
    with pytest.raises(ValueError, match=r"highlight='nope' is invalid.*'nope'.*adamw-default, adamw-hd"):
        resolve_highlight("nope", entries)
    with pytest.raises(ValueError, match="highlight="):
        resolve_highlight([3], entries)


def test_spread_keeps_order_and_gap():
    rng = random.Random(1)
    for _ in range(200):
        ys = [rng.choice([0.0, 0.5, 0.95, 1.0, rng.random()]) for _ in range(rng.randint(1, 12))]
        gap = rng.choice([0.02, 0.05, 0.1])
        out = spread(ys, gap)
        order = sorted(range(len(ys)), key=lambda i: (ys[i], i))
        placed = [out[i] for i in order]
        assert all(b - a >= gap - 1e-9 for a, b in zip(placed, placed[1:]))
        if len(ys) * gap <= 1:
            assert all(-1e-9 <= y <= 1 + 1e-9 for y in out)
    assert spread([0.3, 0.8], 0.05) == [0.3, 0.8]  # far apart: where they are
    assert spread([1.0, 1.0, 1.0], 0.1) == pytest.approx([0.8, 0.9, 1.0])


def _lines(ax):
    return {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid() and ln.get_gid() != "target"}


def _labels(ax):
    return [a for a in ax.texts if (a.get_gid() or "").startswith("end-label:")]


def test_profile_styles_and_top_k_labels():
    doc = synthetic_doc()
    fig = report.profile_figure(doc, top_k=5)
    try:
        styles = report.entry_styles(doc)
        for ax, kind in zip(fig.axes, ("time", "steps")):
            lines = _lines(ax)
            assert set(lines) == set(FAMILIES)
            for e, ln in lines.items():
                assert ln.get_color() == styles[e].color
            labels = _labels(ax)
            scores = doc["summary"]["scores"][kind]
            best = sorted(scores, key=lambda e: -scores[e])[:5]
            assert sorted(a.get_text() for a in labels) == sorted(best)
            ys = sorted(a.xyann[1] for a in labels)
            gap = report.label_gap(ax)
            assert all(b - a >= gap - 1e-9 for a, b in itertools.combinations(ys, 2))
            # the gap is at least a line of the label font, in inches on the saved figure
            height_in = ax.get_position().height * fig.get_figheight()
            assert gap * height_in >= report.FONT / 72
            assert all(a.xyann[0] > 1 for a in labels)  # right of the plot, not on the lines
        legend = fig.legends[0]
        texts = [t.get_text() for t in legend.get_texts()]
        assert set(FAMILIES) <= set(texts) and "baseline" in texts
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_highlight_greys_the_others():
    import matplotlib.pyplot as plt

    doc = synthetic_doc()
    styles = report.entry_styles(doc)
    for fig in (report.profile_figure(doc, highlight="muon"), report.curves_figure(doc, "quad-asym", highlight="complex-adam")):
        try:
            hl = {"muon-tuned", "muon-default"} if len(fig.axes) == 2 else {"complex-adam"}
            for ax in fig.axes:
                lines = _lines(ax)
                assert hl <= set(lines)
                top = min(lines[e].get_zorder() for e in hl)
                for e, ln in lines.items():
                    if e in hl:
                        ref = Line2D([], [], linestyle=styles[e].linestyle)
                        assert ln.get_color() == styles[e].color and ln.get_linestyle() == ref.get_linestyle()
                        assert ln._unscaled_dash_pattern == ref._unscaled_dash_pattern  # (the dashes themselves)
                        assert ln.get_linewidth() == report.LW_HIGHLIGHT
                    else:
                        assert ln.get_color() == MUTED and ln.get_linewidth() < report.LW_HIGHLIGHT
                        assert ln.get_zorder() < top
                assert {a.get_text() for a in _labels(ax)} == hl
        finally:
            plt.close(fig)


def test_unknown_highlight_is_a_value_error(tmp_path):
    doc = synthetic_doc()
    with pytest.raises(ValueError, match="'muonn'.*valid names: adam-tuned"):
        report.write_figures(doc, tmp_path, highlight="muonn")
    assert not list(tmp_path.iterdir())  # nothing written


def test_write_figures_and_redraw(tmp_path):
    doc = synthetic_doc(carry_families=False)  # families from the registry; "old-entry" is "other"
    names = report.write_figures(doc, tmp_path, highlight=["adamw", "polyak"])
    assert {"profile.png", "curves_quad-asym.png"} <= set(names)
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    styles = report.entry_styles(doc)
    assert styles["old-entry"].family == "other" and styles["adamw-tuned"].family == "baseline"


def test_redraw_a_real_results_file(tmp_path):
    from nestopt.bench import run_bench

    run_bench(tasks=["quad-asym"], optimizers=["sgd"], seeds=1, steps=20, out=tmp_path / "run", workers=1)
    before = json.loads((tmp_path / "run" / "results.json").read_text())
    names = report.redraw(tmp_path / "run" / "results.json", tmp_path / "again", highlight="sgd")
    assert {"profile.png", "curves_quad-asym.png"} <= set(names)
    assert all((tmp_path / "again" / n).is_file() for n in names)
    assert report.redraw(tmp_path / "run", highlight="adamw-default") == names  # a folder: its results.json
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == before
    with pytest.raises(ValueError, match="'nope'"):
        report.redraw(tmp_path / "run", tmp_path / "x", highlight="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.redraw(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a bench results document"):
        report.redraw(tmp_path / "bad.json")


def test_figstyle_doctest():
    import doctest

    assert doctest.testmod(figstyle).failed == 0


def test_the_figures_command_redraws_and_bad_names_exit_2(tmp_path, capsys):
    from nestopt.cli import main

    out = tmp_path / "run"
    assert main(["bench", "--tasks", "quad-asym", "--optimizers", "sgd", "--seeds", "1", "--steps", "20",
                 "--workers", "1", "--highlight", "sgd", "--label", "2", "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    assert main(["figures", str(out), "--highlight", "adamw", "--out", str(tmp_path / "grey")]) == 0
    assert (tmp_path / "grey" / "profile.png").is_file() and (out / "results.json").read_bytes() == before
    assert "wrote" in capsys.readouterr().out
    for argv, message in [
        (["figures", str(out), "--highlight", "nope"], "highlight='nope' is invalid"),
        (["figures", str(tmp_path / "missing")], "does not exist"),
        (["figures", str(out), "--label", "0"], "--label 0 is invalid"),
        (["bench", "--tasks", "quad-asym", "--optimizers", "sgd", "--highlight", "muon", "--out", str(tmp_path / "b")],
         "--highlight 'muon' is invalid"),
        (["bench", "--tasks", "quad-asym", "--highlight", ",", "--out", str(tmp_path / "b")], "it names no entry"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "b").exists()  # a bad --highlight fails before anything runs or is written
