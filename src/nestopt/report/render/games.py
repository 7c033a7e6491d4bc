"""Blocks of the games study: each a section of the study's own report."""

from __future__ import annotations

from typing import Any

from .sections import figures, pick


def _report(doc: dict[str, Any]) -> str:
    from ...studies.games import report

    return report(doc)


def _part(prefix: str):
    def render(doc: dict[str, Any], prov: dict[str, Any]) -> str:
        return figures(pick(_report(doc), prefix), "games")

    return render


def rates(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    r = doc["rates"]["rows"]
    worst = max(row["rel_err"] for row in r)
    h = doc["heatmap"]
    text = f"Measured and analytic rates agree within {100 * worst:.2f}% in every row"
    text += (f", and within {100 * h['max_rel_err']:.2f}% on the heatmap's measured grid." if h.get("max_rel_err") is not None
             else "; the heatmap has no measured rate.")
    return figures(pick(_report(doc), "Bilinear game"), "games") + "\n\n" + text


def gan(doc: dict[str, Any], prov: dict[str, Any]) -> str:
    methods = doc["gan"]["methods"]
    mean = {name: sum(m["final_modes"]) / len(m["final_modes"]) for name, m in methods.items()}
    best = max(mean, key=mean.get)
    spread = {name: max(m["final_modes"]) - min(m["final_modes"]) for name, m in methods.items()}
    widest = max(spread, key=spread.get)
    text = ("Mean modes covered over the seeds: " + ", ".join(f"{n} {v:.1f}" for n, v in mean.items()) +
            f". The most on average: {best}. Within one method the seeds differ by up to {spread[widest]} modes "
            f"({widest}), so differences between methods smaller than that spread are noise at this number of seeds.")
    return figures(pick(_report(doc), "Gaussian-mixture GAN"), "games") + "\n\n" + text


RENDERERS = {
    "games.rates": ("games", rates),
    "games.gan": ("games", gan),
    "games.lyapunov": ("games", _part("Lyapunov")),
    "games.ridge": ("games", _part("Ridge Rider")),
}
