"""A study's own ``report.md`` (rendered from its results by the study) cut into sections, so a
block can show one section of it without a second copy of the study's formatting."""

from __future__ import annotations

import re


def sections(md: str) -> dict[str, str]:
    """``{heading: body}`` of every ``## `` section (the text before the first one under ``""``)."""
    out: dict[str, str] = {}
    title, body = "", []
    for line in md.splitlines():
        if line.startswith("## "):
            out[title] = "\n".join(body).strip()
            title, body = line[3:].strip(), []
        else:
            body.append(line)
    out[title] = "\n".join(body).strip()
    return out


def pick(md: str, prefix: str) -> str:
    """The body of the first section whose heading starts with ``prefix``."""
    for title, body in sections(md).items():
        if title.startswith(prefix):
            return body
    raise KeyError(f"no section starting {prefix!r}; sections: {list(sections(md))}")


def figures(text: str, key: str) -> str:
    """Image links and figure names of a study's report pointed at ``docs/results/KEY/``."""
    text = re.sub(r"!\[([^\]]*)\]\(([\w.\-]+\.png)\)", rf"![\1](results/{key}/\2)", text)
    return re.sub(r"(?<![/(])`([\w\-]+\.png)`", rf"[`\1`](results/{key}/\1)", text)


def demote(text: str, levels: int = 2) -> str:
    """Headings inside a block one level below the page's own."""
    return re.sub(r"(?m)^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", text)
