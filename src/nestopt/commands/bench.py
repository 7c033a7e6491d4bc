"""``nestopt bench`` (run a suite) and ``nestopt figures`` (draw a finished bench's figures again).

    nestopt bench --suite quick|full [--tasks T,..] [--optimizers O,..] [--seeds N] [--steps N]
                  [--workers N] [--highlight NAME,..] [--label N] --out DIR [--force]
    nestopt figures DIR [--highlight NAME,..] [--label N] [--out DIR2]

``--highlight`` draws the named entries (``muon-tuned``) or optimizers (``muon``: its tuned and
default entries) in their colours and every other entry in light grey; ``--label N`` labels the
best ``N`` entries at their lines' ends in the performance profile (default 5).

``torchrun --nproc_per_node N -m nestopt bench ...`` splits the runs over the ranks (each over its
own ``--workers``, by default its share of the machine's cores); rank 0 checks ``--out``, shows the
progress and writes the one ``results.json``, report and figures, the other ranks write nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import _ranks
from .._cli_args import EXIT_INTERRUPTED, FORCE_HELP, MAX_SEEDS, UsageError, _int, _interrupted, _names, _out, _positive

LABEL_DEFAULT = 5


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="time-to-target benchmark against tuned baselines")
    b.add_argument("--suite", default="quick", help="quick (minutes) or full (all tasks, 3 seeds)")
    b.add_argument("--tasks", help="comma-separated task names (default: the suite's)")
    b.add_argument("--optimizers", help="comma-separated optimizer names (default: the suite's: every installed "
                   "optimizer, less the full suite's costly ones in the quick suite and those run only when named)")
    b.add_argument("--seeds", type=_int, help="seeds per configuration (default: the suite's)")
    b.add_argument("--steps", type=_int, help="step budget for every task (default: each task's own)")
    b.add_argument("--workers", type=_int, help="worker processes (default: one per core)")
    b.add_argument("--out", required=True, help="output folder for results.json, report.md and figures")
    b.add_argument("--log-dir", help="also write TensorBoard event files here (curves, figures); needs tensorboard")
    b.add_argument("--force", action="store_true", help=FORCE_HELP)
    _figure_flags(b)
    f = sub.add_parser("figures", help="draw a finished bench's figures again, e.g. with --highlight")
    f.add_argument("results", help="a bench's output folder (or its results.json)")
    _figure_flags(f)
    f.add_argument("--out", help="where to write the figures (default: beside the results); the results stay as they are")


def _figure_flags(p: Any) -> None:
    p.add_argument("--highlight", help="comma-separated entries or optimizers to draw in colour, the rest in grey")
    p.add_argument("--label", type=_int, default=LABEL_DEFAULT,
                   help=f"label the best N entries at their lines' ends (default {LABEL_DEFAULT})")


def _check_highlight(names: list[str], optimizers: list[str]) -> None:
    """Before a long run: each highlighted name is an entry this run reports, or an optimizer of it."""
    from ..bench.figstyle import resolve_highlight
    from ..bench.scoring import planned_entries

    entries = planned_entries(optimizers)
    for n in names:
        try:
            resolve_highlight(n, entries)
        except ValueError:
            raise UsageError(f"--highlight {n!r} is invalid: expected an entry of this run or its optimizer's "
                             f"name; the entries: {', '.join(entries)}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import tasks as task_registry
    from ..bench import registry as opt_registry
    from ..bench import run_bench, suite
    from ..bench.runner import WorkerError

    try:
        s = suite(args.suite)
    except KeyError as e:
        raise UsageError(str(e.args[0]))
    tasks = _names(args.tasks, "--tasks", "task", task_registry.names()) or list(s.tasks)
    optimizers = _names(args.optimizers, "--optimizers", "optimizer", opt_registry.names()) or s.optimizers()
    seeds = s.seeds if args.seeds is None else args.seeds
    for t in tasks:
        if t not in task_registry.names():
            raise UsageError(f"unknown task {t!r}; valid names: {', '.join(task_registry.names())}")
    for o in optimizers:
        if o not in opt_registry.names():
            known = opt_registry.names(available_only=False)
            hint = " (installed? pip install 'nestopt[peers]')" if o in known else ""
            raise UsageError(f"unknown optimizer {o!r}{hint}; valid names: {', '.join(opt_registry.names())}")
    _positive("--seeds", seeds)
    if seeds > MAX_SEEDS:  # the plan holds every job: a huge count would fill the memory first
        raise UsageError(f"--seeds {seeds} is invalid: at most {MAX_SEEDS}")
    _positive("--steps", args.steps)
    _positive("--workers", args.workers)
    _positive("--label", args.label)
    highlight = _names(args.highlight, "--highlight", "entry")
    if highlight:
        _check_highlight(highlight, optimizers)
    ranked, main = _ranks.is_distributed(), _ranks.is_main()
    # rank 0 checks --out (the others may not see its file system) and tells the others what it found
    found: tuple[str, str] = ("ok", "")
    if main:
        try:
            found = ("ok", str(_out(args.out, force=args.force)))
        except UsageError as e:
            found = ("error", str(e))
    found = _ranks.broadcast(found)
    if found[0] == "error":
        raise UsageError(found[1])
    workers = args.workers
    if ranked and workers is None:  # the machine's cores, shared by the ranks on it
        from ..bench.runner import default_workers

        workers = max(1, default_workers() // _ranks.local_world_size())
    if not main:
        return _bench_rank(tasks, optimizers, seeds, args.steps, s.grid_stride, workers)
    out = Path(found[1])

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    t0 = time.perf_counter()
    state = {"diverged": 0, "done": 0, "total": 0}
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False, disable=not live)
    suite_label = args.suite if not (args.tasks or args.optimizers or args.seeds or args.steps) \
        else f"custom ({args.suite} defaults)"
    had_result = (out / "results.json").is_file()
    with progress:
        bar = progress.add_task(suite_label, total=None)

        def on_start(n: int) -> None:
            state["total"] = n
            progress.update(bar, total=n)
            if not live:
                spread = f"{_ranks.world_size()} ranks of " if ranked else ""
                print(f"bench: {n} runs on {spread}{workers or 'all'} worker(s)", file=sys.stderr, flush=True)

        def on_done(rec: dict) -> None:
            state["diverged"] += rec["diverged"]
            state["done"] += 1
            progress.update(bar, advance=1, description=f"{rec['task']} / {rec['optimizer']} (diverged runs: {state['diverged']})")
            if not live and state["done"] % max(1, state["total"] // 10) == 0:
                # no live bar in a log file: a plain line every tenth of the way instead
                print(f"bench: {state['done']}/{state['total']} runs, {time.perf_counter() - t0:.0f} s, "
                      f"diverged runs so far: {state['diverged']}", file=sys.stderr, flush=True)

        try:
            doc = run_bench(tasks=tasks, optimizers=optimizers, seeds=seeds, out=out, steps=args.steps,
                            workers=workers, grid_stride=s.grid_stride, suite_name=suite_label,
                            on_start=on_start, on_done=on_done, highlight=highlight, top_k=args.label)
        except WorkerError as e:
            print(f"nestopt: error: {e}", file=sys.stderr)
            return 1
    wall = time.perf_counter() - t0
    if not doc["complete"]:
        kept = f"; the complete result in {out} is as it was" if had_result else ""
        if not doc["runs"]:
            return _interrupted(f"no run had finished, nothing was written{kept}")
        return _interrupted(f"the {len(doc['runs'])} of {state['total']} runs that finished are in "
                            f"{out / 'partial'}{kept}")
    scores = doc["summary"]["scores"]["time"]
    best = sorted(scores.items(), key=lambda kv: -kv[1])
    console.print(f"{len(doc['runs'])} runs in {wall:.1f} s; wrote {out / 'results.json'}, {out / 'report.md'} and figures")
    if args.log_dir is not None:
        from ..integrations import logdir

        logdir.bench(args.log_dir, doc["runs"], out.glob("*.png"))
        console.print(f"  TensorBoard event files in {args.log_dir}")
    for name, sc in best:
        console.print(f"  {name:24s} score {sc:.3f}")
    return 0


def _bench_rank(tasks: list[str], optimizers: list[str], seeds: int, steps: int | None, grid_stride: int,
                workers: int | None) -> int:
    """A rank other than 0 under torchrun: run its share of the runs rank 0's ``run_bench`` plans
    (the same plan), hand the records over, and write nothing."""
    from ..bench import plan
    from ..bench.runner import WorkerError, run_jobs

    jobs = plan(tasks, optimizers, seeds, steps, grid_stride)
    try:
        _, interrupted = run_jobs(jobs, workers=min(workers, len(jobs)) if workers else workers)
    except WorkerError as e:
        print(f"nestopt: error (rank {_ranks.rank()}): {e}", file=sys.stderr)
        return 1
    return EXIT_INTERRUPTED if interrupted else 0


def cmd_figures(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench.report import redraw

    _positive("--label", args.label)
    highlight = _names(args.highlight, "--highlight", "entry")
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {args.out!r} is invalid: it is a file, expected a folder")
    try:
        names = redraw(args.results, args.out, highlight, top_k=args.label)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    where = args.out or (Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent)
    print(f"wrote {len(names)} figures to {where}")
    return 0
