"""The generated blocks of the README and ``docs/``, and the rule that no other number is typed.

A block is delimited in the Markdown by two comments; ``nestopt report --docs`` replaces what lies
between them by what the renderer of that name returns (see :mod:`nestopt.report.render`)::

    <!-- generated: learned.table -->
    ...
    <!-- end generated -->

Outside the blocks, a number may appear only in code (fenced blocks and inline code: API values
such as ``lr=1e-3`` are code), as a list marker, or in a citation (``Wu et al. 2018``, ``issue 21``);
:func:`hand_typed` finds every other one, and a test holds every Markdown file to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

BEGIN = re.compile(r"<!-- generated: ([\w.\-]+) -->\n")
END = "<!-- end generated -->"


class BlockError(ValueError):
    pass


def doc_files(root: Path) -> list[Path]:
    """The Markdown files whose numbers must come from results: the README and ``docs/``."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted(p for p in (root / "docs").rglob("*.md") if "results" not in p.relative_to(root / "docs").parts)


def blocks(text: str) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of each block's content in ``text`` (the content is ``text[start:end]``)."""
    out = []
    pos = 0
    while (m := BEGIN.search(text, pos)) is not None:
        end = text.find(END, m.end())
        nested = BEGIN.search(text, m.end())
        if end < 0 or (nested is not None and nested.start() < end):
            line = text.count("\n", 0, m.start()) + 1
            where = "before the next block" if nested is not None else "after it"
            raise BlockError(f"line {line}: block {m.group(1)!r} has no `{END}` {where}")
        out.append((m.group(1), m.end(), end))
        pos = end + len(END)
    return out


def render_text(text: str, render: Callable[[str], str]) -> str:
    """``text`` with every block's content replaced by ``render(name)`` (which ends in a newline)."""
    parts, pos = [], 0
    for name, start, end in blocks(text):
        body = render(name)
        parts += [text[pos:start], body if body.endswith("\n") else body + "\n"]
        pos = end
    return "".join(parts) + text[pos:]


def render_all(root: Path, write: bool = True) -> list[tuple[str, str]]:
    """Render every block of every doc file; ``(file, block)`` for each block whose text changed
    (written back when ``write``)."""
    from .render import render
    from .store import ReportError

    changed = []
    for path in doc_files(root):
        rel = str(path.relative_to(root))
        text = path.read_text()
        cache: dict[str, str] = {}

        def one(name: str) -> str:
            if name not in cache:
                cache[name] = render(root, name)
            return cache[name]

        try:
            old = blocks(text)
            new = render_text(text, one)
        except (BlockError, ReportError) as e:
            raise BlockError(f"{rel}: {e}") from None
        if new != text:  # block by block, in order: two blocks of one name are two blocks
            changed += [(rel, n) for (n, s, e), (_, s2, e2) in zip(old, blocks(new)) if text[s:e] != new[s2:e2]]
            if write:
                path.write_text(new)
    return changed


_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"\]\([^)]*\)")
_ALLOWED = [re.compile(p) for p in (
    r"(?m)^\s*\d+\.\s",                                   # a numbered list
    r"\bissues? \d+(?:(?:,| and| or) \d+)*",               # issue 21, issues 21 and 22
    r"\b[A-Z][A-Za-z\-]+ et al\.,? (?:19|20)\d\d[a-z]?\b",   # Wu et al. 2018
)]
_NUMBER = re.compile(r"(?<![\w.\-])[-+]?\.?\d[\w.,%/\-]*|\b[xX]\d[\d.]*\b")


def hand_typed(text: str) -> list[tuple[int, str]]:
    """``(line, number)`` for every number in ``text`` outside generated blocks, code and citations."""
    spans = [(s, e) for _, s, e in blocks(text)]
    keep = list(text)
    for s, e in spans:
        keep[s:e] = "\n" * 0 + "".join(c if c == "\n" else " " for c in text[s:e])
    t = "".join(keep)
    for rx in (_FENCE, _COMMENT, _CODE, _LINK, *_ALLOWED):
        t = rx.sub(lambda m: "".join(c if c == "\n" else " " for c in m.group(0)), t)
    return [(t.count("\n", 0, m.start()) + 1, m.group(0).rstrip(".,")) for m in _NUMBER.finditer(t)]


def main(argv: list[str] | None = None) -> int:
    """``python -m nestopt.report.blocks FILE ...``: print every hand-typed number; exit 1 if any."""
    import sys

    bad = 0
    for f in argv if argv is not None else sys.argv[1:]:
        for line, num in hand_typed(Path(f).read_text()):
            print(f"{f}:{line}: {num}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
