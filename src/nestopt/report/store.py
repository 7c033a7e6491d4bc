"""Run a published command and keep its result under ``docs/results/KEY/`` with its provenance.

``docs/results/KEY/results.json`` is what the command wrote (less the paths its record drops),
``provenance.json`` says how it was made: the command, the package version, the code hash and the
hash of every file it ran (see :mod:`nestopt.report.codehash`), torch, Python, the machine, the
optional packages installed, the date and the wall time. The figures it wrote are kept beside them.
A stored result is only ever replaced by a complete run of the same command.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from . import codehash
from .published import Published, get

OPTIONAL = ("prodigyopt", "schedulefree", "optuna", "torchopt", "heavyball")

# The numerics of a cheap (rerun) result, pinned so that any x86-64 machine with AVX2 computes the
# same bits: torch's own kernels, MKL and oneDNN each dispatch on the CPU's vector width, and a
# different reduction order is enough to move a long chaotic run (the learned study's 2000-step
# task reads 2.50x on one and 1.25x on another). Two threads, whatever the machine's core count.
# Measured across vendors: with these pins the learned study, the large-learning-rate study, the
# quick bench and the audit reproduced bitwise on an Intel Xeon and an AMD EPYC; the Polyak study's
# chaotic float64 runs did not (one final loss 1.6e3 on one, 9.4e15 on the other), whatever MKL_CBWR
# said on the AMD machine (MKL_CBWR=COMPATIBLE moved the learned study's 2000-step row there instead).
# The check's other-processor rule (report/check.py) covers what the pins do not.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
OUT_TOKEN = "$OUT"
PACKAGE_TOKEN = "$PACKAGE"  # where nestopt is installed: a fresh clone's checkout is elsewhere


class ReportError(Exception):
    """A published result that cannot be made or read; the message is one line for the CLI."""


def results_dir(root: str | Path) -> Path:
    return Path(root) / "docs" / "results"


REPO = codehash.ROOT.parent  # the repository root, for the scripts (src/..)


def current_hashes(rec: Published) -> dict[str, str]:
    """``{file: hash}`` of what ``rec``'s command runs: package files relative to ``src/``, and the
    repository's own (``repo_files``) as ``repo:PATH``."""
    files = sorted(set(codehash.closure(rec.entries)) | set(rec.hashed))
    out = codehash.file_hashes(files)
    for pattern in rec.repo_files:
        for f in sorted(REPO.glob(pattern)):
            out[f"repo:{f.relative_to(REPO).as_posix()}"] = codehash.digest(f)
    return out


