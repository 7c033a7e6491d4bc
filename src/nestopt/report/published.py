"""The results the documentation cites: one :class:`Published` record per command.

A record names the command that writes the result (``{out}`` stands for its output folder), whether
it is cheap enough to rerun in CI (``cheap``: a few minutes on 2 cores) or only checked against
the code it measured (``expensive``), the modules it runs (for the code hash), what of its output
is kept under ``docs/results/KEY/``, and how a rerun is compared with the stored result:

- every leaf of the JSON compares exactly (integers, strings, verdicts, steps), floats to a
  relative ``1e-6``;
- ``times``: JSON paths (``fnmatch`` patterns over ``a/b/0/c``) of measured times, which compare
  within a factor (:data:`TIME_FACTOR`), since machines differ;
- ``ignore``: paths that are not compared at all (values computed from times, dates, the
  machine's description);
- ``drop``: paths removed before a result is stored (per-step curves that only the figures need).

    >>> get("polyak").command("polyak-study")
    'nestopt study polyak --out polyak-study'
"""

from __future__ import annotations

from dataclasses import dataclass

CHEAP, EXPENSIVE = "cheap", "expensive"
TIME_FACTOR = 5.0  # a rerun's time may be this many times faster or slower than the stored one
TIME_FLOOR_S = 0.05  # times both below this are timer noise and not compared
_TIMES = ("wall_s", "seconds", "wall_seconds", "total_seconds")  # a whole run's time: compared within the factor
# Per-run and per-part times, and what is computed from them: timer noise on a busy machine moves
# them by more than any factor worth stating, so they are not compared (the whole run's time is).
_TIMED = ("*/wall_s", "*_s", "*seconds", "*_ms", "*ms_per_step*", "*time_to_target*", "*/ms", "*x_step")


@dataclass(frozen=True)
class Published:
    key: str
    argv: tuple[str, ...]
    cost: str
    entries: tuple[str, ...]
    about: str
    files: tuple[str, ...] = ()  # further files of src/ that decide the result (hashed, not followed)
    repo_files: tuple[str, ...] = ()  # globs under the repository root that decide it too (tools, tests)
    keep: tuple[str, ...] = ("results.json", "*.png")
    result: str = "results.json"
    drop: tuple[str, ...] = ()
    times: tuple[str, ...] = _TIMES
    ignore: tuple[str, ...] = ()  # besides the per-run times of _TIMED, which are never compared
    needs: tuple[str, ...] = ()  # distributions the command needs (pip extras), for the error

    native: bool = False  # on the machine's own numerics, to show what the pinning hides

    @property
    def pinned(self) -> bool:
        """A cheap result runs with its numerics pinned (``store.PINNED_ENV``): the check reruns it on
        whatever machine CI has, and must get the same bits. An expensive one measures the machine
        as it is (its speed, its own kernels)."""
        return self.cost == CHEAP and not self.native

    @property
    def script(self) -> bool:
        """A repository script run by Python (``python tools/audit.py ...``) rather than ``nestopt``."""
        return self.argv[:1] == ("python",)

    @property
    def not_compared(self) -> tuple[str, ...]:
        return (*self.ignore, *(p for p in _TIMED if p not in self.times))

    @property
    def hashed(self) -> tuple[str, ...]:
        """The files hashed beside the closure: the record's own, and the command line, which parses
        the options and decides some defaults (the bench's optimizers: those installed)."""
        return self.files if self.script else (*CLI_FILES, *self.files)

    def command(self, out: str = "OUT") -> str:
        argv = [a.replace("{out}", out) for a in self.argv]
        return " ".join(argv if self.script else ["nestopt", *argv])


_STUDY_FILES = ("nestopt/studies/registry.py",)
_BENCH_IGNORE = ("created", "environment/*", "summary/ratios/time/*", "summary/scores/time/*", "summary/profile/time/*",
                 "summary/profile/tau/*")
_BENCH_DROP = ("runs/*/curve",)

RECORDS: dict[str, Published] = {}


def _add(rec: Published) -> None:
    RECORDS[rec.key] = rec


_add(Published("polyak", ("study", "polyak", "--out", "{out}"), CHEAP, ("nestopt.studies.polyak",),
               "the Polyak note's five experiments", files=_STUDY_FILES, drop=("runs/*/loss", "runs/*/params", "runs/*/eta",
                                                                            "runs/*/grad_ratio", "runs/*/trajectory",
                                                                            "logic_gates/runs/*/loss",
                                                                            "logic_gates/control/runs/*/loss")))
_add(Published("large-lr", ("study", "large-lr", "--out", "{out}"), CHEAP, ("nestopt.studies.large_lr",),
               "the large-learning-rate claims on a spurious-cue task", files=_STUDY_FILES,
               ignore=("diagnostics_overhead",)))
_add(Published("stopping", ("study", "stopping", "--out", "{out}"), CHEAP, ("nestopt.studies.stopping",),
               "deep optimal stopping against the paper's prices; BEMA, JAL and the note's five claims",
               files=_STUDY_FILES, drop=("rates/runs/*/curve",)))
