"""``nestopt report``: make, render and check the published results.

    nestopt report --run KEY [KEY ...]      run the commands, store results in docs/results/KEY/
    nestopt report --docs                   render every generated block of the README and docs/
    nestopt report --docs --verify          exit 1 when a block differs from what its result renders
    nestopt report --check [--cheap-only]   rerun the cheap commands and compare; list stale results
    nestopt report --list                   each result: cheap or expensive, fresh or stale

Run it from the repository root (or pass ``--root``): the results and the Markdown live there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

EXIT_DRIFT = 1


class UsageError(Exception):
    pass


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="make, render and check the results the README and docs cite",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", nargs="+", metavar="KEY", help="run these published commands and store their results")
    what.add_argument("--docs", action="store_true", help="render the generated blocks of the README and docs/")
    what.add_argument("--check", action="store_true", help="rerun the cheap commands and compare; list stale results")
    what.add_argument("--list", action="store_true", help="list the published results and whether each is fresh")
    r.add_argument("--verify", action="store_true", help="with --docs: change nothing, exit 1 if a block differs")
    r.add_argument("--cheap-only", action="store_true", help="with --check: do not list the expensive results")
    r.add_argument("--given", action="append", default=[], metavar="KEY=DIR",
                   help="with --check: compare this finished run of KEY's command instead of rerunning it")
    r.add_argument("--root", default=".", help="the repository root (default: the current folder)")


def _root(path: str) -> Path:
    root = Path(path)
    if not (root / "docs" / "results").is_dir():
        raise UsageError(f"--root {path!r} is invalid: it has no docs/results folder; run from the repository root")
    return root


def _keys(values: list[str]) -> list[str]:
    from .published import RECORDS

    keys = list(dict.fromkeys(values))
    bad = [k for k in keys if k not in RECORDS]
    if bad:
        raise UsageError(f"--run {bad[0]!r} is invalid: expected one of {', '.join(RECORDS)}")
    return keys


def _given(values: list[str]) -> dict[str, Path]:
    from .published import CHEAP, RECORDS, keys

    out = {}
    for item in values:
        key, sep, path = item.partition("=")
        if not sep or key not in RECORDS or RECORDS[key].cost != CHEAP:
            raise UsageError(f"--given {item!r} is invalid: expected KEY=DIR with KEY a cheap result, one of "
                             f"{', '.join(keys(CHEAP))}")
        if not (Path(path) / RECORDS[key].result).is_file():
            raise UsageError(f"--given {item!r} is invalid: {Path(path) / RECORDS[key].result} does not exist")
        out[key] = Path(path)
    return out


def main(args: argparse.Namespace) -> int:
    from .blocks import BlockError
    from .store import ReportError

    try:
        if args.verify and not args.docs:
            raise UsageError("--verify applies to --docs only")
        if (args.cheap_only or args.given) and not args.check:
            raise UsageError(f"{'--cheap-only' if args.cheap_only else '--given'} applies to --check only")
        if args.run:
            keys = _keys(args.run)  # check the keys before the root: a typo is named first
            return _run(_root(args.root), keys)
        root = _root(args.root)
        if args.docs:
            return _docs(root, verify=args.verify)
        if args.check:
            return _check(root, cheap_only=args.cheap_only, given=_given(args.given))
        return _list(root)
    except (ReportError, BlockError) as e:
        print(f"nestopt: report: {e}", file=sys.stderr)
        return EXIT_DRIFT


def _run(root: Path, keys: list[str]) -> int:
    from .published import get
    from .store import run, store

    for key in keys:
        rec = get(key)
        print(f"report: running {rec.command()}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"nestopt-{key}-") as tmp:
            out = Path(tmp) / "out"
            doc, prov = run(rec, out)
            dest = store(rec, root, out, doc, prov)
        print(f"report: {key}: {prov['wall_s']:.0f} s, code {prov['code_hash']}; stored in {dest}", flush=True)
    return 0


def _docs(root: Path, verify: bool) -> int:
    from .blocks import render_all

    changed = render_all(root, write=not verify)
    for path, name in changed:
        print(f"{'differs' if verify else 'rendered'}: {path} block {name}")
    if verify and changed:
        print(f"nestopt: report: {len(changed)} generated block(s) differ from their results: run `nestopt report --docs`",
              file=sys.stderr)
        return EXIT_DRIFT
    if not changed:
        print("report: every generated block is up to date")
    return 0


def _check(root: Path, cheap_only: bool, given: dict[str, Path]) -> int:
    from .check import check

    return 0 if check(root, cheap_only=cheap_only, given=given, log=print) else EXIT_DRIFT


def _list(root: Path) -> int:
    from .check import freshness

    for line in freshness(root):
        print(line)
    return 0
