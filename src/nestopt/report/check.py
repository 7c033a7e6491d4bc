"""``nestopt report --check``: is every stored result what today's code gives?

- **cheap** results: the command is rerun (or a finished run of it is given) and compared with the
  stored result (:mod:`nestopt.report.compare`), and the run's wall time with the stored one within
  a factor;
- **expensive** results: the stored code hash is compared with the current code's; a result whose
  code changed is listed with the files that changed (stale), and so is one that was never stored.

The check passes when every cheap result reproduces. One exception: a result whose code is the
code it was stored with, rerun on another processor than the one it was stored on (with the same
torch and optional package versions), that differs is rerun once more; if the two reruns agree, it
is a warning, not a failure: nothing of ours changed, and the pinned numerics
(:data:`~nestopt.report.store.PINNED_ENV`) did not give the same bits on that processor. Two reruns
that disagree fail (the command is not deterministic). A changed code must reproduce wherever it
is rerun, and a finished run given with ``--given`` is compared as it is. Stale expensive results are listed, not failed: remaking them
takes a longer run (``nestopt report --run KEY``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from . import codehash
from .compare import diff
from .published import CHEAP, RECORDS, TIME_FACTOR, Published, get
from .store import PINNED_ENV, ReportError, current_hashes, drop, environment, load, normalise, read_json, results_dir, run


def status(root: Path, rec: Published) -> tuple[str, list[str]]:
    """``("fresh" | "stale" | "missing", changed files)`` of ``rec``'s stored result."""
    if not (results_dir(root) / rec.key / "provenance.json").is_file():
        return "missing", []
    prov = read_json(results_dir(root) / rec.key / "provenance.json")
    now = current_hashes(rec)
    if codehash.code_hash(now) == prov.get("code_hash"):
        return "fresh", []
    return "stale", codehash.changed(prov.get("files", {}), now)


def freshness(root: Path) -> list[str]:
    """One line per published result: key, cost, state, the command and when it was stored."""
    lines = []
    for key, rec in RECORDS.items():
        state, files = status(root, rec)
        when = ""
        if state != "missing":
            prov = read_json(results_dir(root) / key / "provenance.json")
            when = f"  ({prov['started'][:10]}, {prov['wall_s']:.0f} s, code {prov['code_hash']})"
        more = f": {_files(files)} changed" if files else ""
        lines.append(f"{key:20s} {rec.cost:9s} {state:7s} {rec.command()}{when}{more}")
    return lines


def _before(rec: Published, prov: dict) -> str:
    """Why a stored cheap result cannot be compared with a rerun here ('' when it can)."""
    env = prov.get("environment", {})
    if env.get("pinned") != PINNED_ENV:
        return (f"it was stored with other numerics ({env.get('pinned') or 'none pinned'}) than the rerun's "
                f"({PINNED_ENV}); remake it with `nestopt report --run {rec.key}`")
    here = environment()
    if set(env.get("optional", {})) != set(here["optional"]) or env.get("torch") != here["torch"]:
        return (f"it was made with torch {env.get('torch')} and the optional packages {sorted(env.get('optional', {}))}, "
                f"and this machine has torch {here['torch']} and {sorted(here['optional'])}: install the same "
                "(pip install -e '.[dev]')")
    return ""


def _other_cpu(prov: dict) -> str:
    """Both processors, in words, when ``prov`` was stored on another processor than this one with
    the same torch and optional package versions; '' otherwise (the same processor, an unknown one,
    or other versions: then a difference is not the processor's alone)."""
    env, here = prov.get("environment", {}), environment()
    stored = env.get("cpu")
    if not stored or stored == "unknown" or stored == here["cpu"]:
        return ""
    if env.get("torch") != here["torch"] or env.get("optional") != here["optional"]:
        return ""
    return f"stored on {stored}, rerun on {here['cpu']}"


def _files(files: list[str], n: int = 4) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


