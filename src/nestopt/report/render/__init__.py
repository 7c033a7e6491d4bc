"""The renderers of the generated blocks: ``NAME -> markdown``, from the stored results only.

A block's name is ``KEY.PART``: ``KEY`` the published result it renders (see
:mod:`nestopt.report.published`), ``PART`` what of it. Every block ends with the line that says
where its numbers come from (:func:`~nestopt.report.render.fmt.source`). A block whose result was
never stored says so, and how to make it, instead of showing a number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..store import ReportError, load, stored
from . import bench, controller, dev, games, hpo, refit, stopping, studies, summary
from .fmt import missing, source

Renderer = Callable[..., str]

RENDERERS: dict[str, tuple[str | tuple[str, ...], Renderer]] = {
    **studies.RENDERERS, **bench.RENDERERS, **dev.RENDERERS, **controller.RENDERERS, **hpo.RENDERERS, **games.RENDERERS,
    **refit.RENDERERS, **stopping.RENDERERS,
}


def names() -> list[str]:
    return sorted([*RENDERERS, *summary.RENDERERS])


def render(root: Path, name: str) -> str:
    """The markdown of block ``name``; ``ReportError`` for a name no renderer has."""
    if name in summary.RENDERERS:
        return summary.RENDERERS[name](root)
    if name not in RENDERERS:
        raise ReportError(f"block {name!r} has no renderer; known blocks: {', '.join(names())}")
    key, fn = RENDERERS[name]
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        if k not in stored(root):
            return missing(k)
    loaded = [load(root, k) for k in keys]  # a damaged result raises: it never renders as "not measured"
    body = fn(*loaded[0]) if len(keys) == 1 else fn(loaded)
    return body.rstrip("\n") + "\n\n" + "\n\n".join(source(prov) for _, prov in loaded) + "\n"
