"""The ``nestopt`` command line.

    nestopt bench --suite quick|full [--tasks T,..] [--optimizers O,..] [--seeds N] [--steps N]
                  [--workers N] --out DIR
    nestopt study polyak|large-lr|controller|controller-variants|learned|hpo|games --out DIR [--net LABEL=PATH ...] [--peer NAME ...]
                  [--variant NAME ... --seeds N]   (controller-variants)
    nestopt meta-train [--net hybrid|mlp|mlp-seed|linear|lstm|attention|controller] [--method tbptt|es|pes|surrogate] [--steps N]
                       [--unroll N] [--horizon N] [--pairs N] [--sigma S] [--workers N]
                       [--families F,..] [--seed N] [--resume] --out DIR
    nestopt tasks
    nestopt optimizers
    nestopt overhead [--params 10M] [--optimizers O,..] [--steps N] [--rounds N] [--device cpu|cuda]

Bad input prints one line naming the problem (and the valid names) and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: usage line + exit 2
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _count(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a number such as 10M, 500k or 1e6")
    return int(n)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestopt", description="Nested and learned optimization for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="time-to-target benchmark against tuned baselines")
    b.add_argument("--suite", default="quick", help="quick (minutes) or full (all tasks, 3 seeds)")
    b.add_argument("--tasks", help="comma-separated task names (default: the suite's)")
    b.add_argument("--optimizers", help="comma-separated optimizer names (default: all available)")
    b.add_argument("--seeds", type=_int, help="seeds per configuration (default: the suite's)")
    b.add_argument("--steps", type=_int, help="step budget for every task (default: each task's own)")
    b.add_argument("--workers", type=_int, help="worker processes (default: one per core)")
    b.add_argument("--out", required=True, help="output folder for results.json, report.md and figures")

    _study_parser(sub)
    sub.add_parser("tasks", help="list the registered tasks, task families and games")
    sub.add_parser("optimizers", help="list the registered optimizers")

    m = sub.add_parser("meta-train", help="meta-train an update network for LearnedOptimizer")
    m.add_argument("--net", default="hybrid",
                   help="hybrid (default), mlp, mlp-seed, linear, lstm, attention, or controller (the nested optimizer's, "
                        "with --method es or pes; its runs draw AdamW rates from 1e-4 to 1)")
    m.add_argument("--method", default="tbptt",
                   help="tbptt (default), es (antithetic evolution strategies), pes (persistent ES: unbiased over "
                        "the whole inner run) or surrogate (the note's baseline)")
    m.add_argument("--pairs", type=_int, default=8, help="antithetic pairs per ES/PES estimate (default 8)")
    m.add_argument("--sigma", type=float, default=0.01, help="ES/PES perturbation scale (default 0.01)")
    m.add_argument("--workers", type=_int, default=1,
                   help="processes for the ES/PES unrolls (default 1; the result does not depend on it)")
    m.add_argument("--out", required=True, help="output folder: net.safetensors, checkpoint.pt, history.json")
    m.add_argument("--steps", type=_int, default=3000, help="outer steps (default 3000)")
    m.add_argument("--unroll", type=_int, default=20, help="inner steps per truncation (default 20)")
    m.add_argument("--horizon", type=_int, default=200, help="inner steps per task (default 200)")
    m.add_argument("--families", default="quadratic,teacher-mlp", help="task families to meta-train on")
    m.add_argument("--seed", type=_int, default=0)
    m.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")

    o = sub.add_parser("overhead", help="optimizer step time and memory vs torch AdamW(fused) and SGD(foreach)")
    o.add_argument("--params", type=_count, default=10_000_000, help="parameter count, e.g. 10M (default)")
    o.add_argument("--optimizers", help="comma-separated optimizer names (default: all available)")
    o.add_argument("--steps", type=_int, default=10, help="timed steps per round (default 10)")
    o.add_argument("--rounds", type=_int, default=3, help="interleaved rounds (default 3)")
    o.add_argument("--device", default="cpu", help="cpu or cuda")
    o.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    return p


def _writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".nestopt-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {path!r} is not a writable folder: {e.strerror or e}")
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    import signal

    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    # make sure Ctrl-C (or kill -INT) always reaches us, so partial results get written.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from . import tasks as task_registry
    from .bench import run_bench, suite
    from .bench import registry as opt_registry

    try:
        s = suite(args.suite)
    except KeyError as e:
        raise UsageError(str(e.args[0]))
    tasks = _names(args.tasks) or list(s.tasks)
    optimizers = _names(args.optimizers) or opt_registry.names()
    seeds = s.seeds if args.seeds is None else args.seeds
    for t in tasks:
        if t not in task_registry.names():
            raise UsageError(f"unknown task {t!r}; valid names: {', '.join(task_registry.names())}")
    for o in optimizers:
        if o not in opt_registry.names():
            known = opt_registry.names(available_only=False)
            hint = " (installed? pip install 'nestopt[peers]')" if o in known else ""
            raise UsageError(f"unknown optimizer {o!r}{hint}; valid names: {', '.join(opt_registry.names())}")
    if seeds < 1:
        raise UsageError(f"--seeds {seeds} is invalid: must be a positive integer")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} is invalid: must be a positive integer")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers} is invalid: must be a positive integer")
    out = _writable_dir(args.out)

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
    with progress:
        bar = progress.add_task(suite_label, total=None)

        def on_start(n: int) -> None:
            state["total"] = n
            progress.update(bar, total=n)
            if not live:
                print(f"bench: {n} runs on {args.workers or 'all'} worker(s)", file=sys.stderr, flush=True)

        def on_done(rec: dict) -> None:
            state["diverged"] += rec["diverged"]
            state["done"] += 1
            progress.update(bar, advance=1, description=f"{rec['task']} / {rec['optimizer']} (diverged runs: {state['diverged']})")
            if not live and state["done"] % max(1, state["total"] // 10) == 0:
                # no live bar in a log file: a plain line every tenth of the way instead
                print(f"bench: {state['done']}/{state['total']} runs, {time.perf_counter() - t0:.0f} s, "
                      f"diverged runs so far: {state['diverged']}", file=sys.stderr, flush=True)

        doc = run_bench(tasks=tasks, optimizers=optimizers, seeds=seeds, out=out, steps=args.steps,
                        workers=args.workers, grid_stride=s.grid_stride, suite_name=suite_label,
                        on_start=on_start, on_done=on_done)
    wall = time.perf_counter() - t0
    scores = doc["summary"]["scores"]["time"]
    best = sorted(scores.items(), key=lambda kv: -kv[1])
    console.print(f"{len(doc['runs'])} runs in {wall:.1f} s; wrote {out / 'results.json'}, {out / 'report.md'} and figures")
    for name, sc in best:
        console.print(f"  {name:24s} score {sc:.3f}")
    if not doc["complete"]:
        console.print("[yellow]interrupted: the files hold the runs finished before Ctrl-C[/]")
        return EXIT_INTERRUPTED
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from . import tasks as T

    print(f"{'task':22s} {'kind':15s} {'steps':>6s} {'batch':>6s}  description")
    for n in T.names():
        t = T.get(n)
        print(f"{n:22s} {t.kind:15s} {t.default_steps:6d} {t.batch_size:6d}  {t.description}")
    print("\ntask families (nestopt.tasks.family(name).sample(seed)):")
    for n in T.family_names():
        print(f"  {n:20s} {T.family(n).description}")
    print("\ntwo-player games (nestopt.tasks.get_game(name)):")
    for n in T.game_names():
        print(f"  {n:20s} {T.get_game(n).description}")
    return 0


def _cmd_optimizers(args: argparse.Namespace) -> int:
    from .bench import registry

    print(f"{'optimizer':20s} {'origin':7s} {'default lr':>10s} {'tuned on':>9s} {'non-finite':>10s}  description")
    for spec in registry.specs(available_only=False):
        grid = f"{len(spec.lr_grid)} rates" if spec.tune else "-"
        flag = "" if spec.available() else f"  [not installed: needs {spec.requires}]"
        print(f"{spec.name:20s} {spec.origin:7s} {spec.default_lr:10.3g} {grid:>9s} {spec.nonfinite:>10s}  "
              f"{spec.description}{flag}")
    return 0


def _cmd_overhead(args: argparse.Namespace) -> int:
    import json

    import torch

    from .bench.overhead import format_table, measure
    from .bench import registry

    if args.params < 1:
        raise UsageError(f"--params {args.params} is invalid: must be a positive count")
    if args.steps < 1 or args.rounds < 1:
        raise UsageError("--steps and --rounds must be positive integers")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device {args.device!r} is invalid: expected cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device!r} is invalid: torch sees no CUDA device here")
    names = _names(args.optimizers) or registry.names()
    for n in names:
        if n not in registry.names():
            raise UsageError(f"unknown optimizer {n!r}; valid names: {', '.join(registry.names())}")
    rows = measure(names, n_params=args.params, steps=args.steps, rounds=args.rounds, device=args.device)
    print(format_table(rows, args.params, args.device))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


def _study_parser(sub: Any) -> None:
    """``nestopt study NAME``: the names and options from the studies' records."""
    from .studies import registry as studies

    lines = [f"  {s.name:20s} {s.help}" for s in studies.records()]
    st = sub.add_parser("study", help="run a study that tests a source document's claims",
                        description="Run a study that tests a source document's claims.\n\nstudies:\n" + "\n".join(lines),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("name", help=studies.join(studies.names(), "or"))
    owners: dict[str, list[str]] = {}
    options: dict[str, Any] = {}
    for s in studies.records():  # an option two studies share is one argument, with both names in its help
        for o in s.options:
            first = options.setdefault(o.flag, o)
            if (first.type, first.repeat, first.metavar) != (o.type, o.repeat, o.metavar):
                raise ValueError(f"studies {owners[o.flag]} and {s.name!r} declare {o.flag} differently")
            owners.setdefault(o.flag, []).append(s.name)
    for flag, o in options.items():
        kind = {"action": "append", "default": []} if o.repeat else {"default": None}
        if o.metavar:
            kind["metavar"] = o.metavar
        st.add_argument(flag, type=_int if o.type is int else o.type, help=f"{', '.join(owners[flag])}: {o.help}", **kind)
    st.add_argument("--out", required=True, help="output folder for report.md, results.json and figures")


def _given(args: argparse.Namespace, option: Any) -> bool:
    value = getattr(args, option.dest)
    return bool(value) if option.repeat else value is not None


def _cmd_study(args: argparse.Namespace) -> int:
    from .studies import registry as studies

    if args.name not in studies.names():
        raise UsageError(f"unknown study {args.name!r}; valid names: {', '.join(studies.names())}")
    study = studies.get(args.name)
    for other in studies.records():  # an option of another study: name that study's options
        if any(o.flag not in study.flags and _given(args, o) for o in other.options):
            are = "are options" if len(other.options) > 1 else "is an option"
            raise UsageError(f"{studies.join(other.flags)} {are} of the {other.name} study, not of {args.name!r}")
    options = {o.dest: (tuple(getattr(args, o.dest)) if o.repeat else getattr(args, o.dest))
               if _given(args, o) else o.default for o in study.options}
    out = _writable_dir(args.out)
    t0 = time.perf_counter()
    if study.prepare is not None:
        try:
            options = study.prepare(out, **options)
        except ValueError as e:
            raise UsageError(str(e))
    doc = study.run(out, **options)
    for line in study.summary(doc):
        print(line)
    print(f"study {args.name}: {time.perf_counter() - t0:.0f} s; wrote {study.wrote(out)}")
    return 0


def _cmd_meta_train(args: argparse.Namespace) -> int:
    import json

    from .meta import DirectUpdateMLP, MetaConfig, meta_train
    from .nets import KINDS, save_net

    nets = {**KINDS, "mlp-seed": lambda: DirectUpdateMLP("seed"), "controller": _meta_controller}
    if args.net == "controller" and args.method not in ("es", "pes"):
        raise UsageError(f"--method {args.method} is invalid with --net controller: a nested optimizer's runs are "
                         "not differentiable; use es or pes")
    if args.net not in nets:
        raise UsageError(f"--net {args.net!r} is invalid: expected one of {', '.join(nets)}")
    out = _writable_dir(args.out)
    families = tuple(_names(args.families) or ())
    from . import tasks as task_registry

    for f in families:
        if f not in task_registry.family_names():
            raise UsageError(f"unknown task family {f!r}; valid names: {', '.join(task_registry.family_names())}")
    if args.method not in ("tbptt", "surrogate", "es", "pes"):
        raise UsageError(f"--method {args.method!r} is invalid: expected tbptt, surrogate, es or pes")
    for flag, value in (("--pairs", args.pairs), ("--workers", args.workers), ("--steps", args.steps),
                        ("--unroll", args.unroll)):
        if value < 1:
            raise UsageError(f"{flag} {value} is invalid: must be a positive integer")
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise UsageError(f"--sigma {args.sigma} is invalid: must be a positive number")
    cfg = MetaConfig(families=families, unroll=args.unroll, horizon=max(args.horizon, args.unroll),
                     outer_steps=args.steps, seed=args.seed, method=args.method, es_pairs=args.pairs,
                     es_sigma=args.sigma, workers=args.workers)
    torch_threads()
    net = nets[args.net]()
    t0 = time.perf_counter()
    every = max(1, args.steps // 20)

    def progress(row: dict) -> None:
        if row["step"] % every == 0 or row["step"] == args.steps:
            print(f"meta-train {row['step']}/{args.steps}  meta-loss {row['meta_loss']:+.4f}  "
                  f"({row['task']})  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    history = meta_train(net, cfg, checkpoint=out / "checkpoint.pt", resume=args.resume, progress=progress)
    wall = time.perf_counter() - t0
    save_net(net, out / "net.safetensors", meta=meta_record(args.net, cfg, history, wall))
    (out / "history.json").write_text(json.dumps(history))
    print(f"meta-train: {len(history)} outer steps in {wall:.0f} s; wrote {out / 'net.safetensors'}")
    return 0


def _meta_controller():
    from .nets import Controller
    from .optim.nested import DEFAULT_FEATURES, FEATURES

    return Controller(sum(FEATURES[f] for f in DEFAULT_FEATURES), hidden=8, features=DEFAULT_FEATURES)


def meta_record(net: str, cfg: object, history: list[dict], seconds: float) -> dict:
    """What a weights file says of its making: the command, the settings, the time, and the
    meta-loss curve (at most about 300 points) for the study's figure."""
    stride = max(1, len(history) // 300)
    settings = dict(vars(cfg))
    settings["families"] = list(settings["families"])
    method = "" if settings.get("method", "tbptt") == "tbptt" else f" --method {settings['method']}"
    if settings.get("method") in ("es", "pes"):
        method += f" --pairs {settings['es_pairs']} --sigma {settings['es_sigma']:g}"
    for flag, key, default in (("--steps", "outer_steps", 3000), ("--unroll", "unroll", 20), ("--horizon", "horizon", 200)):
        if settings.get(key, default) != default:
            method += f" {flag} {settings[key]}"
    return {"command": f"nestopt meta-train --net {net}{method} --out DIR", "config": settings, "seconds": round(seconds, 1),
            "history": [[h["step"], round(h["meta_loss"], 5)] for h in history[stride - 1::stride]]}


def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and keeps runs reproducible


COMMANDS = {"bench": _cmd_bench, "study": _cmd_study, "tasks": _cmd_tasks, "optimizers": _cmd_optimizers, "overhead": _cmd_overhead,
            "meta-train": _cmd_meta_train}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"nestopt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nestopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
