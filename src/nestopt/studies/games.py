"""``nestopt study games``: complex momentum and the baselines on the bilinear game and a GAN,
Lyapunov exponents across sweeps, and Ridge Rider against random restarts.

Sections (each writes figures; ``results.json`` holds every number):

1. **rates**: on the bilinear game (dim 2, singular values 1 and 2) every method's
   hyperparameters are chosen on a grid to minimise the analytic spectral radius of its
   linearised update (:mod:`nestopt.games.linear`); then the real optimizers run through
   :func:`nestopt.games.play` in float64 and the per-step contraction of the distance to the
   equilibrium is measured (log-linear fit over the second half of the run).
2. **heatmap**: simultaneous complex momentum's analytic spectral radius over ``|beta|`` and
   ``arg beta`` at the chosen step size, and the measured rate on a coarser grid.
3. **gan**: the 8-Gaussian GAN, modes covered and high-quality fraction over training for each
   method, 3 seeds, with sample plots.
4. **lyapunov**: the exponent across the Dirac GAN's gradient penalty (analytic bifurcation at
   ``gamma = lr / 4``) and across the complex momentum phase on the bilinear game.
5. **ridge rider** against random restarts at equal gradient-evaluation budgets.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_savefig, atomic_write_text, save_part
from ..games import linear, play
from ..games.lyapunov import lyapunov_exponent, sign_changes
from ..games.ridge_rider import SymmetricWells, distinct, random_restarts, ridge_rider
from ..optim import ComplexAdam, ComplexMomentum
from ..tasks.games import BilinearGame, DiracGAN, MixtureGAN, mode_stats
from ._common import finite

LRS = tuple(round(0.02 * k, 2) for k in range(1, 51))
MAGS = tuple(round(0.05 * k, 2) for k in range(1, 20))
PHASES = tuple(float(x) for x in np.linspace(0.0, math.pi, 25))
REAL_BETAS = tuple(round(-0.9 + 0.1 * k, 1) for k in range(19))

# name -> (analysis method, runner mode, grid)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "GDA (simultaneous)": ("gda", "simultaneous", {}),
    "GDA (alternating)": ("gda-alt", "alternating", {}),
    "extragradient": ("extragradient", "extragradient", {}),
    "optimistic GDA": ("optimistic", "optimistic", {}),
    "heavy ball / negative momentum (simultaneous)": ("momentum", "simultaneous", {"betas": REAL_BETAS}),
    "heavy ball / negative momentum (alternating)": ("momentum-alt", "alternating", {"betas": REAL_BETAS}),
    "complex momentum (simultaneous)": ("momentum", "simultaneous", {"betas": MAGS, "phases": PHASES}),
    "complex momentum (alternating)": ("momentum-alt", "alternating", {"betas": MAGS, "phases": PHASES}),
}


def _bilinear_optimizers(hp: dict[str, float]):
    def make(players):
        if "beta" in hp and (hp["beta"] != 0.0 or hp["phase"] != 0.0):
            mag, phase = abs(hp["beta"]), hp["phase"] + (math.pi if hp["beta"] < 0 else 0.0)
            phase = phase - 2 * math.pi if phase > math.pi else phase
            return [ComplexMomentum(p.parameters(), lr=hp["lr"], beta=mag, phase=phase) for p in players]
        return [torch.optim.SGD(p.parameters(), lr=hp["lr"]) for p in players]
    return make


def measured_rate(game: BilinearGame, hp: dict[str, float], mode: str, steps: int, seed: int = 0) -> dict[str, Any]:
    """Run the optimizers; fit ``log distance`` over the second half: ``rate = exp(slope)``."""
    players = game.init(seed)
    hist = play(game, players, _bilinear_optimizers(hp)(players), steps, mode=mode)
    d = np.array([h["distance"] for h in hist])
    ok = np.isfinite(d) & (d > 1e-280)
    t = np.arange(len(d))
    half = t >= len(d) // 2
    sel = ok & half
    slope = np.polyfit(t[sel], np.log(d[sel]), 1)[0] if sel.sum() > 10 else float("nan")
    return {"rate": float(math.exp(slope)), "distance": d.tolist(), "final": float(d[-1])}


def rates_section(steps: int = 1500, coarse: int = 1) -> dict[str, Any]:
    """``coarse`` > 1 thins every grid (the smoke test)."""
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    rows = []
    for name, (method, mode, grid) in METHODS.items():
        hp = linear.best(method, sv, LRS[::coarse], grid.get("betas", (0.0,))[::coarse],
                         grid.get("phases", (0.0,))[::coarse])
        m = measured_rate(game, hp, mode, steps)
        rows.append({"method": name, "analysis": method, "mode": mode, **hp, "measured": m["rate"],
                     "rel_err": abs(m["rate"] - hp["rho"]) / hp["rho"],
                     "final_distance": m["final"], "curve": m["distance"][::10]})
    cm = next(r for r in rows if r["method"] == "complex momentum (simultaneous)")
    gda_at = {"lr": cm["lr"], "beta": 0.0, "phase": 0.0}
    rho = linear.spectral_radius("gda", sv, cm["lr"])
    g = measured_rate(game, gda_at, "simultaneous", steps)
    rows.append({"method": "GDA (simultaneous) at complex momentum's lr", "analysis": "gda", "mode": "simultaneous",
                 **gda_at, "rho": rho, "measured": g["rate"], "rel_err": abs(g["rate"] - rho) / rho,
                 "final_distance": g["final"], "curve": g["distance"][::10]})
    return {"singular_values": sv, "steps": steps, "rows": rows}


def heatmap_section(lr: float, measured_grid: int = 8, steps: int = 600, analytic_grid: int = 39) -> dict[str, Any]:
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    mags = np.linspace(0.0, 0.95, analytic_grid)
    phases = np.linspace(0.0, math.pi, analytic_grid + 10)
    rho = [[linear.spectral_radius("momentum", sv, lr, float(b), float(p)) for p in phases] for b in mags]
    mm = np.linspace(0.1, 0.9, measured_grid)
    pp = np.linspace(0.0, math.pi, measured_grid)
    meas = [[measured_rate(game, {"lr": lr, "beta": float(b), "phase": float(p)}, "simultaneous", steps)["rate"]
             for p in pp] for b in mm]
    ana = [[linear.spectral_radius("momentum", sv, lr, float(b), float(p)) for p in pp] for b in mm]
    errs = [abs(a - m) / a for ra, rm in zip(ana, meas) for a, m in zip(ra, rm) if math.isfinite(m)]
    return {"lr": lr, "mags": mags.tolist(), "phases": phases.tolist(), "rho": rho, "measured_mags": mm.tolist(),
            "measured_phases": pp.tolist(), "measured": meas, "analytic_at_measured": ana,
            "max_rel_err": max(errs) if errs else None}


def gan_methods() -> dict[str, tuple[str, Any]]:
    return {
        "Adam": ("simultaneous", lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999))),
        "complex Adam (0.5 e^{i pi/8})": ("simultaneous",
                                          lambda p: ComplexAdam(p, lr=1e-3, betas=(0.5, 0.999), phase=math.pi / 8)),
        "complex Adam (0.8 e^{i pi/4})": ("simultaneous",
                                          lambda p: ComplexAdam(p, lr=1e-3, betas=(0.8, 0.999), phase=math.pi / 4)),
        "GDA (SGD 0.05)": ("simultaneous", lambda p: torch.optim.SGD(p, lr=0.05)),
        "extragradient (SGD 0.05)": ("extragradient", lambda p: torch.optim.SGD(p, lr=0.05)),
        "optimistic (SGD 0.05)": ("optimistic", lambda p: torch.optim.SGD(p, lr=0.05)),
        "extragradient (Adam)": ("extragradient", lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999))),
    }


def gan_section(steps: int = 3000, seeds: int = 3, every: int = 250) -> dict[str, Any]:
    game = MixtureGAN()
    out: dict[str, Any] = {"steps": steps, "seeds": seeds, "methods": {}}
    for name, (mode, make) in gan_methods().items():
        runs = []
        for seed in range(seeds):
            players = game.init(seed)
            t0 = time.perf_counter()
            hist = play(game, players, [make(p.parameters()) for p in players], steps, mode=mode, every=every,
                        callback=lambda s, pl: mode_stats(game, pl[0]))
            with torch.no_grad():
                samples = players[0](game.noise(1000, torch.Generator().manual_seed(123))).tolist()
            runs.append({"seed": seed, "wall_s": time.perf_counter() - t0,
                         "curve": [{"step": h["step"], "modes": h["modes"], "high_quality": h["high_quality"]}
                                   for h in hist], "samples": samples})
        finals = [r["curve"][-1] for r in runs]
        out["methods"][name] = {"mode": mode, "runs": runs,
                                "final_modes": [f["modes"] for f in finals],
                                "final_high_quality": [f["high_quality"] for f in finals]}
    return out


def lyapunov_section(lr: float = 0.5, cm: dict[str, float] | None = None, points: int = 17) -> dict[str, Any]:
    gammas = [round(x, 3) for x in np.linspace(0.0, 0.4, points)]
    dirac = []
    for gm in gammas:
        game = DiracGAN(gamma=gm, start=(1e-4, 1e-4))
        e = lyapunov_exponent(game, lambda ps: [torch.optim.SGD(p.parameters(), lr=lr) for p in ps],
                              steps=200, warmup=20)
        dirac.append({"gamma": gm, "exponent": e, "analytic": math.log(game.spectral_radius(lr))})
    cm = cm or {"lr": 0.22, "beta": 0.75}
    game = BilinearGame(dim=2)
    sv = game.singular_values.tolist()
    phases = [float(x) for x in np.linspace(0.0, math.pi, points + 8)]
    bil = []
    for ph in phases:
        e = lyapunov_exponent(game, lambda ps, ph=ph: [ComplexMomentum(p.parameters(), lr=cm["lr"], beta=cm["beta"],
                                                                        phase=ph) for p in ps], steps=600, warmup=300)
        bil.append({"phase": ph, "exponent": e,
                    "analytic": math.log(linear.spectral_radius("momentum", sv, cm["lr"], cm["beta"], ph))})
    return {"dirac": {"lr": lr, "rows": dirac, "bifurcation_analytic": lr / 4,
                      "bifurcation_measured": sign_changes(gammas, [r["exponent"] for r in dirac]),
                      "bifurcation_linear": sign_changes(gammas, [r["analytic"] for r in dirac])},
            "bilinear": {"lr": cm["lr"], "beta": cm["beta"], "rows": bil,
                         "crossings_measured": sign_changes(phases, [r["exponent"] for r in bil]),
                         "crossings_analytic": sign_changes(phases, [r["analytic"] for r in bil])}}


def ridge_section(dim: int = 5, coupling: float = 0.1, budgets: tuple[int, ...] = (2000, 5000, 10000),
                  seeds: int = 3) -> dict[str, Any]:
    f = SymmetricWells(dim, coupling)
    rows = []
    for b in budgets:
        rr = ridge_rider(f, torch.zeros(dim, dtype=torch.float64), budget=b)
        rs = [random_restarts(f, dim, budget=b, seed=s) for s in range(seeds)]
        rows.append({"budget": b, "ridge_rider": len(distinct(rr["solutions"])), "ridges": rr["ridges"],
                     "rr_solutions": len(rr["solutions"]),
                     "restarts": [len(distinct(r["solutions"])) for r in rs], "restart_runs": [r["runs"] for r in rs]})
    return {"dim": dim, "coupling": coupling, "rows": rows,
            "ridge_rider_wins": all(r["ridge_rider"] > max(r["restarts"]) for r in rows)}


def run_study(out: str | Path, quick: bool = False) -> dict[str, Any]:
    """Every section; ``quick`` shrinks each for the smoke test."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"quick": quick}
    doc["rates"] = rates_section(steps=300 if quick else 1500, coarse=4 if quick else 1)
    save_part("rates", doc["rates"])  # each section is kept (in partial/) if a later one is interrupted
    cm = next(r for r in doc["rates"]["rows"] if r["method"] == "complex momentum (simultaneous)")
    doc["heatmap"] = heatmap_section(cm["lr"], measured_grid=3 if quick else 8, steps=300 if quick else 600,
                                     analytic_grid=8 if quick else 39)
    save_part("heatmap", doc["heatmap"])
    doc["gan"] = gan_section(steps=60 if quick else 3000, seeds=1 if quick else 3, every=30 if quick else 250)
    save_part("gan", doc["gan"])
    doc["lyapunov"] = lyapunov_section(cm={"lr": cm["lr"], "beta": cm["beta"]}, points=5 if quick else 17)
    save_part("lyapunov", doc["lyapunov"])
    doc["ridge"] = ridge_section(budgets=(300,) if quick else (2000, 5000, 10000), seeds=1 if quick else 3)
    save_part("ridge", doc["ridge"])
    doc["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "results.json", json.dumps(finite(doc)))
    atomic_write_text(out / "report.md", report(doc))
    figures(doc, out)
    return doc


def report(doc: dict[str, Any]) -> str:
    r = doc["rates"]
    lines = ["# nestopt study games", "",
             f"Wall time {doc['wall_s']:.0f} s. Reproduce: `nestopt study games --out DIR`.", "",
             f"## Bilinear game: measured per-step contraction vs analytic spectral radius",
             f"dim 2, singular values {r['singular_values']}, {r['steps']} steps in float64; hyperparameters minimise "
             "the analytic radius on the grid; the measured rate is exp(slope) of log distance over the second half.", "",
             "| method | lr | beta | phase | analytic rho | measured | rel. error | final distance |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['lr']:.2f} | {row['beta']:.2f} | {row['phase']:.3f} | {row['rho']:.5f} "
                     f"| {row['measured']:.5f} | {100 * row['rel_err']:.2f}% | {row['final_distance']:.2e} |")
    h = doc["heatmap"]
    lines += ["", f"Heatmap (simultaneous complex momentum, lr {h['lr']:.2f}): largest relative error of measured "
              f"vs analytic rate on the {len(h['measured_mags'])}x{len(h['measured_phases'])} measured grid: "
              f"{100 * (h['max_rel_err'] or float('nan')):.2f}%. Figure `heatmap.png`.", "",
              "## Gaussian-mixture GAN (8 modes), final modes covered and high-quality fraction per seed", "",
              "| method | mode | modes covered | high-quality fraction | wall s/run |", "|---|---|---|---|---|"]
    for name, m in doc["gan"]["methods"].items():
        wall = sum(x["wall_s"] for x in m["runs"]) / len(m["runs"])
        lines.append(f"| {name} | {m['mode']} | {m['final_modes']} | "
                     f"{[round(x, 3) for x in m['final_high_quality']]} | {wall:.1f} |")
    ly = doc["lyapunov"]
    lines += ["", "Figures `gan_curves.png`, `gan_samples.png`.", "", "## Lyapunov exponents", "",
              f"Dirac GAN, simultaneous GD lr {ly['dirac']['lr']}: bifurcation analytic gamma = "
              f"{ly['dirac']['bifurcation_analytic']:.4f}; where the measured exponent changes sign: "
              f"{[round(x, 4) for x in ly['dirac']['bifurcation_measured']]}.",
              f"Bilinear game, complex momentum lr {ly['bilinear']['lr']:.2f} |beta| {ly['bilinear']['beta']:.2f}, "
              f"sweep of the phase: sign changes measured {[round(x, 3) for x in ly['bilinear']['crossings_measured']]}, "
              f"analytic {[round(x, 3) for x in ly['bilinear']['crossings_analytic']]}. Figure `lyapunov.png`.", "",
              "## Ridge Rider vs random restarts (distinct solutions at equal gradient evaluations)", "",
              f"SymmetricWells(dim={doc['ridge']['dim']}, coupling={doc['ridge']['coupling']}); a Hessian costs 2 dim "
              "gradient evaluations.", "",
              "| budget | Ridge Rider distinct | Ridge Rider solutions reached (with repeats) | ridges followed "
              "| random restarts distinct (per seed) |", "|---|---|---|---|---|"]
    for row in doc["ridge"]["rows"]:
        lines.append(f"| {row['budget']} | {row['ridge_rider']} | {row['rr_solutions']} | {row['ridges']} "
                     f"| {row['restarts']} |")
    lines += ["", "Verdict: Ridge Rider " + ("finds more" if doc["ridge"]["ridge_rider_wins"] else
                                            "does NOT find more") +
              " distinct solutions than random restarts at equal compute on this problem.", ""]
    return "\n".join(lines)


def figures(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in doc["rates"]["rows"]:
        ax.semilogy(np.arange(len(row["curve"])) * 10, row["curve"], label=f"{row['method']} (rho {row['rho']:.3f})")
    ax.set_xlabel("step"); ax.set_ylabel("distance to equilibrium"); ax.legend(fontsize=6)
    ax.set_title("bilinear game")
    fig.tight_layout(); atomic_savefig(fig, out / "bilinear.png", dpi=120); plt.close(fig)

    h = doc["heatmap"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    im = axes[0].imshow(np.array(h["rho"]), origin="lower", aspect="auto", vmin=0.95, vmax=1.2,
                        extent=[h["phases"][0], h["phases"][-1], h["mags"][0], h["mags"][-1]], cmap="viridis")
    axes[0].set_title(f"analytic rho, lr {h['lr']:.2f}"); axes[0].set_xlabel("arg beta"); axes[0].set_ylabel("|beta|")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(np.array(h["measured"]), origin="lower", aspect="auto", vmin=0.95, vmax=1.2,
                        extent=[h["measured_phases"][0], h["measured_phases"][-1], h["measured_mags"][0],
                                h["measured_mags"][-1]], cmap="viridis")
    axes[1].set_title("measured rate"); axes[1].set_xlabel("arg beta")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout(); atomic_savefig(fig, out / "heatmap.png", dpi=120); plt.close(fig)

    g = doc["gan"]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in g.items():
        steps = [c["step"] for c in m["runs"][0]["curve"]]
        modes = np.mean([[c["modes"] for c in r["curve"]] for r in m["runs"]], axis=0)
        hq = np.mean([[c["high_quality"] for c in r["curve"]] for r in m["runs"]], axis=0)
        axes[0].plot(steps, modes, label=name); axes[1].plot(steps, hq, label=name)
    axes[0].set_ylabel("modes covered (mean over seeds)"); axes[1].set_ylabel("high-quality fraction")
    for a in axes:
        a.set_xlabel("step")
    axes[1].legend(fontsize=6)
    fig.tight_layout(); atomic_savefig(fig, out / "gan_curves.png", dpi=120); plt.close(fig)

    centers = MixtureGAN().centers.numpy()
    fig, axes = plt.subplots(1, len(g), figsize=(2.4 * len(g), 2.6))
    for a, (name, m) in zip(np.atleast_1d(axes), g.items()):
        s = np.array(m["runs"][0]["samples"])
        a.scatter(s[:, 0], s[:, 1], s=1, alpha=0.4)
        a.scatter(centers[:, 0], centers[:, 1], s=10, c="red", marker="x")
        a.set_xlim(-3, 3); a.set_ylim(-3, 3); a.set_title(name, fontsize=6); a.set_xticks([]); a.set_yticks([])
    fig.tight_layout(); atomic_savefig(fig, out / "gan_samples.png", dpi=120); plt.close(fig)

    ly = doc["lyapunov"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    d = ly["dirac"]["rows"]
    axes[0].plot([r["gamma"] for r in d], [r["exponent"] for r in d], "o-", label="measured")
    axes[0].plot([r["gamma"] for r in d], [r["analytic"] for r in d], "--", label="log rho (linearised)")
    axes[0].axhline(0, c="k", lw=0.5); axes[0].axvline(ly["dirac"]["bifurcation_analytic"], c="r", lw=0.5)
    axes[0].set_xlabel("gradient penalty gamma"); axes[0].set_title("Dirac GAN"); axes[0].legend()
    b = ly["bilinear"]["rows"]
    axes[1].plot([r["phase"] for r in b], [r["exponent"] for r in b], "o-", label="measured")
    axes[1].plot([r["phase"] for r in b], [r["analytic"] for r in b], "--", label="log rho (analytic)")
    axes[1].axhline(0, c="k", lw=0.5); axes[1].set_xlabel("arg beta"); axes[1].set_title("bilinear, complex momentum")
    axes[1].legend()
    fig.tight_layout(); atomic_savefig(fig, out / "lyapunov.png", dpi=120); plt.close(fig)

    rr = doc["ridge"]["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["budget"] for r in rr], [r["ridge_rider"] for r in rr], "o-", label="Ridge Rider")
    ax.plot([r["budget"] for r in rr], [np.mean(r["restarts"]) for r in rr], "s-", label="random restarts (mean)")
    ax.set_xlabel("gradient evaluations"); ax.set_ylabel("distinct solutions"); ax.legend()
    fig.tight_layout(); atomic_savefig(fig, out / "ridge_rider.png", dpi=120); plt.close(fig)
