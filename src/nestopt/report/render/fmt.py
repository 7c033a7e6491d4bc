"""Number formatting and the source line every generated block ends with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..published import get


def num(x: Any, sig: int = 3) -> str:
    """``x`` to ``sig`` significant digits (``-`` for ``None``, ``never`` for infinity)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "never"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{max(sig - 1, 0)}e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    digits = max(sig - 1 - math.floor(math.log10(abs(x))), 0)
    return f"{x:.{digits}f}"


def dec(x: Any, places: int = 2) -> str:
    return "-" if x is None else f"{x:.{places}f}"


def ratio(x: Any, sig: int = 3) -> str:
    return "-" if x is None else f"{num(x, sig)}x"


def pct(x: float, places: int = 0) -> str:
    return f"{100 * x:.{places}f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} minutes"


def source(prov: dict[str, Any]) -> str:
    """Where a block's numbers come from: the command, its time, the machine and the code."""
    env = prov["environment"]
    cmd = prov["command"].replace(" OUT/", " DIR/").replace(" OUT", " DIR")
    numerics = (f"AVX2 numerics pinned, {env['pinned']['OMP_NUM_THREADS']} threads" if env.get("pinned")
                else "the machine's own numerics")
    return (f"<sub>From `{cmd}` ({minutes(prov['wall_s'])} on a {env['cores']}-core {env['cpu']}, {numerics}; torch "
            f"{env['torch']}; code `{prov['code_hash']}`, {prov['started'][:10]}); stored in "
            f"`docs/results/{prov['key']}/`.</sub>")


def missing(key: str) -> str:
    rec = get(key)
    return (f"*Not measured in this version:* `{rec.command('DIR')}` has not been run and stored. "
            f"Make it with `nestopt report --run {key}`.\n")


def of(n: int, m: int) -> str:
    return f"{n} of {m}"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"
