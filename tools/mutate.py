#!/usr/bin/env python3
"""Seeded mutation testing for nestopt (stdlib only).

    python tools/mutate.py [--paths src/nestopt/optim src/nestopt/hyper] [--sample N] [--seed S]
                           [--jobs J] [--timeout T] [--json out.json]
                           [--tests-for GLOB=TEST[,TEST...] ...] [--pytest-arg ARG ...] [--list]

Each ``.py`` file under ``--paths`` is parsed with :mod:`ast` and every candidate mutation site
is listed (file, line, col, kind, ``before -> after``):

  arith       ``+ <-> -``, ``* <-> /``, ``** -> *`` (the ``*`` is parenthesized so it keeps the
              operands of the ``**``); operands that are string/list/tuple literals are skipped
  compare     ``< <-> <=``, ``> <-> >=``, ``== <-> !=``, ``< <-> >``
  boolop      ``and <-> or`` (every operator of that one ``and``/``or`` expression)
  not         ``not x -> x``
  const       ints ``c -> c+1`` (and ``1 -> 0``); floats ``c -> -c`` and ``c -> 2*c`` (``|c| < 1``)
              or ``c -> 0.5*c`` (``|c| > 1``); ``0.0 -> 1.0``; ``1.0 -> -1.0, 0.0``
  bool        ``True <-> False``
  neg         unary minus removed (``-x -> x``)
  minmax      ``min <-> max`` calls (also the methods/functions ``.min/.max``, ``.minimum/.maximum``,
              ``.amin/.amax``)
  return      ``return x -> return None``, only in functions (not generators) whose returns all
              return a value other than ``None`` and that cannot fall off their end
  augassign   ``+= <-> -=``, ``*= <-> /=``

Skipped on purpose (error-message and bookkeeping paths, or not code): docstrings, type
annotations, f-strings, ``raise`` statements (message and all), ``assert`` statements, every
statement that calls a ``check_*`` validator, the test of an ``if`` whose body is only
``raise ValueError/TypeError(...)`` (argument validation), and ``stacklevel=`` values.

A mutant is the original file with exactly that one change, made by token/segment replacement so
every other byte (and every line number) is unchanged; each sampled mutant is checked to compile and
to parse to exactly the original AST with that one node changed, else it is reported as
``invalid`` (shown, excluded from the score).

Each mutant is written into a private copy of ``src/`` (one per worker) and the tests mapped to its
file run with ``PYTHONPATH=<copy>/src`` (``-x -q -p no:cacheprovider -p no:randomly -n 0``) under
a per-mutant timeout.  killed: the tests fail (or cannot be collected); survived: they pass;
timeout: counted as killed and shown separately.  score = (killed + timeout) / (killed + timeout
+ survived).  Children get ``PYTHONDONTWRITEBYTECODE=1`` (a same-size mutant must never meet a
stale ``.pyc``) and ``OMP_NUM_THREADS=cores/jobs`` unless set.  Before any mutant, the tests of
every selected set must pass on the unmutated copy, else the tool reports them and stops
(``--pytest-arg=--deselect=NODEID`` drops a known failure).

Tests per file: the tests of the ``--tests-for`` globs that match a file replace everything else
for it; otherwise DEFAULT_TEST_MAP below (by glob, so split or moved files keep their tests), plus
tests/test_conformance.py for files under optim/; a file under optim/ or hyper/ that nothing
maps gets all of that package's tests.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import importlib.util
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ["src/nestopt/optim", "src/nestopt/hyper"]

# Source-path glob -> test files (globs, relative to the repo root; missing ones are ignored).
# Globs match the repo-relative posix path, so files that move or split keep their tests.
DEFAULT_TEST_MAP: list[tuple[str, list[str]]] = [
    ("*optim/nested*", ["tests/test_nested*.py", "tests/test_transactional.py"]),
    ("*optim/controller*", ["tests/test_nested*.py"]),
    ("*optim/polyak*", ["tests/test_polyak.py", "tests/test_values_optim.py", "tests/test_counters.py"]),
    ("*optim/learned*", ["tests/test_learned.py", "tests/test_values_optim.py", "tests/test_counters.py"]),
    ("*optim/complex*", ["tests/test_games.py", "tests/test_values_optim.py", "tests/test_counters.py"]),
    ("*optim/hypergradient*", ["tests/test_hypergradient.py", "tests/test_values_optim.py", "tests/test_counters.py"]),
    ("*optim/counters*", ["tests/test_counters.py", "tests/test_nested_parts.py"]),
    ("*optim/base*", ["tests/test_group_validation.py", "tests/test_dtype_support.py", "tests/test_transactional.py"]),
    ("*optim/groups*", ["tests/test_group_validation.py"]),
    ("*optim/transaction*", ["tests/test_transactional.py"]),
    ("*hyper/*", ["tests/test_hyper*.py", "tests/test_hypergradient.py", "tests/test_values_hyper.py",
                  "tests/test_solvers_api.py"]),
]
# Added to every file under optim/ (measured: the conformance table alone takes ~13 s CPU, 20 s wall on a
# loaded 2-core machine: under the ~60 s where it would be dropped from per-mutant runs).
ALWAYS_TESTS: list[tuple[str, list[str]]] = [("*optim/*", ["tests/test_conformance.py"])]
# A file under these packages that no glob above maps gets all of that package's tests.
FALLBACK_PACKAGES = ("optim", "hyper")

SKIP_RULES = ("docstrings, type annotations, f-strings, raise statements, assert statements, "
              "statements calling check_*, if-tests guarding only `raise ValueError/TypeError`, "
              "stacklevel= values")

PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-rfE"]

# ----------------------------------------------------------------------------------------------
# sites
# ----------------------------------------------------------------------------------------------

BINOP_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
               ast.Pow: [ast.Mult]}
CMP_SWAPS = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt], ast.Gt: [ast.GtE, ast.Lt],
             ast.GtE: [ast.Gt], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq]}
AUG_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
          ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
          ast.And: "and", ast.Or: "or"}
MINMAX = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum",
          "amin": "amax", "amax": "amin"}
KINDS = ("arith", "compare", "boolop", "not", "const", "bool", "neg", "minmax", "return", "augassign")


@dataclass(frozen=True)
class Site:
    file: str            # repo-relative posix path
    line: int            # 1-based
    col: int             # 1-based, in characters
    kind: str            # one of KINDS
    before: str          # the text replaced (token level)
    after: str           # the text put there
    node: int            # index of the mutated node in ast.walk order
    change: tuple        # how the node changes (used to check the mutant's AST)
    edits: tuple         # ((start, end, text), ...) character offsets into the source

    @property
    def key(self) -> tuple:
        return (self.file, self.line, self.col, self.kind, self.after)

    @property
    def label(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "col": self.col, "kind": self.kind,
                "before": self.before, "after": self.after}


class _Source:
    """Offsets between ast positions (utf-8 byte columns), tokenize positions and the text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = re.split(r"(?<=\n)|(?<=\r)(?!\n)", text)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))
        self.tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        self._tok_starts = [self.tok_pos(t.start) for t in self.tokens]

    def pos(self, lineno: int, byte_col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:byte_col].decode("utf-8", "replace"))

    def tok_pos(self, rowcol: tuple[int, int]) -> int:
        return self.starts[rowcol[0] - 1] + rowcol[1]

    def start(self, node: ast.AST) -> int:
        return self.pos(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.pos(node.end_lineno, node.end_col_offset)

    def find_token(self, lo: int, hi: int, string: str) -> tuple[int, int]:
        """The (start, end) of the first token equal to ``string`` starting in [lo, hi)."""
        for t, s in zip(self.tokens, self._tok_starts):
            if lo <= s < hi and t.string == string and t.type in (tokenize.OP, tokenize.NAME):
                return s, s + len(string)
        raise LookupError(f"token {string!r} not found in {self.text[lo:hi]!r}")

    def line_col(self, offset: int) -> tuple[int, int]:
        lo, hi = 0, len(self.lines)
        while lo < hi:  # last line start <= offset
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, offset - self.starts[lo] + 1


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _calls_check(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if re.match(r"_*check_", name):
                return True
    return False


def _raises_value_or_type_error(body: list[ast.stmt]) -> bool:
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc
    if isinstance(exc, ast.Call):
        exc = exc.func
    return isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError")


def _own_nodes(fn: ast.AST):
    """Nodes of a function body, not descending into nested functions, lambdas or classes."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(n))


def _terminates(body: list[ast.stmt]) -> bool:
    """Whether a block always ends in ``return``/``raise`` (so the function never falls off its end)."""
    if not body:
        return False
    last = body[-1]
    if isinstance(last, (ast.Return, ast.Raise)):
        return True
    if isinstance(last, ast.If):
        return _terminates(last.body) and _terminates(last.orelse)
    if isinstance(last, (ast.With, ast.AsyncWith)):
        return _terminates(last.body)
    if isinstance(last, ast.Try) or type(last).__name__ == "TryStar":
        return _terminates(last.finalbody) or (
            _terminates(last.orelse or last.body) and all(_terminates(h.body) for h in last.handlers))
    if isinstance(last, ast.While):
        return isinstance(last.test, ast.Constant) and last.test.value is True and not any(
            isinstance(n, ast.Break) for n in ast.walk(last))
    return False


def _non_arith_literal(node: ast.AST) -> bool:
    return (isinstance(node, (ast.JoinedStr, ast.List, ast.Tuple, ast.ListComp, ast.Dict, ast.Set))
            or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))))


def _num(v: float | int) -> str:
    return repr(v)


class _Finder:
    def __init__(self, text: str, file: str) -> None:
        self.src = _Source(text)
        self.file = file
        self.tree = ast.parse(text)
        self.index = {id(n): i for i, n in enumerate(ast.walk(self.tree))}
        self.parent: dict[int, ast.AST] = {}
        for n in ast.walk(self.tree):
            for c in ast.iter_child_nodes(n):
                self.parent[id(c)] = n
        self.sites: list[Site] = []

    # -- traversal: decides what is skipped -----------------------------------------------------
    def run(self) -> list[Site]:
        self._body(self.tree.body)
        return self.sites

    def _body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                continue
            self._stmt(stmt)

    def _stmt(self, s: ast.stmt) -> None:
        if isinstance(s, (ast.Raise, ast.Assert, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
            return
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in s.decorator_list:
                self._expr(d)
            a = s.args
            for d in a.defaults + [d for d in a.kw_defaults if d is not None]:
                self._expr(d)
            self._returns(s)
            self._body(s.body)
            return
        if isinstance(s, ast.ClassDef):
            for e in s.decorator_list + s.bases + [k.value for k in s.keywords]:
                self._expr(e)
            self._body(s.body)
            return
        if isinstance(s, (ast.If, ast.While)):
            if not (_raises_value_or_type_error(s.body) and not s.orelse) and not _calls_check(s.test):
                self._expr(s.test)
            self._body(s.body)
            self._body(s.orelse)
            return
        if isinstance(s, (ast.For, ast.AsyncFor)):
            self._expr(s.iter)
            self._body(s.body)
            self._body(s.orelse)
            return
        if isinstance(s, (ast.With, ast.AsyncWith)):
            for item in s.items:
                self._expr(item.context_expr)
            self._body(s.body)
            return
        if isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
            self._body(s.body)
            for h in s.handlers:
                self._body(h.body)
            self._body(s.orelse)
            self._body(s.finalbody)
            return
        if isinstance(s, ast.Match):
            self._expr(s.subject)
            for c in s.cases:
                if c.guard is not None:
                    self._expr(c.guard)
                self._body(c.body)
            return
        if _calls_check(s):
            return
        if isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self._expr(s.value)
            return
        if isinstance(s, ast.AugAssign):
            self._augassign(s)
            self._expr(s.value)
            return
        if isinstance(s, ast.Assign):
            for t in s.targets:
                self._expr(t)
            self._expr(s.value)
            return
        if isinstance(s, (ast.Expr, ast.Return, ast.Delete)):
            for c in ast.iter_child_nodes(s):
                self._expr(c)
            return
        # anything else (pass, break, continue, type aliases): nothing to mutate

    def _expr(self, e: ast.AST) -> None:
        if isinstance(e, ast.JoinedStr):
            return
        if isinstance(e, (ast.Lambda,)):
            for d in e.args.defaults + [d for d in e.args.kw_defaults if d is not None]:
                self._expr(d)
            self._expr(e.body)
            return
        self._site(e)
        for name, value in ast.iter_fields(e):
            if isinstance(e, ast.Call) and name == "keywords":
                for k in value:
                    if k.arg != "stacklevel":
                        self._expr(k.value)
                continue
            for c in value if isinstance(value, list) else [value]:
                if isinstance(c, ast.expr):
                    self._expr(c)
                elif isinstance(c, ast.comprehension):
                    self._expr(c.iter)
                    for cond in c.ifs:
                        self._expr(cond)

    # -- sites ----------------------------------------------------------------------------------
    def _add(self, node: ast.AST, kind: str, before: str, after: str, change: tuple, edits: list) -> None:
        line, col = self.src.line_col(edits[0][0])  # the first edit is the change itself
        self.sites.append(Site(self.file, line, col, kind, before, after, self.index[id(node)],
                               change, tuple(sorted(edits))))

    def _site(self, e: ast.AST) -> None:
        src = self.src
        if isinstance(e, ast.BinOp) and type(e.op) in BINOP_SWAPS:
            if _non_arith_literal(e.left) or _non_arith_literal(e.right):
                return
            sym = SYMBOL[type(e.op)]
            s, t = src.find_token(src.end(e.left), src.start(e.right), sym)
            for new in BINOP_SWAPS[type(e.op)]:
                edits = [(s, t, SYMBOL[new])]
                if isinstance(e.op, ast.Pow):  # keep the operands of ** together
                    edits += [(src.start(e), src.start(e), "("), (src.end(e), src.end(e), ")")]
                self._add(e, "arith", sym, SYMBOL[new], ("op", new.__name__), edits)
        elif isinstance(e, ast.Compare):
            prev = e.left
            for i, (op, right) in enumerate(zip(e.ops, e.comparators)):
                if type(op) in CMP_SWAPS:
                    sym = SYMBOL[type(op)]
                    s, t = src.find_token(src.end(prev), src.start(right), sym)
                    for new in CMP_SWAPS[type(op)]:
                        self._add(e, "compare", sym, SYMBOL[new], ("cmp", i, new.__name__),
                                  [(s, t, SYMBOL[new])])
                prev = right
        elif isinstance(e, ast.BoolOp):
            sym = SYMBOL[type(e.op)]
            new = ast.Or if isinstance(e.op, ast.And) else ast.And
            edits = []
            for a, b in zip(e.values, e.values[1:]):
                s, t = src.find_token(src.end(a), src.start(b), sym)
                edits.append((s, t, SYMBOL[new]))
            self._add(e, "boolop", sym, SYMBOL[new], ("op", new.__name__), edits)
        elif isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.Not, ast.USub)):
            sym = "not" if isinstance(e.op, ast.Not) else "-"
            s, t = src.find_token(src.start(e), src.start(e.operand), sym)
            t2 = t
            nxt = src.start(e.operand)
            while t2 < nxt and src.text[t2] in " \t":  # and the blanks after it, on that line
                t2 += 1
            kind = "not" if sym == "not" else "neg"
            self._add(e, kind, src.text[s:t2], "", ("unwrap",), [(s, t2, "")])
        elif isinstance(e, ast.Constant):
            self._const(e)
        elif isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Name) and f.id in ("min", "max"):
                new = MINMAX[f.id]
                self._add(f, "minmax", f.id, new, ("name", new), [(src.start(f), src.end(f), new)])
            elif isinstance(f, ast.Attribute) and f.attr in MINMAX:
                new = MINMAX[f.attr]
                end = src.end(f)
                self._add(f, "minmax", f.attr, new, ("attr", new), [(end - len(f.attr), end, new)])

    def _const(self, e: ast.Constant) -> None:
        v = e.value
        if isinstance(v, bool):
            new = "False" if v else "True"
            self._add(e, "bool", repr(v), new, ("expr", new), [(self.src.start(e), self.src.end(e), new)])
            return
        if isinstance(v, int):
            news = [v + 1] + ([0] if v == 1 else [])
        elif isinstance(v, float):
            if v == 0.0:
                news = [1.0]
            else:
                parent = self.parent.get(id(e))
                negated = isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub)
                news = [] if negated else [-v]  # under a unary minus, -c is the neg mutant
                news.append(0.0 if v == 1.0 else 2 * v if abs(v) < 1 else 0.5 * v)
        else:
            return  # str, bytes, None, complex, Ellipsis
        s, t = self.src.start(e), self.src.end(e)
        before = self.src.text[s:t]
        for nv in news:
            text = _num(nv) if nv >= 0 else f"({_num(nv)})"
            if text == before:
                continue
            self._add(e, "const", before, text, ("expr", text), [(s, t, text)])

    def _augassign(self, s: ast.AugAssign) -> None:
        new = AUG_SWAPS.get(type(s.op))
        if new is None:
            return
        sym, nsym = SYMBOL[type(s.op)] + "=", SYMBOL[new] + "="
        a, b = self.src.find_token(self.src.end(s.target), self.src.start(s.value), sym)
        self._add(s, "augassign", sym, nsym, ("op", new.__name__), [(a, b, nsym)])

    def _returns(self, fn: ast.AST) -> None:
        own = list(_own_nodes(fn))
        if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own):
            return
        rets = [n for n in own if isinstance(n, ast.Return)]
        returns_none = any(r.value is None or (isinstance(r.value, ast.Constant) and r.value.value is None)
                           for r in rets)
        if not rets or returns_none or not _terminates(fn.body):
            return
        for r in rets:
            if _calls_check(r):
                continue
            s, t = self.src.start(r.value), self.src.end(r.value)
            text = "None" + " \\\n" * self.src.text.count("\n", s, t)  # keeps the line count
            before = " ".join(self.src.text[s:t].split())
            if len(before) > 40:
                before = before[:37] + "..."
            self._add(r.value, "return", f"return {before}", "return None", ("expr", "None"), [(s, t, text)])


def find_sites(text: str, file: str = "<string>") -> list[Site]:
    """Every mutation site of one source text, in source order."""
    sites = _Finder(text, file).run()
    return sorted(sites, key=lambda s: (s.line, s.col, s.kind, s.after))


def apply(text: str, site: Site) -> str:
    """The source with the site's one change made (everything else byte-identical)."""
    out, pos = [], 0
    for s, t, new in site.edits:
        out.append(text[pos:s])
        out.append(new)
        pos = t
    out.append(text[pos:])
    return "".join(out)


class _FlattenBoolOps(ast.NodeTransformer):
    """``a and b and c`` and ``(a and b) and c`` mean the same: compare them as equal."""

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        values = []
        for v in node.values:
            values.extend(v.values if isinstance(v, ast.BoolOp) and type(v.op) is type(node.op) else [v])
        node.values = values
        return node


def _expected(text: str, site: Site) -> ast.AST:
    tree = ast.parse(text)
    nodes = list(ast.walk(tree))
    node = nodes[site.node]
    what = site.change[0]
    if what == "op":
        node.op = getattr(ast, site.change[1])()
    elif what == "cmp":
        node.ops[site.change[1]] = getattr(ast, site.change[2])()
    elif what == "attr":
        node.attr = site.change[1]
    elif what == "name":
        node.id = site.change[1]
    else:
        new = node.operand if what == "unwrap" else ast.parse(site.change[1], mode="eval").body
        for parent in nodes:
            for fname, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, fname, new)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        if v is node:
                            value[i] = new
    return tree


def check_mutant(text: str, site: Site, mutated: str | None = None) -> str | None:
    """``None`` if the mutant compiles and is the original AST with exactly this change, else why not."""
    mutated = apply(text, site) if mutated is None else mutated
    try:
        compile(mutated, site.file, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return f"does not compile: {exc}"
    if mutated.count("\n") != text.count("\n"):
        return "line count changed"
    got = ast.dump(_FlattenBoolOps().visit(ast.parse(mutated)))
    want = ast.dump(_FlattenBoolOps().visit(_expected(text, site)))
    if got == ast.dump(_FlattenBoolOps().visit(ast.parse(text))):
        return "no change in the AST"
    if got != want:
        return "the AST differs from the intended single change"
    return None


# ----------------------------------------------------------------------------------------------
# files, sampling, tests
# ----------------------------------------------------------------------------------------------

def source_files(paths: list[str], root: Path = ROOT) -> list[Path]:
    out: set[Path] = set()
    for p in paths:
        q = (root / p).resolve()
        if q.is_file() and q.suffix == ".py":
            out.add(q)
        elif q.is_dir():
            out.update(x.resolve() for x in q.rglob("*.py") if "__pycache__" not in x.parts)
        else:
            raise SystemExit(f"mutate: --paths {p}: no such .py file or directory under {root}")
    outside = [f for f in out if not f.is_relative_to((root / "src").resolve())]
    if outside:
        raise SystemExit(f"mutate: only files under {root / 'src'} can be mutated (the copy is of src/): {outside[0]}")
    return sorted(out)


def all_sites(files: list[Path], root: Path = ROOT) -> tuple[list[Site], dict[str, str]]:
    sites, texts = [], {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        with open(f, encoding="utf-8", newline="") as fh:
            text = fh.read()
        texts[rel] = text
        sites.extend(find_sites(text, rel))
    sites.sort(key=lambda s: s.key)
    return sites, texts


def sample_sites(sites: list[Site], n: int, seed: int) -> list[Site]:
    """``n`` sites drawn with ``random.Random(seed)`` (all for ``n <= 0``), sorted."""
    ordered = sorted(sites, key=lambda s: s.key)
    if n <= 0 or n >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, n), key=lambda s: s.key)


def score(killed: int, survived: int, timeout: int = 0) -> float | None:
    """killed / (killed + survived) with timeouts counted as killed; ``None`` when nothing counts."""
    n = killed + timeout + survived
    return (killed + timeout) / n if n else None


def parse_tests_for(items: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for it in items:
        if "=" not in it:
            raise SystemExit(f"mutate: --tests-for {it!r}: expected GLOB=TEST[,TEST...]")
        g, tests = it.split("=", 1)
        out.append((g.strip(), [t.strip() for t in tests.split(",") if t.strip()]))
    return out


def _expand(patterns: list[str], root: Path) -> list[str]:
    out: list[str] = []
    for p in patterns:
        for m in sorted(glob.glob(str(root / p))):
            rel = Path(m).relative_to(root).as_posix()
            if rel not in out:
                out.append(rel)
    return out


def _package(rel: str) -> str | None:
    parts = rel.split("/")
    for pkg in FALLBACK_PACKAGES:
        if pkg in parts[:-1]:
            return pkg
    return None


def tests_for(rel: str, overrides: list[tuple[str, list[str]]], root: Path = ROOT) -> tuple[list[str], str]:
    """The tests for one source file and where they came from ("override", "map", "fallback" or "none")."""
    hits = [t for g, ts in overrides if fnmatch.fnmatch(rel, g) for t in ts]
    if hits:
        return _expand(hits, root), "override"
    pats = [t for g, ts in DEFAULT_TEST_MAP if fnmatch.fnmatch(rel, g) for t in ts]
    how = "map"
    if not _expand(pats, root):
        pkg = _package(rel)
        if pkg is None:
            return [], "none"
        pats = [t for g, ts in DEFAULT_TEST_MAP if g.startswith(f"*{pkg}/") for t in ts]
        how = "fallback"
    pats += [t for g, ts in ALWAYS_TESTS if fnmatch.fnmatch(rel, g) for t in ts]
    return _expand(pats, root), how


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------

@dataclass
class Result:
    site: Site
    status: str                  # killed | survived | timeout | invalid | error
    seconds: float = 0.0
    rc: int | None = None
    detail: str = ""
    tests: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, root: Path, jobs: int, timeout: float, pytest_args: list[str], threads: int) -> None:
        self.root, self.timeout, self.pytest_args = root, timeout, pytest_args
        self.copies: list[Path] = []
        self.pool: queue.Queue[Path] = queue.Queue()
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.threads = threads
        self.stopped = False
        has_xdist = importlib.util.find_spec("xdist") is not None
        self.flags = PYTEST_FLAGS + (["-n", "0"] if has_xdist else [])
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for _ in range(jobs):
            d = Path(tempfile.mkdtemp(prefix="nestopt-mutate-"))
            shutil.copytree(root / "src", d / "src", ignore=ignore)
            self.copies.append(d)
            self.pool.put(d)

    def env(self, copy_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(copy_dir / "src")
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size mutant written in the same second must not hit a stale .pyc
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        env.setdefault("MKL_NUM_THREADS", str(self.threads))
        return env

    def preflight(self) -> str:
        d = self.copies[0]
        p = subprocess.run([sys.executable, "-c", "import nestopt; print(nestopt.__file__)"], cwd=self.root,
                           env=self.env(d), capture_output=True, text=True, timeout=300)
        where = p.stdout.strip()
        if p.returncode != 0 or not Path(where).resolve().is_relative_to(d.resolve()):
            raise SystemExit(f"mutate: preflight failed: with PYTHONPATH={d / 'src'} `import nestopt` loads "
                             f"{where or '(nothing)'} {p.stderr.strip()[-500:]}\n"
                             "(the installed package shadows the copy: mutants would not be tested)")
        return where

    def pytest(self, copy_dir: Path, tests: list[str]) -> tuple[str, int | None, float, str, str]:
        cmd = [sys.executable, "-m", "pytest", *self.flags, *self.pytest_args, *tests]
        t0 = time.monotonic()
        with self.lock:  # so that stop() either sees this run or keeps it from starting
            if self.stopped:
                raise KeyboardInterrupt
            p = subprocess.Popen(cmd, cwd=self.root, env=self.env(copy_dir), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.procs.add(p)
        try:
            out, _ = p.communicate(timeout=self.timeout)
            status = None
        except subprocess.TimeoutExpired:
            _killpg(p)
            out, _ = p.communicate()
            status = "timeout"
        finally:
            with self.lock:
                self.procs.discard(p)
        secs = time.monotonic() - t0
        rc = p.returncode
        if status is None:
            if rc == 0:
                status = "survived"
            elif rc in (1, 2) or rc < 0:  # failed, could not collect/import, or crashed
                status = "killed"
            else:
                status = "error"
        lines = [ln for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        detail = lines[0] if lines else ("" if rc == 0 else "\n".join(out.strip().splitlines()[-3:]))
        if status == "timeout":
            detail = f"no result after {self.timeout:g} s"
        return status, rc, secs, detail, out

    def baseline(self, tests: list[str]) -> tuple[bool, float, str]:
        d = self.pool.get()
        try:
            status, _, secs, _, out = self.pytest(d, tests)
            if status == "timeout":
                out += f"\nthe unmutated tests ran past --timeout {self.timeout:g} s"
            return status == "survived", secs, out
        finally:
            self.pool.put(d)

    def mutant(self, site: Site, text: str, tests: list[str]) -> Result:
        mutated = apply(text, site)
        why = check_mutant(text, site, mutated)
        if why is not None:
            return Result(site, "invalid", detail=why, tests=tests)
        d = self.pool.get()
        target = d / site.file
        try:
            with open(target, "w", encoding="utf-8", newline="") as fh:
                fh.write(mutated)
            status, rc, secs, detail, _ = self.pytest(d, tests)
            return Result(site, status, secs, rc, detail, tests)
        finally:
            with open(target, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            self.pool.put(d)

    def stop(self) -> None:
        """Start nothing more and kill the pytest runs in flight (each in its own process group)."""
        self.stopped = True
        with self.lock:
            for p in list(self.procs):
                _killpg(p)

    def close(self) -> None:
        for d in self.copies:
            shutil.rmtree(d, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _killpg(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the pytest we started, in its own session
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def summarize(results: list[Result]) -> dict:
    per_file: dict[str, dict[str, int]] = {}
    for r in results:
        row = per_file.setdefault(r.site.file, {"mutants": 0, "killed": 0, "survived": 0, "timeout": 0,
                                                "invalid": 0, "error": 0})
        row["mutants"] += 1
        row[r.status] += 1
    total = {k: sum(row[k] for row in per_file.values())
             for k in ("mutants", "killed", "survived", "timeout", "invalid", "error")}
    for row in list(per_file.values()) + [total]:
        row["score"] = score(row["killed"], row["survived"], row["timeout"])
    return {"files": per_file, "total": total}


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def format_table(summary: dict) -> str:
    files = summary["files"]
    w = max([len("file")] + [len(f) for f in files] + [len("TOTAL")])
    head = f"{'file':<{w}}  mutants  killed  survived  timeout  invalid  error   score"
    rows = [head, "-" * len(head)]
    for f, r in sorted(files.items()):
        rows.append(f"{f:<{w}}  {r['mutants']:7d}  {r['killed']:6d}  {r['survived']:8d}  {r['timeout']:7d}  "
                    f"{r['invalid']:7d}  {r['error']:5d}  {_pct(r['score'])}")
    t = summary["total"]
    rows.append("-" * len(head))
    rows.append(f"{'TOTAL':<{w}}  {t['mutants']:7d}  {t['killed']:6d}  {t['survived']:8d}  {t['timeout']:7d}  "
                f"{t['invalid']:7d}  {t['error']:5d}  {_pct(t['score'])}")
    return "\n".join(rows)


def _context(text: str, site: Site) -> str:
    mutated = apply(text, site)
    return mutated.splitlines()[site.line - 1].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/mutate.py", description=__doc__.split("\n\n")[0],
                                 epilog=f"Skipped: {SKIP_RULES}.")
    ap.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, help="files or directories (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=0, help="mutants to draw (0: all sites)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="parallel workers, one copy of src/ each")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--json", metavar="OUT", help="write everything to this JSON file")
    ap.add_argument("--tests-for", action="append", default=[], metavar="GLOB=TEST[,TEST...]",
                    help="tests for the source files matching GLOB (replaces the default map for them)")
    ap.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                    help="extra pytest argument, e.g. --pytest-arg=--deselect=tests/test_x.py::test_y")
    ap.add_argument("--list", action="store_true", help="print the (sampled) sites and their tests; run nothing")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        ap.error("--jobs must be >= 1 and --timeout > 0")

    signal.signal(signal.SIGTERM, _interrupt)  # clean up (children, copies) on kill as on Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, _interrupt)
    root = ROOT
    overrides = parse_tests_for(args.tests_for)
    files = source_files(args.paths, root)
    sites, texts = all_sites(files, root)
    chosen = sample_sites(sites, args.sample, args.seed)
    test_map = {rel: tests_for(rel, overrides, root) for rel in texts}

    print(f"{len(sites)} sites in {len(files)} files; {len(chosen)} chosen "
          f"({'all' if len(chosen) == len(sites) else f'--sample {args.sample} --seed {args.seed}'})")
    print(f"skipped by design: {SKIP_RULES}")
    if args.list:
        for rel in sorted(texts):
            n = sum(1 for s in sites if s.file == rel)
            tests, how = test_map[rel]
            print(f"  {rel}: {n} sites; tests ({how}): {' '.join(tests) or '(none)'}")
        for s in chosen:
            print(f"{s.label:<42} {s.kind:<9} {s.before} -> {s.after or '(removed)'}   | {_context(texts[s.file], s)}")
        if args.json:
            Path(args.json).write_text(json.dumps({"sites": [s.as_dict() for s in chosen]}, indent=1))
        return 0

    results: list[Result] = []
    pending: list[Site] = []
    for s in chosen:
        tests = test_map[s.file][0]
        if not tests:
            results.append(Result(s, "error", detail="no tests mapped to this file (use --tests-for)"))
        else:
            pending.append(s)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runner = Runner(root, args.jobs, args.timeout, args.pytest_arg, threads)
    t_start = time.monotonic()
    report: dict = {"argv": sys.argv[1:] if argv is None else argv, "paths": args.paths, "sample": args.sample,
                    "seed": args.seed, "jobs": args.jobs, "timeout": args.timeout, "sites_total": len(sites),
                    "skipped_by_design": SKIP_RULES,
                    "tests": {rel: {"tests": t, "source": how} for rel, (t, how) in sorted(test_map.items())}}
    try:
        report["preflight"] = runner.preflight()
        print(f"preflight: with PYTHONPATH=<copy>/src, nestopt loads {report['preflight']}")
        print(f"workers: {args.jobs}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', threads)} each, "
              f"timeout {args.timeout:g} s per mutant")
        sets = sorted({tuple(test_map[s.file][0]) for s in pending})
        report["baseline"] = []
        with _Pool(args.jobs, runner.stop) as pool:
            base = pool.map(lambda ts: runner.baseline(list(ts)), sets)
        failed = False
        for ts, (ok, secs, out) in zip(sets, base):
            report["baseline"].append({"tests": list(ts), "passed": ok, "seconds": round(secs, 2)})
            print(f"baseline {'ok  ' if ok else 'FAIL'} {secs:6.1f} s  {' '.join(ts)}")
            if ok and 3 * secs > args.timeout:
                print(f"    warning: --timeout {args.timeout:g} s is under 3x this baseline; slow mutants may time out")
            if not ok:
                failed = True
                lines = out.strip().splitlines()
                shown = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))] or lines[-15:-1]
                print("\n".join("    " + ln for ln in shown + lines[-1:]))
        if failed:
            print("mutate: the unmutated code fails its tests; fix them, or deselect with --pytest-arg, "
                  "or narrow with --tests-for. Stopping.")
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
            return 2

        done = [0]
        n_total = len(pending)

        def one(s: Site) -> Result:
            r = runner.mutant(s, texts[s.file], test_map[s.file][0])
            with runner.lock:
                done[0] += 1
                print(f"[{done[0]:>{len(str(n_total))}}/{n_total}] {r.status:<8} {r.seconds:6.1f} s  "
                      f"{s.label:<40} {s.kind:<9} {s.before} -> {s.after or '(removed)'}", flush=True)
            return r

        with _Pool(args.jobs, runner.stop) as pool:
            results += pool.map(one, pending)
    except KeyboardInterrupt:
        runner.stop()
        print("mutate: interrupted", flush=True)
        return 130
    finally:
        runner.close()
    wall = time.monotonic() - t_start

    results.sort(key=lambda r: r.site.key)
    summary = summarize(results)
    print()
    print(format_table(summary))
    t = summary["total"]
    ran = [r.seconds for r in results if r.status in ("killed", "survived", "timeout")]
    print(f"\nscore = (killed + timeout) / (killed + timeout + survived) = ({t['killed']} + {t['timeout']}) / "
          f"({t['killed']} + {t['timeout']} + {t['survived']}) = {_pct(t['score']).strip()}")
    if ran:
        print(f"wall {wall:.0f} s with {args.jobs} workers; per mutant {sum(ran) / len(ran):.1f} s mean, "
              f"{min(ran):.1f}-{max(ran):.1f} s")
    for label, status in (("survivors", "survived"), ("timeouts (counted as killed)", "timeout"),
                          ("invalid (excluded)", "invalid"), ("errors (excluded)", "error")):
        rs = [r for r in results if r.status == status]
        if rs:
            print(f"\n{label}:")
            for r in rs:
                s = r.site
                extra = f"   [{r.detail}]" if status in ("invalid", "error", "timeout") else ""
                print(f"  {s.label:<40} {s.kind:<9} {s.before} -> {s.after or '(removed)'}   | "
                      f"{_context(texts[s.file], s)}{extra}")
    if args.json:
        report.update(summary=summary, wall_seconds=round(wall, 1),
                      mutants=[{**r.site.as_dict(), "status": r.status, "seconds": round(r.seconds, 2),
                                "rc": r.rc, "detail": r.detail, "tests": r.tests,
                                "mutated_line": _context(texts[r.site.file], r.site)} for r in results],
                      survivors=[r.site.as_dict() for r in results if r.status == "survived"])
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


class _Pool:
    """A small thread pool whose map keeps order and lets Ctrl-C through."""

    def __init__(self, n: int, on_error=None) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.ex = ThreadPoolExecutor(max_workers=n)
        self.on_error = on_error

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.on_error is not None:
            self.on_error()  # e.g. kill the runs in flight, so that the wait below is short
        self.ex.shutdown(wait=True, cancel_futures=True)

    def map(self, fn, items) -> list:
        futs = [self.ex.submit(fn, it) for it in items]
        return [f.result() for f in futs]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `--list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