def environment() -> dict[str, Any]:
    import torch

    installed = {}
    for name in OPTIONAL:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from .. import __version__

    return {"nestopt": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": _cpu(), "cores": os.cpu_count(), "optional": installed}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _paths(doc: Any, prefix: str = ""):
    """``(path, parent, key)`` for every node under ``doc`` (paths as ``a/b/0/c``)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in list(items):
        path = f"{prefix}{k}"
        yield path, doc, k
        yield from _paths(v, path + "/")


def drop(doc: Any, patterns: tuple[str, ...]) -> Any:
    """``doc`` less every node whose path matches one of ``patterns`` (in place; returned)."""
    if patterns:
        hits = [(parent, key) for path, parent, key in _paths(doc) if any(fnmatch.fnmatchcase(path, p) for p in patterns)]
        for parent, key in reversed(hits):
            del parent[key]
    return doc


def normalise(doc: Any, out: str) -> Any:
    """Every string that names the run's output folder names ``$OUT`` instead, and one that names
    the installed package (a shipped network's file) ``$PACKAGE``."""
    if isinstance(doc, str):
        return doc.replace(out, OUT_TOKEN).replace(str(codehash.PACKAGE), PACKAGE_TOKEN)
    if isinstance(doc, dict):
        return {k: normalise(v, out) for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalise(v, out) for v in doc]
    return doc


def run(rec: Published, out: Path, quiet: bool = False) -> tuple[Any, dict[str, Any]]:
    """Run ``rec``'s command into the empty folder ``out``: ``(result, provenance)``. The code hash is
    taken before and after; a run during which its code changed is refused."""
    missing = [n for n in rec.needs if _missing(n)]
    if missing:
        raise ReportError(f"{rec.key} needs {', '.join(missing)}: pip install -e '.[hpo]'")
    before = current_hashes(rec)
    args = [a.replace("{out}", str(out)) for a in rec.argv]
    argv = [sys.executable, *args[1:]] if rec.script else [sys.executable, "-m", "nestopt.cli", *args]
    if rec.script or any("{out}/" in a for a in rec.argv):
        out.mkdir(parents=True, exist_ok=True)  # the command writes a file into it (its folder must exist)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    env = {**os.environ, **(PINNED_ENV if rec.pinned else {})}
    returncode, stderr = _run_child(argv, env=env, cwd=REPO if rec.script else None, quiet=quiet)
    wall = time.perf_counter() - t0
    if returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ReportError(f"{rec.command()} exited with code {returncode}: {tail[0]}")
    if current_hashes(rec) != before:
        raise ReportError(f"the code of {rec.key} changed while it ran; run it again")
    doc = read_json(out / rec.result)
    doc = drop(normalise(doc, str(out)), rec.drop)
    prov = {"key": rec.key, "command": rec.command(), "code_hash": codehash.code_hash(before), "files": before,
            "environment": {**environment(), "pinned": PINNED_ENV if rec.pinned else {}}, "started": started,
            "wall_s": round(wall, 1)}
    return doc, prov


def _run_child(argv: list[str], env: dict[str, str], cwd: Path | None, quiet: bool) -> tuple[int, str]:
    """Run the command; when this process is interrupted (Ctrl-C, SIGTERM), the command gets
    SIGTERM and the time to stop its own workers before this one goes on with the interrupt."""
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True,
                          cwd=cwd, env=env) as proc:
        try:
            _, err = proc.communicate()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return proc.returncode, err


def _missing(dist: str) -> bool:
    try:
        metadata.version(dist)
        return False
    except metadata.PackageNotFoundError:
        return True


def store(rec: Published, root: Path, out: Path, doc: Any, prov: dict[str, Any]) -> Path:
    """Replace ``docs/results/KEY/`` by this run's result, provenance and figures (written beside it
    first, then renamed, so a failure leaves the old result whole)."""
    dest = results_dir(root) / rec.key
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{rec.key}-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private; a stored result is for everyone to read
        for pattern in rec.keep:
            for f in sorted(out.glob(pattern)):
                if f.name != rec.result and f.is_file():
                    shutil.copy2(f, tmp / f.name)
        atomic_write_text(tmp / "results.json", json.dumps(doc, indent=None, separators=(",", ":"), allow_nan=False) + "\n")
        atomic_write_text(tmp / "provenance.json", json.dumps(prov, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{rec.key}-old-{os.getpid()}") if dest.exists() else None
    try:
        if old is not None:
            dest.rename(old)
        tmp.rename(dest)
    except BaseException:  # put the old result back: a result is replaced whole or not at all
        if old is not None and old.exists() and not dest.exists():
            old.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def load(root: str | Path, key: str) -> tuple[Any, dict[str, Any]]:
    """``(result, provenance)`` of the stored result ``key``; ``ReportError`` when it is missing."""
    get(key)
    d = results_dir(root) / key
    if not (d / "provenance.json").is_file():
        raise ReportError(f"no stored result {key!r} in {d}: run `nestopt report --run {key}`")
    return read_json(d / "results.json"), read_json(d / "provenance.json")


def read_json(path: Path) -> Any:
    """A JSON file (nothing in it runs); ``ReportError`` naming it when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} cannot be read as JSON: {e}") from None


def stored(root: str | Path) -> list[str]:
    d = results_dir(root)
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / "provenance.json").is_file()) \
        if d.is_dir() else []
