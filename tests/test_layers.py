"""The package's layers import downwards only, and ``import nestopt.optim`` stays light.

The table below is the one the README's development section draws. A module may import from its
own part and from parts on lower layers; an import upwards (or sideways between two parts of one
layer) fails here with the file, the line and both layers named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "nestopt"

# part -> layer (0 = bottom). A part is a top-level module or subpackage of nestopt.
LAYERS = {
    "_checks": 0, "_io": 0, "_malloc": 0, "_ranks": 0, "_threads": 0,
    "nets": 1, "tasks": 1, "schedule": 1, "losses": 1,
    "optim": 2, "hyper": 2, "diagnostics": 2, "guards": 2, "games": 2,
    "train": 3, "integrations": 3,
    "bench": 4, "meta": 4,
    "studies": 5,
    "report": 6,
    "_cli_args": 7,
    "commands": 8,
    "cli": 9,
    "__main__": 10,
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nestopt" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every nestopt import in ``path``, at any depth of the file."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("nestopt")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("nestopt"):
                    out.append((node.lineno, node.module))
                continue
            base = package[: len(package) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                out.append((node.lineno, mod))
            else:  # from .. import tasks: each name may be a module
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in _files()} - {"__init__"}
    assert parts <= set(LAYERS), f"parts without a layer in this table: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_downwards(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    if own == "__init__":
        return
    bad = []
    for line, mod in _imports(path):
        part = _part(mod)
        if part is None or part == own or part == "__init__" or mod == "nestopt":
            continue
        if part not in LAYERS:
            continue  # e.g. ``from .. import __version__`` names no part
        if LAYERS[part] >= LAYERS[own]:
            bad.append(f"{path.relative_to(SRC)}:{line} imports {mod} (layer {LAYERS[part]}) from {own} (layer {LAYERS[own]})")
    assert not bad, "\n".join(bad)


def test_importing_the_optimizers_loads_no_upper_layer():
    code = ("import sys, nestopt.optim; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('nestopt'))))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    upper = [m for m in loaded if (_part(m) or "") in LAYERS and LAYERS[_part(m)] > LAYERS["optim"]]
    assert not upper, f"import nestopt.optim loaded {upper}"
    assert "nestopt.optim.nested" in loaded  # the check saw the real import
