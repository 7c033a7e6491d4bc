"""How the bench's entries look in figures: one colour per family, one line style per member.

An entry (a row of the bench's table: ``"adamw-tuned"``, ``"adamw-default"``, ``"prodigy"``) belongs
to its optimizer's **family**; the entries of a family share a colour and each member gets its own
line style (solid, dashed, dotted, dash-dot, then custom dash patterns, with a marker from the
seventh member on), so no two entries share both colour and line style however many there are::

    >>> from nestopt.bench.figstyle import assign
    >>> st = assign(["adamw-tuned", "adamw-default", "prodigy"],
    ...             {"adamw-tuned": "baseline", "adamw-default": "baseline", "prodigy": "peer"})
    >>> st["adamw-default"].color == st["adamw-tuned"].color != st["prodigy"].color
    True
    >>> st["adamw-default"].linestyle, st["adamw-tuned"].linestyle
    ('-', '--')

Members are sorted by name within their family, so an entry keeps its style from run to run over
the same set of entries. A family comes from the mapping given (a results document's optional
``summary["families"]``, which the bench itself does not write: a user's document may carry one) or
else from the registry
(:func:`registry_family`); a name the registry does not know is ``"other"``.

Nothing here imports matplotlib: colours are hex strings and line styles matplotlib's own values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._checks import unknown_name

#: Families in the order figures and legends list them.
FAMILIES = ("baseline", "peer", "polyak", "learned", "nested", "schedule", "games", "other")

#: One colour per family (matplotlib's tab10, less its grey, which marks de-emphasised entries).
FAMILY_COLORS = {
    "baseline": "#1f77b4",  # blue
    "peer": "#ff7f0e",  # orange
    "polyak": "#2ca02c",  # green
    "learned": "#9467bd",  # purple
    "nested": "#d62728",  # red
    "schedule": "#8c564b",  # brown
    "games": "#e377c2",  # pink
    "other": "#bcbd22",  # olive
}
#: Colours for families outside :data:`FAMILIES` (a document may name new ones), in turn.
EXTRA_COLORS = ("#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
#: What a de-emphasised entry is drawn in (``highlight``).
MUTED = "#c8c8c8"

#: Line styles for a family's members, in turn; past these, generated dash patterns with markers.
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")

SUFFIXES = ("-tuned", "-default")


@dataclass(frozen=True)
class Style:
    """How one entry is drawn."""

    family: str
    color: str
    linestyle: Any  # a matplotlib line style: a name or (offset, dash tuple)
    marker: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot``/``Axes.step``."""
        kw: dict[str, Any] = {"color": self.color, "linestyle": self.linestyle}
        if self.marker is not None:
            kw.update(marker=self.marker, markevery=0.15, markersize=3.5)
        return kw


