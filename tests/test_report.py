"""Published results: the code hash, the comparison rules, the check, the store and the CLI.

The documentation's own guarantees (every block renders from its result, no hand-typed number)
are in ``tests/test_docs.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nestopt.cli import main
from nestopt.report import codehash
from nestopt.report.blocks import BlockError, blocks, hand_typed, render_text
from nestopt.report.check import check, status
from nestopt.report.compare import diff
from nestopt.report.published import CHEAP, RECORDS, Published, get
from nestopt.report.render import names, render
from nestopt.report.store import ReportError, drop, load, normalise, store, stored

ROOT = Path(__file__).resolve().parent.parent


# -- the code hash -------------------------------------------------------------------------------

def test_closure_follows_imports_at_any_depth_and_includes_packages_and_shipped_data():
    files = codehash.closure(["nestopt.studies.learned"])
    # imported at module level, inside a function (``_make`` imports the bench registry), a package's
    # __init__ on the way, and the weights that ship with the networks
    for f in ("nestopt/studies/learned.py", "nestopt/train/loop.py", "nestopt/bench/registry.py",
              "nestopt/optim/learned.py", "nestopt/studies/__init__.py", "nestopt/__init__.py",
              "nestopt/nets/shipped/default.safetensors"):
        assert f in files, f
    assert "nestopt/cli.py" not in files and not any(f.startswith("nestopt/report/") for f in files)
    assert "nestopt/studies/games.py" not in files  # another study's module is not part of this one


def test_closure_refuses_an_unknown_entry():
    with pytest.raises(ValueError, match="entry 'nestopt.nope' is invalid"):
        codehash.closure(["nestopt.nope"])


def test_code_hash_changes_with_any_file_and_changed_names_it():
    a = {"nestopt/a.py": "1", "nestopt/b.py": "2"}
    b = {"nestopt/a.py": "1", "nestopt/b.py": "3", "nestopt/c.py": "4"}
    assert codehash.code_hash(a) != codehash.code_hash(b)
    assert codehash.code_hash(a) == codehash.code_hash(dict(reversed(list(a.items()))))
    assert codehash.changed(a, b) == ["nestopt/b.py", "+nestopt/c.py"]
    assert codehash.changed(b, a) == ["nestopt/b.py", "-nestopt/c.py"]


# -- comparing a rerun ---------------------------------------------------------------------------

REC = Published("t", (), CHEAP, ("nestopt",), "", times=("*/wall_s",), ignore=("when", "runs/*/noise"))


def test_steps_and_verdicts_compare_exactly():
    old = {"runs": [{"steps": 10, "verdict": "holds", "ok": True}]}
    assert diff(old, old, REC) == []
    assert diff(old, {"runs": [{"steps": 11, "verdict": "holds", "ok": True}]}, REC) == ["runs/0/steps: 10 -> 11"]
    assert diff(old, {"runs": [{"steps": 10, "verdict": "does not hold", "ok": True}]}, REC) == \
        ["runs/0/verdict: 'holds' -> 'does not hold'"]
    assert diff(old, {"runs": [{"steps": 10, "verdict": "holds", "ok": 1}]}, REC) == ["runs/0/ok: True -> 1"]


def test_floats_compare_to_a_relative_tolerance():
    assert diff({"x": 1.0}, {"x": 1.0 + 1e-9}, REC) == []
    assert diff({"x": 1.0}, {"x": 1.0 + 1e-4}, REC) == ["x: 1.0 -> 1.0001"]


def test_times_compare_within_a_factor_and_ignored_paths_not_at_all():
    assert diff({"a": {"wall_s": 10.0}}, {"a": {"wall_s": 40.0}}, REC) == []
    assert diff({"a": {"wall_s": 10.0}}, {"a": {"wall_s": 60.0}}, REC) == ["a/wall_s: 10.0 -> 60.0"]
    assert diff({"a": {"wall_s": 0.001}}, {"a": {"wall_s": 0.04}}, REC) == []  # below the timer's floor
    assert diff({"when": "monday", "runs": [{"noise": 1}]}, {"when": "tuesday", "runs": [{"noise": 2}]}, REC) == []


def test_missing_and_extra_keys_and_list_lengths_are_differences():
    assert diff({"a": 1}, {}, REC) == ["a: missing from the rerun"]
    assert diff({}, {"a": 1}, REC) == ["a: not in the stored result"]
    assert diff({"l": [1, 2]}, {"l": [1]}, REC) == ["l: 2 items -> 1"]


def test_drop_and_normalise():
    doc = {"runs": [{"loss": [1, 2], "x": 1}], "path": "/tmp/o/net.safetensors"}
    assert drop(doc, ("runs/*/loss",)) == {"runs": [{"x": 1}], "path": "/tmp/o/net.safetensors"}
    assert normalise(doc, "/tmp/o") == {"runs": [{"x": 1}], "path": "$OUT/net.safetensors"}
    # a shipped network's file names the package, which a fresh clone holds elsewhere
    assert normalise(str(codehash.PACKAGE / "nets" / "shipped" / "mlp.safetensors"), "/tmp/o") == \
        "$PACKAGE/nets/shipped/mlp.safetensors"


# -- the check and the store ---------------------------------------------------------------------

def _root_with(tmp_path: Path, key: str) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs" / "results" / key, root / "docs" / "results" / key)
    return root


def _given(tmp_path: Path, root: Path, key: str, edit=None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    doc, _ = load(root, key)
    doc = json.loads(json.dumps(doc).replace("$OUT", str(run)))
    if edit:
        edit(doc)
    (run / get(key).result).write_text(json.dumps(doc))
    return run


def test_check_passes_on_a_run_that_reproduces_the_stored_result(tmp_path):
    root = _root_with(tmp_path, "large-lr")
    lines: list[str] = []
    assert check(root, cheap_only=True, given={"large-lr": _given(tmp_path, root, "large-lr")}, log=lines.append,
                 keys=["large-lr"])
    assert lines[0].startswith("ok   large-lr")


def test_check_fails_on_a_changed_verdict_and_names_it(tmp_path):
    root = _root_with(tmp_path, "large-lr")

    def flip(doc):
        doc["verdicts"][0]["verdict"] = "holds"

    lines: list[str] = []
    assert not check(root, cheap_only=True, given={"large-lr": _given(tmp_path, root, "large-lr", flip)},
                     log=lines.append, keys=["large-lr"])
    assert lines[0].startswith("FAIL large-lr") and "verdicts/0/verdict: 'does not hold' -> 'holds'" in lines[1]


@pytest.mark.parametrize("cpu, fresh, stable, passes", [
    ("Another CPU", True, True, True),  # the machine's doing: a warning
    ("Another CPU", True, False, False),  # two reruns here disagree: not deterministic
    ("Another CPU", False, True, False),  # the code changed: it must reproduce
    ("same", True, True, False),  # the same processor: it must reproduce
    ("", True, True, False),  # an unknown processor
])
def test_a_difference_on_another_processor_warns_only_when_the_code_is_the_stored_code(
        tmp_path, monkeypatch, cpu, fresh, stable, passes):
    import nestopt.report.check as check_mod
    from nestopt.report.store import PINNED_ENV, current_hashes, environment

    root = _root_with(tmp_path, "large-lr")
    path = root / "docs" / "results" / "large-lr" / "provenance.json"
    prov = json.loads(path.read_text())
    here = environment()
    prov["environment"].update(cpu=here["cpu"] if cpu == "same" else cpu, torch=here["torch"],
                               optional=here["optional"], pinned=PINNED_ENV)
    now = current_hashes(get("large-lr"))
    prov["files"] = now if fresh else {**now, "nestopt/schedule/grid.py": "0" * 16}
    prov["code_hash"] = codehash.code_hash(prov["files"])
    path.write_text(json.dumps(prov))
    stored, _ = load(root, "large-lr")
    reruns = []

    def rerun(rec, out, quiet=False):  # the rerun: one number off the stored result
        doc = json.loads(json.dumps(stored))
        doc["verdicts"][0]["verdict"] = "holds" if stable or not reruns else "maybe"
        reruns.append(doc)
        return doc, {**prov, "wall_s": prov["wall_s"]}

    monkeypatch.setattr(check_mod, "run", rerun)
    lines: list[str] = []
    assert check(root, cheap_only=True, log=lines.append, keys=["large-lr"]) is passes
    verdict = [line for line in lines if line.startswith(("WARN", "FAIL", "ok"))][0]
    assert verdict.startswith("WARN large-lr" if passes else "FAIL large-lr"), lines
    assert len(reruns) == (2 if cpu == "Another CPU" and fresh else 1)
    if passes:
        assert "stored on Another CPU, rerun on " in verdict and "verdicts/0/verdict: 'does not hold' -> 'holds'" in lines[-1]
    elif not stable:
        assert "not deterministic" in verdict


def test_a_given_run_is_compared_as_it_is_whatever_the_processor(tmp_path):
    root = _root_with(tmp_path, "large-lr")
    path = root / "docs" / "results" / "large-lr" / "provenance.json"
    prov = json.loads(path.read_text())
    prov["environment"]["cpu"] = "Another CPU"
    path.write_text(json.dumps(prov))

    def flip(doc):
        doc["verdicts"][0]["verdict"] = "holds"

    lines: list[str] = []
    assert not check(root, cheap_only=True, given={"large-lr": _given(tmp_path, root, "large-lr", flip)},
                     log=lines.append, keys=["large-lr"])
    assert lines[0].startswith("FAIL large-lr")


def test_an_expensive_result_whose_code_changed_is_listed_with_the_files(tmp_path):
    root = tmp_path / "repo"
    (root / "docs" / "results" / "games").mkdir(parents=True)
    rec = get("games")
    from nestopt.report.store import current_hashes

    files = current_hashes(rec)
    assert status(root, rec) == ("missing", [])
    old = dict(files, **{"nestopt/studies/games.py": "0" * 16})
    prov = {"key": "games", "code_hash": codehash.code_hash(old), "files": old}
    (root / "docs" / "results" / "games" / "provenance.json").write_text(json.dumps(prov))
    assert status(root, rec) == ("stale", ["nestopt/studies/games.py"])
    lines: list[str] = []
    assert check(root, log=lines.append, keys=["games"])  # listed, not failed
    assert lines == ["STALE games: its code changed since it was stored (nestopt/studies/games.py); "
                     "remake it with `nestopt report --run games`"]
    prov = {"key": "games", "code_hash": codehash.code_hash(files), "files": files}
    (root / "docs" / "results" / "games" / "provenance.json").write_text(json.dumps(prov))
    assert status(root, rec) == ("fresh", [])


def test_store_replaces_a_result_whole_and_keeps_its_figures(tmp_path):
    rec = Published("toy", (), CHEAP, ("nestopt",), "", keep=("results.json", "*.png"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"png")
    (out / "results.json").write_text("{}")
    root = tmp_path / "repo"
    dest = store(rec, root, out, {"x": 1}, {"key": "toy"})
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "provenance.json", "results.json"]
    (out / "a.png").unlink()
    dest = store(rec, root, out, {"x": 2}, {"key": "toy"})
    assert sorted(p.name for p in dest.iterdir()) == ["provenance.json", "results.json"]
    assert json.loads((dest / "results.json").read_text()) == {"x": 2}
    assert [p.name for p in dest.parent.iterdir()] == ["toy"]  # no temporary folder left behind


def test_load_names_a_missing_result(tmp_path):
    with pytest.raises(ReportError, match="no stored result 'games'.*nestopt report --run games"):
        load(tmp_path, "games")


# -- blocks and renderers ------------------------------------------------------------------------

def test_blocks_are_found_and_rendered_in_place():
    text = "a\n<!-- generated: x.y -->\nold\n<!-- end generated -->\nb\n"
    assert [n for n, _, _ in blocks(text)] == ["x.y"]
    assert render_text(text, lambda name: f"new {name}") == "a\n<!-- generated: x.y -->\nnew x.y\n<!-- end generated -->\nb\n"


def test_a_block_without_its_end_is_refused():
    with pytest.raises(BlockError, match="line 2: block 'x' has no"):
        blocks("a\n<!-- generated: x -->\n<!-- generated: y -->\n<!-- end generated -->\n")


def test_hand_typed_finds_measured_numbers_but_not_code_citations_or_lists():
    text = "\n".join([
        "The hybrid diverged in 25 of 36 runs, 0.48 vs 0.89, 3.2x faster, 87 s.",
        "API values are code: `lr=1e-3`, `window=8`.",
        "```", "x = 0.5", "```",
        "After Wu et al. 2018 and issue 21; see issues 21 and 22. float32 and bfloat16 are names.",
        "1. a numbered list",
        "<!-- a comment with 12 -->",
        "<!-- generated: a.b -->", "| 0.705 |", "<!-- end generated -->",
        "[a link](docs/x2.md)",
    ])
    assert hand_typed(text) == [(1, "25"), (1, "36"), (1, "0.48"), (1, "0.89"), (1, "3.2x"), (1, "87")]
    # a capitalised word before a number is no citation, and a multiplier written x10 is a number
    assert hand_typed("After 2000 steps it reads x10.") == [(1, "2000"), (1, "x10")]


def test_every_renderer_has_a_published_result_and_an_unknown_block_is_refused():
    from nestopt.report.render import RENDERERS

    keys = {k for key, _ in RENDERERS.values() for k in ((key,) if isinstance(key, str) else key)}
    assert keys <= set(RECORDS)
    with pytest.raises(ReportError, match="block 'nope.x' has no renderer"):
        render(ROOT, "nope.x")
    assert "summary.latest" in names()


def test_a_block_of_a_result_never_stored_says_so(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    text = render(tmp_path, "games.ridge")
    assert text.startswith("*Not measured in this version:*") and "nestopt report --run games" in text
    assert not any(ch.isdigit() for ch in text.replace("nestopt", ""))


def test_rendered_blocks_end_with_their_source():
    text = render(ROOT, "polyak.verdicts")
    assert "From `nestopt study polyak --out DIR`" in text.splitlines()[-1]
    assert "stored in `docs/results/polyak/`" in text


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["report", "--run", "nope"], "--run 'nope' is invalid: expected one of polyak"),
    (["report", "--verify"], "one of the arguments --run --docs --check --list is required"),
    (["report", "--docs", "--cheap-only"], "--cheap-only applies to --check only"),
    (["report", "--list", "--verify"], "--verify applies to --docs only"),
    (["report", "--check", "--given", "nope=/tmp"], "--given 'nope=/tmp' is invalid: expected KEY=DIR"),
    (["report", "--check", "--given", "games=/tmp"], "--given 'games=/tmp' is invalid: expected KEY=DIR with KEY a cheap"),
])
def test_bad_report_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv + ["--root", str(ROOT)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_root_without_results_exits_2(tmp_path, capsys):
    assert main(["report", "--list", "--root", str(tmp_path)]) == 2
    assert "has no docs/results folder" in capsys.readouterr().err


def test_report_list_names_every_result(capsys):
    assert main(["report", "--list", "--root", str(ROOT)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(RECORDS)


@pytest.mark.parametrize("module", ["codehash", "compare", "published"])
def test_the_modules_examples_run(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(f"nestopt.report.{module}")).failed == 0


def _repo_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "README.md", root / "README.md")
    return root


def test_a_changed_result_shows_up_as_a_block_that_differs_and_docs_rewrites_it(tmp_path):
    from nestopt.report.blocks import render_all

    root = _repo_copy(tmp_path)
    assert render_all(root, write=False) == []
    path = root / "docs" / "results" / "learned" / "results.json"
    doc = json.loads(path.read_text())
    long = next(r for r in doc["long"] if r["net"] == "shipped default (linear)")
    long["speedup"] = 0.5
    path.write_text(json.dumps(doc))
    changed = render_all(root, write=False)
    assert ("docs/learned.md", "learned.table") in changed and ("README.md", "summary.latest") in changed
    assert render_all(root, write=True) == changed
    text = (root / "docs" / "learned.md").read_text()
    assert "it is slower than tuned AdamW (0.500x" in text
    assert render_all(root, write=False) == []


def test_the_learned_sentence_follows_the_long_horizon_result():
    from nestopt.report.render.studies import learned_table

    doc, _ = load(ROOT, "learned")
    label = next(iter(doc["nets"]))
    long = next(r for r in doc["long"] if r["net"] == label)
    for speedup, words in ((3.0, "reaches the target 3.00x sooner than tuned AdamW"), (0.5, "is slower than tuned AdamW"),
                           (0.0, "its median seed never reaches the target")):
        long["speedup"] = speedup
        sentence = next(line for line in learned_table(doc).splitlines() if line.startswith(f"**{label}**"))
        assert words in sentence, (speedup, sentence)


# -- what a rerun may and may not change ---------------------------------------------------------

def _scaled(doc, rec, factor, only_times):
    """``doc`` with every numeric leaf that the record treats as a time (or every other float)
    multiplied by ``factor``."""
    from nestopt.report.compare import _match, _skipped

    out = json.loads(json.dumps(doc))
    bumped: list[str] = []

    def walk(node, path):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in list(items):
            p = f"{path}/{k}" if path else str(k)
            if isinstance(v, (dict, list)):
                walk(v, p)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0:
                timed = _match(p, rec.times) or _skipped(p, rec)
                if timed == only_times and isinstance(v, float):
                    node[k] = v * factor
                elif timed == only_times == False and not bumped:  # noqa: E712 (a result of integers only)
                    node[k] = v + 1
                    bumped.append(p)

    walk(out, "")
    return out


@pytest.mark.parametrize("key", [k for k in stored(ROOT) if RECORDS[k].cost == CHEAP])
def test_a_slower_machine_passes_and_a_changed_number_fails(key):
    rec = RECORDS[key]
    doc, _ = load(ROOT, key)
    assert diff(doc, _scaled(doc, rec, 3.0, only_times=True), rec) == []  # every time 3x slower: same result
    changed = diff(doc, _scaled(doc, rec, 1.001, only_times=False), rec)
    assert changed, "no compared number in the result"  # every other float 0.1% off, one integer +1: drift


@pytest.mark.parametrize("key", [k for k, r in RECORDS.items() if r.cost == CHEAP])
def test_every_cheap_result_is_stored_with_the_pinned_numerics(key):
    from nestopt.report.store import PINNED_ENV

    assert key in stored(ROOT), f"cheap result {key} is not stored: `nestopt report --run {key}`"
    _, prov = load(ROOT, key)
    assert prov["environment"]["pinned"] == PINNED_ENV


def test_run_makes_the_output_folder_and_pins_the_numerics_of_a_cheap_command(tmp_path):
    from nestopt.report.store import PINNED_ENV, run

    code = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1] + '/results.json', 'w'))"
    rec = Published("env", ("python", "-c", code, "{out}"), CHEAP, ("nestopt.schedule",), "")
    doc, prov = run(rec, tmp_path / "out", quiet=True)
    assert {k: doc[k] for k in PINNED_ENV} == PINNED_ENV
    assert prov["environment"]["pinned"] == PINNED_ENV and prov["command"].startswith("python -c")
    fail = Published("fail", ("python", "-c", "import sys; sys.exit('it broke')"), CHEAP, ("nestopt.schedule",), "")
    with pytest.raises(ReportError, match="exited with code 1: it broke"):
        run(fail, tmp_path / "out2", quiet=True)


def test_a_check_that_cannot_rerun_one_result_goes_on_with_the_others(tmp_path, monkeypatch):
    import nestopt.report.check as check_mod

    root = _root_with(tmp_path, "large-lr")
    shutil.copytree(ROOT / "docs" / "results" / "polyak", root / "docs" / "results" / "polyak")

    def broken(rec, out, quiet=False):
        raise ReportError(f"{rec.command()} exited with code 1: boom")

    monkeypatch.setattr(check_mod, "run", broken)
    lines: list[str] = []
    assert not check(root, cheap_only=True, log=lines.append, keys=["polyak", "large-lr"])
    assert [line.split(":")[0] for line in lines if line.startswith("FAIL")] == ["FAIL polyak", "FAIL large-lr"]


def test_a_result_stored_without_the_pinned_numerics_is_refused_by_the_check(tmp_path):
    root = _root_with(tmp_path, "large-lr")
    path = root / "docs" / "results" / "large-lr" / "provenance.json"
    prov = json.loads(path.read_text())
    prov["environment"]["pinned"] = {}
    path.write_text(json.dumps(prov))
    lines: list[str] = []
    assert not check(root, cheap_only=True, given={"large-lr": _given(tmp_path, root, "large-lr")}, log=lines.append,
                     keys=["large-lr"])
    assert "stored with other numerics" in lines[0]


def test_a_failed_swap_keeps_the_old_result(tmp_path, monkeypatch):
    rec = Published("toy", (), CHEAP, ("nestopt",), "")
    out = tmp_path / "out"
    out.mkdir()
    root = tmp_path / "repo"
    store(rec, root, out, {"x": 1}, {"key": "toy"})
    real = Path.rename
    calls = []

    def flaky(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # the old result moved aside, then the new one fails to move in
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", flaky)
    with pytest.raises(OSError, match="disk full"):
        store(rec, root, out, {"x": 2}, {"key": "toy"})
    monkeypatch.setattr(Path, "rename", real)
    assert json.loads((root / "docs" / "results" / "toy" / "results.json").read_text()) == {"x": 1}
    assert [p.name for p in (root / "docs" / "results").iterdir()] == ["toy"]


def test_two_blocks_of_one_name_are_checked_each(tmp_path):
    from nestopt.report.blocks import render_all

    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs" / "results" / "polyak", root / "docs" / "results" / "polyak")
    (root / "docs" / "index.md").parent.mkdir(exist_ok=True)
    body = render(root, "polyak.verdicts")
    block = f"<!-- generated: polyak.verdicts -->\n{body}<!-- end generated -->\n"
    (root / "README.md").write_text(block + "text\n" + block.replace("confirmed", "CONFIRMED", 1))
    assert render_all(root, write=False) == [("README.md", "polyak.verdicts")]


def test_a_damaged_result_is_an_error_not_a_missing_one(tmp_path):
    root = _root_with(tmp_path, "large-lr")
    (root / "docs" / "results" / "large-lr" / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot be read as JSON"):
        render(root, "large-lr.claims")


def test_a_block_without_its_end_exits_with_one_line_naming_the_file(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "docs" / "results").mkdir(parents=True)
    (root / "README.md").write_text("a\n<!-- generated: polyak.verdicts -->\nno end\n")
    assert main(["report", "--docs", "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "nestopt: report: README.md: line 2: block 'polyak.verdicts' has no `<!-- end generated -->` after it"


def test_package_data_hashed_is_what_the_package_ships():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nestopt"]
    assert list(codehash.DATA) == declared