def check(root: Path, cheap_only: bool = False, given: dict[str, Path] | None = None,
          log: Callable[[str], None] = print, keys: list[str] | None = None) -> bool:
    """Rerun (or take from ``given``) every cheap result and compare; list the stale expensive ones
    unless ``cheap_only``. ``True`` when every cheap result reproduces. ``keys`` limits the check."""
    given = given or {}
    ok = True
    chosen = {k: r for k, r in RECORDS.items() if keys is None or k in keys}
    for key, rec in chosen.items():
        if rec.cost != CHEAP:
            continue
        try:
            old, prov = load(root, key)
            problems = _before(rec, prov)
            if problems:
                raise ReportError(problems)
            if key in given:
                new = drop(normalise(read_json(given[key] / rec.result), str(given[key].resolve())), rec.drop)
                wall = None
            else:
                log(f"rerun {key}: {rec.command()}")
                with tempfile.TemporaryDirectory(prefix=f"nestopt-check-{key}-") as tmp:
                    new, new_prov = run(rec, Path(tmp) / "out", quiet=True)
                wall = new_prov["wall_s"]
        except ReportError as e:  # one result that cannot be checked does not stop the others
            log(f"FAIL {key}: {e}")
            ok = False
            continue
        problems = diff(old, new, rec)
        if wall is not None and prov["wall_s"] > 1 and not (prov["wall_s"] / TIME_FACTOR <= wall <= prov["wall_s"] * TIME_FACTOR):
            problems.append(f"wall time: {prov['wall_s']:.0f} s stored -> {wall:.0f} s (allowed: within {TIME_FACTOR:g}x)")
        elsewhere = _other_cpu(prov) if problems and key not in given else ""
        if problems and elsewhere and status(root, rec)[0] == "fresh":
            # Same code and packages, other processor: the difference is the machine's, not a change of
            # ours, provided the rerun reproduces itself here (a second rerun).
            log(f"rerun {key} again: it differs from the stored result on another processor; is it deterministic here?")
            with tempfile.TemporaryDirectory(prefix=f"nestopt-check-{key}-") as tmp:
                again, _ = run(rec, Path(tmp) / "out", quiet=True)
            unstable = diff(new, again, rec)
            if unstable:
                ok = False
                log(f"FAIL {key}: two reruns on this machine differ from each other (not deterministic):")
                for p in unstable:
                    log(f"    {p}")
                continue
            listed = [p for p in problems if not p.startswith("... and ")]
            total = len(listed) + sum(int(p.split()[2]) for p in problems if p.startswith("... and "))
            log(f"WARN {key}: the rerun differs from docs/results/{key} in {total} values, with the code and packages "
                f"it was stored with, on {elsewhere}; two reruns here agree, so the pinned numerics did not give the "
                "same bits on this processor (not a failure):")
            for p in listed[:6]:
                log(f"    {p}")
            if total > 6:
                log(f"    ... and {total - 6} more")
        elif problems:
            ok = False
            log(f"FAIL {key}: the rerun differs from docs/results/{key} (stored with code {prov['code_hash']}"
                + (f"; {elsewhere}" if elsewhere else "") + "):")
            for p in problems:
                log(f"    {p}")
        else:
            log(f"ok   {key}: reproduces the stored result" + (f" ({wall:.0f} s; stored {prov['wall_s']:.0f} s)" if wall else ""))
            state, files = status(root, rec)
            if state == "stale":
                log(f"     (its code changed since it was stored, without changing the result: {_files(files)}; "
                    f"`nestopt report --run {key}` records the current code)")
    if not cheap_only:
        for key, rec in chosen.items():
            if rec.cost == CHEAP:
                continue
            state, files = status(root, rec)
            if state == "fresh":
                log(f"ok   {key}: stored from the current code")
            elif state == "missing":
                log(f"STALE {key}: never stored; make it with `nestopt report --run {key}` ({rec.command()})")
            else:
                log(f"STALE {key}: its code changed since it was stored ({_files(files)}); "
                    f"remake it with `nestopt report --run {key}`")
    return ok


__all__ = ["check", "freshness", "status", "get"]