# The command line: the parser and the argument checks every command goes through.
CLI_FILES = ("nestopt/cli.py", "nestopt/_cli_args.py", "nestopt/commands/__init__.py", "nestopt/commands/bench.py")
_LEARNED_PEERS = ("--peer", "muon", "--peer", "prodigy", "--peer", "schedulefree-adamw")
_add(Published("learned", ("study", "learned", *_LEARNED_PEERS, "--out", "{out}"), CHEAP,
               ("nestopt.studies.learned", "nestopt.meta", "nestopt.nets"),
               "the shipped update networks on held-out tasks and a 10x horizon", files=_STUDY_FILES,
               ignore=("nets/*",)))
_add(Published("learned-native", ("study", "learned", *_LEARNED_PEERS, "--out", "{out}"), EXPENSIVE,
               ("nestopt.studies.learned", "nestopt.meta", "nestopt.nets"),
               "the same study on the machine's own numerics (not pinned): how much rounding moves it",
               files=_STUDY_FILES, ignore=("nets/*",), native=True))
_add(Published("bench-quick", ("bench", "--suite", "quick", "--out", "{out}"), CHEAP, ("nestopt.bench",),
               "the quick benchmark suite (README command 1)", drop=_BENCH_DROP, ignore=_BENCH_IGNORE))
_add(Published("bench-full", ("bench", "--suite", "full", "--out", "{out}"), EXPENSIVE, ("nestopt.bench",),
               "the full benchmark suite", drop=_BENCH_DROP, ignore=_BENCH_IGNORE))
_add(Published("controller", ("study", "controller", "--out", "{out}"), EXPENSIVE, ("nestopt.studies.controller",),
               "the nested optimizer's controller: robustness, ablations, per-head feedback, cost", files=_STUDY_FILES))
_add(Published("controller-variants", ("study", "controller-variants", "--out", "{out}"), EXPENSIVE,
               ("nestopt.studies.controller",), "the nested optimizer's hindsight variants", files=_STUDY_FILES,
               result="variants.json", keep=("variants.json",)))
_add(Published("hpo", ("study", "hpo", "--out", "{out}"), EXPENSIVE, ("nestopt.studies.hpo",),
               "hypergradients: exactness, cost against TorchOpt, per-weight decay against TPE", files=_STUDY_FILES,
               needs=("optuna", "torchopt")))
_add(Published("games", ("study", "games", "--out", "{out}"), EXPENSIVE, ("nestopt.studies.games",),
               "complex momentum, the GAN, Lyapunov exponents, Ridge Rider", files=_STUDY_FILES))
_add(Published("refit", ("study", "refit", "--out", "{out}"), EXPENSIVE, ("nestopt.studies.refit",),
               "daily refits of one walk-forward market: learned and nested optimizers against tuned AdamW",
               files=_STUDY_FILES, drop=("records/*/curve", "tuning/*"), ignore=("learned/path", "controllers/*/path")))
_add(Published("overhead", ("overhead", "--json", "{out}/overhead.json"), EXPENSIVE, ("nestopt.bench.overhead",),
               "step cost on a synthetic 10M-parameter model", result="overhead.json", keep=("overhead.json",),
               ignore=("*",)))


_add(Published("collectives", ("overhead", "--processes", "2", "--rounds", "5", "--steps", "20", "--json",
                               "{out}/collectives.json"), EXPENSIVE,
               ("nestopt.bench.collectives", "nestopt.optim"), "the collectives' cost at 2 processes",
               result="collectives.json", keep=("collectives.json",), ignore=("*",)))


_EVERYTHING = ("nestopt.cli", "nestopt.optim", "nestopt.hyper", "nestopt.schedule", "nestopt.guards", "nestopt.diagnostics",
               "nestopt.games", "nestopt.meta", "nestopt.tasks", "nestopt.nets", "nestopt.bench")
_add(Published("audit", ("python", "tools/audit.py", "-q", "--json", "{out}/audit.json"), CHEAP, _EVERYTHING,
               "the audit of bad inputs: a clear error for each", repo_files=("tools/audit.py",), result="audit.json",
               keep=("audit.json",), ignore=("nestopt", "cases/*/detail", "cases/*/origin")))
_add(Published("mutation", ("python", "tools/mutate.py", "--sample", "80", "--seed", "0", "--jobs", "2", "--json",
                            "{out}/mutants.json"), EXPENSIVE, ("nestopt.optim", "nestopt.hyper"),
               "mutation testing of the optimizers and hypergradients", repo_files=("tools/mutate.py", "tests/*.py"),
               result="mutants.json", keep=("mutants.json",), drop=("mutants/*/detail", "baseline"),
               ignore=("argv", "preflight")))


def keys(cost: str | None = None) -> list[str]:
    """The records' keys, in order; only those of ``cost`` when given."""
    return [k for k, r in RECORDS.items() if cost is None or r.cost == cost]


def get(key: str) -> Published:
    if key not in RECORDS:
        raise KeyError(f"unknown result {key!r}; valid keys: {', '.join(RECORDS)}")
    return RECORDS[key]
