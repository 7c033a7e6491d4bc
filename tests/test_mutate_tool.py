"""tools/mutate.py: site enumeration, single-change mutants, seeded sampling, score arithmetic.

Fast and self-contained: nothing here runs pytest or touches the real source tree.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "mutate.py"


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("nestopt_mutate_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


SOURCE = '''"""Module docstring with 1 + 2 and x < y in it."""

from __future__ import annotations

from ._checks import check_number


def f(a: float, b: int = 3, *, flag: bool = True) -> float:
    """Docstring: a - b, not c, return 0."""
    check_number("a", a, lo=0.0)
    if a < 0:
        raise ValueError(f"a={a + 1} is invalid")
    x: list[int] = [1]
    y = a + b * 2.5 - a / b
    z = a ** 2
    if x[0] <= b and not flag or a == b:
        y += 1
    w = -a if a > b else min(a, b)
    s = f"{a * 2}"
    assert y != 7, "never"
    return y + z + w


def g(t):
    m = t.max()
    if t is None:
        return None
    return m


LONG = (1 +
        2)
'''


def test_every_kind_is_found_and_the_skipped_parts_yield_nothing(mutate):
    sites = mutate.find_sites(SOURCE, "m.py")
    kinds = Counter(s.kind for s in sites)
    assert set(kinds) == set(mutate.KINDS)
    by_line: dict[int, list] = {}
    for s in sites:
        by_line.setdefault(s.line, []).append(s)
    lines = SOURCE.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, ln in enumerate(lines, 1) if text in ln)

    # skipped: docstrings, the check_* call, the raise (and the `if` that only guards it),
    # annotations (`list[int]`, `-> float`), f-strings, the assert
    for text in ('"""Module docstring', '"""Docstring', "check_number(", "if a < 0:", "raise ValueError",
                 's = f"{a * 2}"', "assert y != 7"):
        assert line_of(text) not in by_line, (text, by_line.get(line_of(text)))
    ann = [s for s in by_line[line_of("x: list[int] = [1]")]]
    assert {(s.before, s.after) for s in ann} == {("1", "2"), ("1", "0")}  # the value, not the annotation
    sig = {(s.before, s.after) for s in by_line[line_of("def f(")]}
    assert sig == {("3", "4"), ("True", "False")}  # defaults only

    y_line = {(s.kind, s.before, s.after) for s in by_line[line_of("y = a + b * 2.5")]}
    assert y_line == {("arith", "+", "-"), ("arith", "*", "/"), ("arith", "-", "+"), ("arith", "/", "*"),
                      ("const", "2.5", "(-2.5)"), ("const", "2.5", "1.25")}
    z_line = {(s.kind, s.before, s.after) for s in by_line[line_of("z = a ** 2")]}
    assert z_line == {("arith", "**", "*"), ("const", "2", "3")}
    cond = {(s.kind, s.before, s.after) for s in by_line[line_of("if x[0] <= b")]}
    assert {("compare", "<=", "<"), ("compare", "==", "!="), ("boolop", "and", "or"), ("boolop", "or", "and"),
            ("not", "not ", ""), ("const", "0", "1")} == cond
    assert {(s.kind, s.after) for s in by_line[line_of("y += 1")]} == {("augassign", "-="), ("const", "2"),
                                                                       ("const", "0")}
    w = {(s.kind, s.before, s.after) for s in by_line[line_of("w = -a")]}
    assert w == {("neg", "-", ""), ("compare", ">", ">="), ("compare", ">", "<"), ("minmax", "min", "max")}
    assert ("return", "return y + z + w", "return None") in {(s.kind, s.before, s.after) for s in sites}
    # g returns None on one path: its other return is not mutated to None; t.max() -> t.min() is
    assert not [s for s in sites if s.kind == "return" and s.line > line_of("def g")]
    assert [(s.before, s.after) for s in by_line[line_of("m = t.max()")]] == [("max", "min")]


def test_a_mutant_changes_exactly_one_spot_and_keeps_every_other_line(mutate):
    sites = mutate.find_sites(SOURCE, "m.py")
    original = SOURCE.splitlines(keepends=True)
    for s in sites:
        mutated = mutate.apply(SOURCE, s)
        assert mutate.check_mutant(SOURCE, s, mutated) is None, s
        new = mutated.splitlines(keepends=True)
        assert len(new) == len(original)
        changed = [i for i, (a, b) in enumerate(zip(original, new)) if a != b]
        if s.kind == "return" or s.kind == "arith" and s.before == "**":
            assert 1 <= len(changed) <= 2, s  # a multi-line value, or the parentheses around a ** b
        else:
            assert changed == [s.line - 1], s
    one = next(s for s in sites if s.kind == "arith" and s.before == "*" and s.line == 14)
    mutated = mutate.apply(SOURCE, one).splitlines()
    assert mutated[13] == "    y = a + b / 2.5 - a / b"
    pw = next(s for s in sites if s.kind == "arith" and s.before == "**")
    assert mutate.apply(SOURCE, pw).splitlines()[pw.line - 1] == "    z = (a * 2)"
    # the multi-line value becomes None and the file keeps its line count
    long = [s for s in sites if s.line == SOURCE.splitlines().index("LONG = (1 +") + 1]
    assert {(s.kind, s.after) for s in long} >= {("arith", "-"), ("const", "2")}


def test_return_none_keeps_line_numbers_for_a_multiline_value(mutate):
    src = "def h(a, b):\n    return (a +\n            b)  # sum\n\n\ndef k():\n    return 1\n"
    sites = [s for s in mutate.find_sites(src) if s.kind == "return"]
    assert [s.line for s in sites] == [2, 7]
    for s in sites:
        out = mutate.apply(src, s)
        assert mutate.check_mutant(src, s, out) is None
        assert out.count("\n") == src.count("\n")
        assert out.splitlines()[5:] == src.splitlines()[5:] or s.line == 7


def test_return_none_only_where_the_function_never_returns_none(mutate):
    src = ("def falls_off(x):\n    if x:\n        return 1\n\n\n"
           "def both(x):\n    if x:\n        return 1\n    else:\n        return 2\n\n\n"
           "def gen(x):\n    yield x\n    return 3\n\n\n"
           "def outer(x):\n    def inner():\n        return None\n    return inner\n")
    returns = [s.line for s in mutate.find_sites(src) if s.kind == "return"]
    assert returns == [8, 10, 21]  # both's two returns and outer's (inner's None is its own)


def test_a_mutant_that_would_change_more_than_its_node_is_reported(mutate):
    src = "x = a / b ** c\n"
    s = next(s for s in mutate.find_sites(src) if s.before == "**")
    assert mutate.check_mutant(src, s) is None  # the tool parenthesizes: a / (b * c)
    bare = mutate.Site(s.file, s.line, s.col, s.kind, s.before, s.after, s.node, s.change,
                       tuple(e for e in s.edits if e[2] == "*"))
    assert mutate.apply(src, bare) == "x = a / b * c\n"
    assert "differs" in mutate.check_mutant(src, bare)  # a / b * c regroups: caught, not run


def test_the_sample_is_reproducible_for_a_seed_and_sorted(mutate):
    sites = mutate.find_sites(SOURCE, "m.py")
    a = mutate.sample_sites(sites, 7, seed=3)
    b = mutate.sample_sites(list(reversed(sites)), 7, seed=3)
    assert a == b and len(a) == 7
    assert [s.key for s in a] == sorted(s.key for s in a)
    assert any(mutate.sample_sites(sites, 7, seed=k) != a for k in range(4, 10))
    assert mutate.sample_sites(sites, 0, seed=3) == sorted(sites, key=lambda s: s.key)
    assert len(mutate.sample_sites(sites, 10_000, seed=3)) == len(sites)


def test_score_arithmetic(mutate):
    assert mutate.score(killed=3, survived=1) == 0.75
    assert mutate.score(killed=2, survived=2, timeout=2) == pytest.approx(4 / 6)  # timeouts count as killed
    assert mutate.score(0, 0, 0) is None
    site = mutate.find_sites("x = 1\n", "a.py")[0]
    results = [mutate.Result(site, st) for st in ("killed", "killed", "survived", "timeout", "invalid", "error")]
    summary = mutate.summarize(results)
    t = summary["total"]
    assert (t["mutants"], t["killed"], t["survived"], t["timeout"], t["invalid"], t["error"]) == (6, 2, 1, 1, 1, 1)
    assert t["score"] == 0.75  # invalid and error are excluded
    assert "75.0%" in mutate.format_table(summary)


def test_test_selection_matches_by_glob_with_overrides_and_fallbacks(mutate, tmp_path):
    for name in ("test_nested.py", "test_nested_state.py", "test_polyak.py", "test_conformance.py",
                 "test_hyper.py", "test_hypergradient.py", "test_learned.py", "test_games.py"):
        (tmp_path / "tests").mkdir(exist_ok=True)
        (tmp_path / "tests" / name).write_text("")
    tf = lambda rel, over=(): mutate.tests_for(rel, list(over), tmp_path)  # noqa: E731
    tests, how = tf("src/nestopt/optim/nested_step.py")  # a split file keeps its tests
    assert how == "map" and tests == ["tests/test_nested.py", "tests/test_nested_state.py", "tests/test_conformance.py"]
    assert tf("src/nestopt/optim/polyak.py")[0] == ["tests/test_polyak.py", "tests/test_conformance.py"]
    assert tf("src/nestopt/hyper/stn.py")[0] == ["tests/test_hyper.py", "tests/test_hypergradient.py"]
    tests, how = tf("src/nestopt/optim/registry.py")
    assert how == "fallback" and "tests/test_learned.py" in tests and "tests/test_games.py" in tests
    assert tf("src/nestopt/bench/registry.py") == ([], "none")
    over = mutate.parse_tests_for(["*optim/polyak*=tests/test_polyak.py"])
    assert tf("src/nestopt/optim/polyak.py", over) == (["tests/test_polyak.py"], "override")


def test_sites_are_found_in_the_real_package_and_all_verify(mutate):
    files = sorted((TOOL.parent.parent / "src" / "nestopt").rglob("*.py"))
    files = [f for f in files if "raise " in f.read_text(encoding="utf-8")][:2]
    if not files:
        pytest.skip("no source file with a raise statement")
    for f in files:
        text = f.read_text(encoding="utf-8")
        sites = mutate.find_sites(text, f.name)
        for s in mutate.sample_sites(sites, 8, seed=0):
            assert mutate.check_mutant(text, s) is None, s
        lines = text.splitlines()
        assert not [s for s in sites if lines[s.line - 1].lstrip().startswith(("raise ", "check_"))]