def line_style(i: int) -> Any:
    """The ``i``-th line style of a family (``i`` >= 0); distinct for every ``i``."""
    if i < len(LINESTYLES):
        return LINESTYLES[i]
    k = i - len(LINESTYLES)
    dash, gap, dots = 2 + 2 * (k % 5), 1 + (k // 5) % 3, k // 15  # dash even: never a LINESTYLES tuple
    return (0, (dash, gap) + (1, gap) * dots)


def marker(i: int) -> str | None:
    """The marker of a family's ``i``-th member: none for the first :data:`LINESTYLES`."""
    return None if i < len(LINESTYLES) else MARKERS[(i - len(LINESTYLES)) % len(MARKERS)]


def optimizer_of(entry: str) -> str:
    """The optimizer behind an entry name: ``"adamw-tuned"`` and ``"adamw-default"`` -> ``"adamw"``."""
    for suffix in SUFFIXES:
        if entry.endswith(suffix) and len(entry) > len(suffix):
            return entry[: -len(suffix)]
    return entry


def registry_family(entry: str) -> str:
    """An entry's family from the optimizer registry (the spec's ``family``); ``"other"`` for a
    name the registry does not know (a results file from an older version, a study's variant)."""
    from . import registry

    for name in dict.fromkeys((entry, optimizer_of(entry))):
        try:
            spec = registry.get(name)
        except (KeyError, TypeError):
            continue
        family = getattr(spec, "family", None)
        return family if isinstance(family, str) and family else "other"
    return "other"


def families_of(entries: Iterable[str], families: Mapping[str, str] | None = None) -> dict[str, str]:
    """Entry -> family: from ``families`` where it names the entry, else :func:`registry_family`."""
    given = families or {}
    out = {}
    for e in entries:
        f = given.get(e)
        out[e] = f if isinstance(f, str) and f else registry_family(e)
    return out


def family_order(families: Iterable[str]) -> list[str]:
    """The distinct ``families`` in figure order: :data:`FAMILIES` first, then unknown ones by name
    (``"other"`` stays last)."""
    present = set(families)
    known = [f for f in FAMILIES if f in present and f != "other"]
    return known + sorted(present - set(FAMILIES)) + (["other"] if "other" in present else [])


def assign(entries: Iterable[str], families: Mapping[str, str] | None = None) -> dict[str, Style]:
    """Entry -> :class:`Style`. ``families`` maps entries to families (those it leaves out are
    looked up in the registry). No two entries get both the same colour and the same line style."""
    fam = families_of(sorted(set(entries)), families)
    groups: dict[str, list[str]] = {}
    for e, f in fam.items():
        groups.setdefault(f, []).append(e)
    out: dict[str, Style] = {}
    used: set[tuple[str, Any]] = set()
    extra = 0
    for f in family_order(groups):
        if f in FAMILY_COLORS:
            color = FAMILY_COLORS[f]
        else:
            color, extra = EXTRA_COLORS[extra % len(EXTRA_COLORS)], extra + 1
        i = 0
        for e in sorted(groups[f]):
            while (color, line_style(i)) in used:  # (only when extra families outnumber EXTRA_COLORS)
                i += 1
            used.add((color, line_style(i)))
            out[e] = Style(f, color, line_style(i), marker(i))
            i += 1
    pairs = [(s.color, s.linestyle) for s in out.values()]
    assert len(set(pairs)) == len(pairs), "two entries share a colour and a line style"
    return out


def legend_order(styles: Mapping[str, Style]) -> list[tuple[str, list[str]]]:
    """``[(family, [entries sorted by name]), ...]`` in figure order."""
    groups: dict[str, list[str]] = {}
    for e, s in styles.items():
        groups.setdefault(s.family, []).append(e)
    return [(f, sorted(groups[f])) for f in family_order(groups)]


def legend_columns(groups: Sequence[tuple[str, list[str]]], max_cols: int) -> list[list[tuple[str, list[str]]]]:
    """Pack whole families, in order, into at most ``max_cols`` columns of a legend (a family's
    header plus its members), as evenly as whole families allow."""
    if not groups:
        return []
    sizes = [1 + len(m) for _, m in groups]
    height = max(max(sizes), -(-sum(sizes) // max(max_cols, 1)))
    while True:
        cols: list[list[tuple[str, list[str]]]] = [[]]
        filled = 0
        for g, n in zip(groups, sizes):
            if cols[-1] and filled + n > height:
                cols.append([])
                filled = 0
            cols[-1].append(g)
            filled += n
        if len(cols) <= max(max_cols, 1):
            return cols
        height += 1


def resolve_highlight(highlight: str | Sequence[str] | None, entries: Iterable[str]) -> set[str]:
    """The entries that ``highlight`` names (none for ``None``): an entry name matches itself, an
    optimizer name its ``-tuned`` and ``-default`` entries. A ``ValueError`` for a name that
    matches none, listing the valid names."""
    if highlight is None:
        return set()
    names = [highlight] if isinstance(highlight, str) else list(highlight)
    valid = set(entries)
    out: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"highlight={highlight!r} is invalid: expected an entry or optimizer name "
                             f"(a string), or a sequence of them")
        hit = {e for e in (name, *(name + s for s in SUFFIXES)) if e in valid}
        if not hit:
            raise ValueError(f"highlight={name!r} is invalid: "
                             + unknown_name("entry", name, valid).args[0]
                             + " (or an optimizer name, for its -tuned and -default entries)")
        out |= hit
    return out


def top_k(scores: Mapping[str, float], k: int) -> list[str]:
    """The ``k`` entries with the highest score (ties by name), best first."""
    return sorted(scores, key=lambda e: (-scores[e], e))[: max(k, 0)]


def spread(ys: Sequence[float], min_gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Label positions near ``ys`` (one per label, same order) that are at least ``min_gap`` apart:
    labels that would crowd form a block spaced ``min_gap`` and centred on their mean, kept inside
    ``[lo, hi]`` where the block fits (if it does not, it is centred on the range). Labels keep the
    order of their ``ys``; of equal ``ys``, an earlier one goes lower."""
    order = sorted(range(len(ys)), key=lambda i: (ys[i], i))
    blocks = [[i] for i in order]

    def start(block: list[int]) -> float:
        span = (len(block) - 1) * min_gap
        s = sum(ys[i] for i in block) / len(block) - span / 2
        if span > hi - lo:
            return (lo + hi) / 2 - span / 2
        return min(max(s, lo), hi - span)

    starts = [start(b) for b in blocks]
    merged = True
    while merged:
        merged = False
        for j in range(len(blocks) - 1):
            if starts[j] + len(blocks[j]) * min_gap > starts[j + 1] + 1e-12:
                blocks[j] += blocks.pop(j + 1)
                starts.pop(j + 1)
                starts[j] = start(blocks[j])
                merged = True
                break
    out = [0.0] * len(ys)
    for b, s in zip(blocks, starts):
        for n, i in enumerate(b):
            out[i] = s + n * min_gap
    return out


__all__ = ["EXTRA_COLORS", "FAMILIES", "FAMILY_COLORS", "LINESTYLES", "MARKERS", "MUTED", "Style", "assign",
           "families_of", "family_order", "legend_columns", "legend_order", "line_style", "marker",
           "optimizer_of", "registry_family", "resolve_highlight", "spread", "top_k"]
