"""The studies ``nestopt study NAME`` runs: one :class:`Study` record each.

A record names the study, says in a line what it tests, lists the command-line options it takes
(:class:`Option`), and carries three callables: ``prepare(out, **options)`` (optional: turns the
options into ``run``'s keyword arguments; a ``ValueError`` is a usage error, its message the line
the CLI prints), ``run(out, **options) -> result`` (writes the study's files into ``out`` and
returns its results, verdicts included) and ``summary(result) -> lines`` (what the CLI prints).
Nothing here imports a study until its record is used: the CLI builds its parser from the records.

    >>> from nestopt.studies import registry
    >>> registry.names()[:2]
    ['polyak', 'large-lr']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Option:
    """One command-line option of a study: ``--flag VALUE``, or repeated (``repeat``) into a tuple.
    ``default`` is the value the study runs with when the option is not given."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    repeat: bool = False
    metavar: str | None = None
    switch: bool = False  # ``--flag`` alone, no value (``True`` when given)

    @property
    def dest(self) -> str:
        """The keyword the option's value goes by (``--peer`` -> ``peer``)."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Study:
    """A study as ``nestopt study`` runs it (see the module's docstring)."""

    name: str
    help: str
    run: Callable[..., Result]
    summary: Callable[[Result], list[str]]
    options: tuple[Option, ...] = ()
    prepare: Callable[..., dict[str, Any]] | None = None
    files: tuple[str, ...] = ("report.md", "results.json")
    figures: bool = True

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(o.flag for o in self.options)

    def wrote(self, out: Path) -> str:
        """The files the study writes into ``out``, as one phrase."""
        return join([str(out / f) for f in self.files] + (["figures"] if self.figures else []))


def join(items: Sequence[str], last: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


_STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add ``study``; a ``ValueError`` if its name is taken."""
    if study.name in _STUDIES:
        raise ValueError(f"name={study.name!r} is invalid: a study of that name is already registered")
    _STUDIES[study.name] = study
    return study


def names() -> list[str]:
    """The registered studies' names, in registration order."""
    return list(_STUDIES)


def records() -> list[Study]:
    return list(_STUDIES.values())


def get(name: str) -> Study:
    """The record called ``name``; ``KeyError`` lists the valid names."""
    if name not in _STUDIES:
        raise KeyError(f"unknown study {name!r}; valid names: {', '.join(_STUDIES)}")
    return _STUDIES[name]


# -- the studies --------------------------------------------------------------------------------

def _polyak(out: Path) -> Result:
    from .polyak import run_study

    return run_study(out)


def _polyak_summary(doc: Result) -> list[str]:
    lines = [f"{key}  {it['verdict']:10s} {it['claim']}" for key, items in doc["verdicts"].items() for it in items]
    gates = doc.get("logic_gates", {}).get("verdicts", [])
    return lines + [f"gates {it['key']:7s} {it['verdict']:10s} {it['claim']}" for it in gates]


def _large_lr(out: Path) -> Result:
    from .large_lr import run_study

    return run_study(out)


def _large_lr_summary(doc: Result) -> list[str]:
    return [f"{it['arm']:9s}  {it['verdict']:13s} {it['claim']}" for it in doc["verdicts"]]


def _controller(out: Path) -> Result:
    from .controller import run_study

    return run_study(out)


def _controller_summary(doc: Result) -> list[str]:
    return [f"robust rates  {label:18s} {m['robust']}/{m['cells']}" for label, m in doc["robustness"].items()] + \
        [f"{r['what']:28s} {r['verdict']:16s} wins {r['wins']} losses {r['losses']} of {r['pairs']}"
         for r in doc["ablations"]]


def _variants_prepare(out: Path, variant: tuple[str, ...], seeds: int) -> dict[str, Any]:
    from .controller import VARIANTS, check_variants

    variants = tuple(variant) or tuple(VARIANTS)
    try:
        check_variants(variants, seeds)
    except ValueError as e:
        raise ValueError(f"--{e}") from None  # the message starts with the option's name
    return {"variants": variants, "seeds": seeds}


def _variants(out: Path, variants: tuple[str, ...], seeds: int) -> Result:
    from .controller import run_variants

    return run_variants(out, variants=variants, seeds=seeds)


def _variants_summary(doc: Result) -> list[str]:
    return [f"robust rates  {label:28s} {m['robust']}/{m['cells']}" for label, m in doc["robustness"].items()]


def _learned_prepare(out: Path, net: tuple[str, ...], peer: tuple[str, ...]) -> dict[str, Any]:
    """``--net LABEL=PATH`` arguments, plus the shipped networks and, as the reference for what
    meta-training bought, the same network untrained (written to ``out``); then the ``--peer NAME``
    arguments: registry optimizers that are installed."""
    from ..bench import registry as opt_registry
    from ..meta import HybridAdamNet
    from ..nets import SHIPPED_NETS, load_net, save_net
    from .learned import PEER

    from .._io import atomic_path

    extra: dict[str, str] = {}
    for item in net:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--net {item!r} is invalid: expected LABEL=PATH")
        load_net(path)  # a ValueError that names the problem
        extra[label] = path
    known = opt_registry.names(available_only=False)
    for name in peer:
        if name not in known:
            raise ValueError(f"--peer {name!r} is invalid: expected one of {', '.join(known)}")
        spec = opt_registry.get(name)
        if not spec.available():
            raise ValueError(f"--peer {name!r} needs the package {spec.requires!r}: pip install 'nestopt[peers]'")
        extra[f"{name} (defaults)"] = PEER + name
    untrained = out / "untrained.safetensors"  # written once the arguments are known to be good
    with atomic_path(untrained) as tmp:
        save_net(HybridAdamNet(), tmp)
    nets = {"shipped default (linear)": str(SHIPPED_NETS["default"]), "shipped MLP (net='mlp')": str(SHIPPED_NETS["mlp"]),
            "hybrid, untrained (Adam 1e-3)": str(untrained), **extra}
    return {"nets": nets}


def _learned(out: Path, nets: dict[str, str]) -> Result:
    from .learned import run_study

    return run_study(out, nets=nets)


def _learned_summary(doc: Result) -> list[str]:
    return [f"{r['name'][:44]:44s} {r['steps']:5d} {r['net'][:22]:22s} speedup {r['speedup']:.2f} "
            f"reached {r['reached']}/{r['seeds']} diverged {r['diverged']}" for r in doc["rows"] + doc["long"]]


def _hpo(out: Path) -> Result:
    from .hpo import run_study

    return run_study(out)


def _hpo_summary(doc: Result) -> list[str]:
    return [f"seed {r['seed']}: TPE test acc {r['tpe']['test_acc']:.4f} in {r['tpe']['wall_s']:.1f} s; "
            f"per-weight implicit {r['implicit']['test_acc']:.4f} in {r['implicit']['wall_s']:.1f} s"
            for r in doc["hpo"]["rows"]]


def _games(out: Path) -> Result:
    from .games import run_study

    return run_study(out)


def _games_summary(doc: Result) -> list[str]:
    return [f"{r['method'][:46]:46s} analytic rho {r['rho']:.5f} measured {r['measured']:.5f} "
            f"({100 * r['rel_err']:.2f}%)" for r in doc["rates"]["rows"]] + \
        [f"GAN {name[:32]:32s} modes {m['final_modes']} high-quality {[round(x, 3) for x in m['final_high_quality']]}"
         for name, m in doc["gan"]["methods"].items()]


def _days(flag: str, text: str) -> tuple[int, int]:
    lo, colon, hi = text.partition(":")
    if not (colon and lo.isdigit() and hi.isdigit() and int(hi) > int(lo)):
        raise ValueError(f"{flag} {text!r} is invalid: expected LO:HI with 0 <= LO < HI, e.g. 0:60")
    return int(lo), int(hi)


def _refit_prepare(out: Path, quick: bool, family: str | None, cache: str | None, seeds: int | None,
                   train_days: str | None, eval_days: str | None) -> dict[str, Any]:
    from .. import tasks as task_registry
    from .refit import Plan

    kw: dict[str, Any] = {}
    if family is not None:
        try:
            task_registry.family(family)
        except KeyError as e:
            raise ValueError(f"--family {family!r} is invalid: {e.args[0] if e.args else e}") from None
        if "@" in family:
            raise ValueError(f"--family {family!r} is invalid: give the days with --train-days and --eval-days")
        kw["family"] = family
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds {seeds} is invalid: must be a positive integer")
        kw["seeds"] = seeds
    for flag, text, key in (("--train-days", train_days, "train_days"), ("--eval-days", eval_days, "eval_days")):
        if text is not None:
            kw[key] = _days(flag, text)
    plan = Plan.quick(**kw) if quick else Plan(**kw)
    if plan.train_days[1] > plan.eval_days[0]:
        raise ValueError(f"--eval-days {plan.eval_days[0]}:{plan.eval_days[1]} is invalid: evaluation days must come "
                         f"after the meta-training days ({plan.train_days[0]}:{plan.train_days[1]})")
    if plan.train_days[1] - plan.train_days[0] < 2:
        raise ValueError(f"--train-days {plan.train_days[0]}:{plan.train_days[1]} is invalid: needs at least 2 days")
    days = getattr(task_registry.family(plan.family), "days", None)
    if isinstance(days, range):
        for flag, (lo, hi) in (("--train-days", plan.train_days), ("--eval-days", plan.eval_days)):
            if lo < days.start or hi > days.stop:
                raise ValueError(f"{flag} {lo}:{hi} is invalid: family {plan.family!r} has days {days.start}:{days.stop}")
    return {"plan": plan, "cache": cache}


def _refit(out: Path, plan: Any, cache: str | None) -> Result:
    from .refit import run_study

    return run_study(out, plan=plan, cache=cache)


def _refit_summary(doc: Result) -> list[str]:
    rows = [f"{r['strategy']:24s} speedup {r['speedup']:.2f} ({r['speedup_ci90'][0]:.2f}-{r['speedup_ci90'][1]:.2f})  "
            f"val loss {r['val_loss']:.4f}  PnL {r['pnl_total']:.0f} bp" for r in doc["rows"]]
    return rows + [f"claim 50-200% faster: {c['strategy']} {c['verdict']}" for c in doc["claim"]]


def _stopping(out: Path, quick: bool) -> Result:
    from .stopping import Plan, run_study

    return run_study(out, Plan.quick_plan() if quick else Plan())


def _stopping_summary(doc: Result) -> list[str]:
    return [f"price d={r['d']} S0={r['s0']}: {r['price']:.3f} ± {r['se']:.3f} (reference {r['reference']:.3f}, "
            f"{100 * r['rel_err']:+.2f}%)" for r in doc["prices"]] + \
        [f"{v['key']:8s} {v['verdict']:13s} {v['claim']}" for v in doc["verdicts"]]


register(Study("polyak", "the Polyak note's experiments 1-5: a verdict per expected claim", _polyak, _polyak_summary))
register(Study("large-lr", "do large learning rates buy robustness to a spurious cue and compressibility?",
               _large_lr, _large_lr_summary))
register(Study("controller", "which controller ideas pay off: robustness, ablations, per-head feedback, cost",
               _controller, _controller_summary))
register(Study("controller-variants", "the nested optimizer's hindsight variants: robustness to the base rate",
               _variants, _variants_summary,
               options=(Option("--variant", "run only this variant (repeatable; default: all)", default=(), repeat=True,
                               metavar="NAME"),
                        Option("--seeds", "seeds per task and rate (default 3)", type=int, default=3)),
               prepare=_variants_prepare, files=("variants.md", "variants.json"), figures=False))
register(Study("learned", "do meta-trained update networks generalise to held-out tasks and a 10x horizon?",
               _learned, _learned_summary,
               options=(Option("--net", "also evaluate this network file (repeatable)", default=(), repeat=True,
                               metavar="LABEL=PATH"),
                        Option("--peer", "also run this registry optimizer untuned at its default rate (repeatable)",
                               default=(), repeat=True, metavar="NAME")),
               prepare=_learned_prepare))
register(Study("hpo", "hypergradients: exactness, cost, per-weight decay vs TPE, distillation, STN, leaks",
               _hpo, _hpo_summary))
register(Study("games", "complex momentum on the bilinear game and a GAN, Lyapunov exponents, Ridge Rider",
               _games, _games_summary))
register(Study("refit", "daily refits of one walk-forward market: learned and nested optimizers against tuned AdamW",
               _refit, _refit_summary,
               options=(Option("--quick", "a smoke test of every part (2 days, 1 seed, 30 steps)", switch=True),
                        Option("--family", "the task family, a registered name or module:Class (default "
                               "trading-daily)", metavar="NAME"),
                        Option("--cache", "keep the meta-trained networks in this folder and reuse them",
                               metavar="DIR"),
                        Option("--seeds", "seeds per task and rate (default 3)", type=int),
                        Option("--train-days", "the past days for meta-training and tuning (default 0:60)",
                               metavar="LO:HI"),
                        Option("--eval-days", "the evaluation days (default 60:90)", metavar="LO:HI")),
               prepare=_refit_prepare))
register(Study("stopping", "deep optimal stopping against the paper's prices; BEMA, JAL and the note's five claims",
               _stopping, _stopping_summary,
               options=(Option("--quick", "a smoke test of every part (one price, two rates, one seed, 30 steps)",
                               switch=True),)))
