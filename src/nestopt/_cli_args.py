"""The argument helpers every ``nestopt`` command shares: the parser that exits 2 with one line,
name lists, counts, integers and the output-folder check."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no abbreviations: a typo such as --suit must not quietly mean --suite
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def _names(value: str | None, flag: str, what: str, valid: Sequence[str] = ()) -> list[str] | None:
    """The comma-separated names of ``flag`` (each once, in order); ``None`` when not given. A value
    that names nothing (``''``, ``','``) is an error: an empty list is never "all"."""
    if value is None:
        return None
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        choices = f": {', '.join(valid)}" if valid else ""
        raise UsageError(f"{flag} {value!r} is invalid: it names no {what}; expected a comma-separated list of "
                         f"{what} names{choices}")
    return names


def _count(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a number such as 10M, 500k or 1e6")
    if not math.isfinite(n):
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a finite number such as 10M, 500k or 1e6")
    if n != int(n):
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number of parameters")
    return int(n)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value} is invalid: must be a positive integer")


def _out(path: str, *, force: bool, resume: bool = False, hint: str = "--force to replace what it holds") -> Path:
    from ._io import OutputError, prepare_out

    try:
        return prepare_out(path, force=force, resume=resume, flag_hint=hint)
    except OutputError as e:
        raise UsageError(str(e)) from None


def _interrupted(message: str) -> int:
    print(f"nestopt: interrupted: {message}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


MAX_SEEDS = 10_000
FORCE_HELP = "write into a non-empty --out: the new result replaces the old one's files when it completes"
