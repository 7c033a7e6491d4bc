"""A rerun against its stored result: which leaves differ, under the record's rules.

Integers, strings, booleans and ``None`` compare exactly (steps, counts, verdicts), floats to a
relative ``1e-6`` (:data:`FLOAT_RTOL`), a whole run's time within a factor, and the record's
``ignore`` paths and per-run times not at all (see :mod:`nestopt.report.published`).

    >>> from nestopt.report.published import Published
    >>> rec = Published("x", (), "cheap", ("nestopt",), "")
    >>> diff({"wall_s": 10.0, "a": {"steps": 3, "wall_s": 1.0}}, {"wall_s": 20.0, "a": {"steps": 4, "wall_s": 9.0}}, rec)
    ['a/steps: 3 -> 4']
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from .published import TIME_FACTOR, TIME_FLOOR_S, Published

FLOAT_RTOL = 1e-6
FLOAT_ATOL = 1e-12
MAX_LISTED = 20


def _match(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _leaf_differs(old: Any, new: Any, is_time: bool) -> bool:
    if isinstance(old, bool) or isinstance(new, bool) or not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return type(old) is not type(new) or old != new  # true is not 1
    if is_time:
        if max(abs(old), abs(new)) < TIME_FLOOR_S:
            return False
        lo, hi = sorted((abs(old), abs(new)))
        return lo == 0 or hi / lo > TIME_FACTOR
    if isinstance(old, int) and isinstance(new, int):
        return old != new
    if math.isnan(old) or math.isnan(new):
        return not (math.isnan(old) and math.isnan(new))
    return abs(old - new) > FLOAT_ATOL + FLOAT_RTOL * max(abs(old), abs(new))


def diff(old: Any, new: Any, rec: Published, path: str = "") -> list[str]:
    """One line per difference (``path: old -> new``), at most :data:`MAX_LISTED` and a count."""
    out: list[str] = []
    _walk(old, new, rec, path, out)
    if len(out) > MAX_LISTED:
        out = out[:MAX_LISTED] + [f"... and {len(out) - MAX_LISTED} more"]
    return out


def _skipped(path: str, rec: Published) -> bool:
    return not _match(path, rec.times) and _match(path, rec.not_compared)


def _walk(old: Any, new: Any, rec: Published, path: str, out: list[str]) -> None:
    if path and _skipped(path, rec):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            p = f"{path}/{k}" if path else str(k)
            if _skipped(p, rec):
                continue
            if k not in new:
                out.append(f"{p}: missing from the rerun")
            elif k not in old:
                out.append(f"{p}: not in the stored result")
            else:
                _walk(old[k], new[k], rec, p, out)
        return
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            out.append(f"{path}: {len(old)} items -> {len(new)}")
            return
        for i, (a, b) in enumerate(zip(old, new)):
            _walk(a, b, rec, f"{path}/{i}", out)
        return
    if _leaf_differs(old, new, _match(path, rec.times)):
        out.append(f"{path}: {_short(old)} -> {_short(new)}")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."
