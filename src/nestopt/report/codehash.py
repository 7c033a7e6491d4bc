"""Which source files a command runs, and one hash over them.

A published result records the hash of the code it measured. The files are found statically: the
entry modules, every ``nestopt`` module they import (at any depth of a file, function-level imports
included) and so on, the package ``__init__`` files on the way, and the data files that ship in
those packages (the update networks' weights). A result goes stale when any of them changes, and
:func:`changed` says which.

    >>> files = closure(["nestopt.schedule"])
    >>> "nestopt/schedule/__init__.py" in files and "nestopt/__init__.py" in files
    True
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # .../nestopt
ROOT = PACKAGE.parent
# The data files that ship in the package (pyproject's [tool.setuptools.package-data]; a test
# holds the two equal). Only these are hashed: a stray editor file must not change a result's hash.
DATA = ("py.typed", "nets/shipped/*.safetensors")


def _path(module: str) -> Path | None:
    """The file of ``module`` (``nestopt.a.b``), or ``None`` when it is no module of ours."""
    parts = module.split(".")
    if parts[0] != "nestopt":
        return None
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``nestopt`` module ``path`` imports, absolute, wherever the import sits in the file."""
    mod = _module(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "nestopt"}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if base.split(".")[0] != "nestopt":
                    continue
            else:
                prefix = package[: len(package) - node.level + 1]
                base = ".".join(prefix + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # a name may be a submodule
    return out


def closure(entries: Iterable[str]) -> list[str]:
    """The files (relative to ``src/``, ``/``-separated, sorted) that running ``entries`` loads."""
    seen: set[Path] = set()
    todo: list[str] = []
    for entry in entries:
        if _path(entry) is None:
            raise ValueError(f"entry {entry!r} is invalid: no module of that name in {PACKAGE}")
        todo.append(entry)
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages run their __init__ first
            p = _path(".".join(parts[:i]))
            if p is None or p in seen:
                continue
            seen.add(p)
            todo.extend(imports(p))
    files = set(seen)
    packages = {p.parent for p in seen if p.name == "__init__.py"}
    for pattern in DATA:  # the shipped data of the packages it loads (the update networks' weights)
        for f in PACKAGE.glob(pattern):
            if f.is_file() and _nearest_package(f) in packages:
                files.add(f)
    return sorted(f.relative_to(ROOT).as_posix() for f in files)


def _nearest_package(f: Path) -> Path:
    d = f.parent
    while not (d / "__init__.py").is_file() and d != PACKAGE:
        d = d.parent
    return d


def digest(path: Path) -> str:
    """The sha256 of a file's bytes, first 16 hex digits."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def file_hashes(files: Iterable[str]) -> dict[str, str]:
    """``{file: digest}`` of each file under ``src/``."""
    return {f: digest(ROOT / f) for f in files}


def code_hash(hashes: dict[str, str]) -> str:
    """One hash over the files and their contents (first 16 hex digits)."""
    text = "\n".join(f"{f} {h}" for f, h in sorted(hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The files that differ between two ``file_hashes`` maps: changed, added (``+``) or removed (``-``)."""
    out = [f for f in sorted(set(recorded) & set(current)) if recorded[f] != current[f]]
    out += [f"+{f}" for f in sorted(set(current) - set(recorded))]
    out += [f"-{f}" for f in sorted(set(recorded) - set(current))]
    return out
