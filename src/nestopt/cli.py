"""The ``nestopt`` command line.

    nestopt bench --suite quick|full [--tasks T,..] [--optimizers O,..] [--seeds N] [--steps N]
                  [--workers N] [--highlight NAME,..] [--label N] --out DIR [--force]
    nestopt figures DIR [--highlight NAME,..] [--label N] [--out DIR2]
    nestopt study polyak|large-lr|controller|controller-variants|learned|hpo|games|refit|stopping --out DIR [--force]
                  [--net LABEL=PATH ...] [--peer NAME ...]   (learned)
                  [--variant NAME ... --seeds N]   (controller-variants)
                  [--quick] [--family F] [--cache DIR] [--seeds N] [--train-days LO:HI] [--eval-days LO:HI]   (refit)
                  [--quick]   (stopping)
    nestopt meta-train [--net hybrid|mlp|mlp-seed|linear|lstm|attention|controller] [--method tbptt|es|pes|surrogate] [--steps N]
                       [--unroll N] [--horizon N] [--pairs N] [--sigma S] [--workers N]
                       [--family F,..] [--days LO:HI] [--seed N] [--resume | --force] --out DIR
    nestopt report --run KEY .. | --docs [--verify] | --check [--cheap-only] [--given KEY=DIR] | --list
    nestopt tasks
    nestopt optimizers
    nestopt overhead [--params 10M] [--optimizers O,..] [--steps N] [--rounds N] [--device cpu|cuda] [--processes N]
                     [--json FILE [--force]]

Bad input prints one line naming the argument, the value and what is allowed, and exits with code 2.

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``meta-train`` and ``bench`` spread their work over the ranks
(a gloo process group, started and ended here; rank 0 writes the files and prints the errors); the
other commands run in one process.

Outputs never lose work: a command refuses an ``--out`` folder that holds anything unless given
``--force`` (``meta-train``: ``--resume`` continues its checkpoint), and writes each file to a
temporary name and renames it. A run's files reach ``--out`` together when it completes and replace
the older result's files; an interrupted run (Ctrl-C, SIGINT or SIGTERM, in the foreground or in the
background) writes what it finished to ``OUT/partial/`` instead, leaves a complete result in
``OUT`` as it was, and exits with code 130 (SIGINT) or 143 (SIGTERM) (see :mod:`nestopt._io`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import _ranks
from ._cli_args import (EXIT_INTERRUPTED, FORCE_HELP, UsageError, _count, _int, _interrupted, _names,
                        _out, _Parser, _positive)
from .commands import bench as bench_command
from .commands import meta_train as meta_train_command
from .report import command as report

EXIT_USAGE = 2
RANKED_COMMANDS = ("meta-train", "bench")  # the commands that spread their work over torchrun's ranks
LEAVE_GRACE_S = 1.0
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="nestopt", description="Nested and learned optimization for PyTorch.")
    p.add_argument("--version", action="version", version=f"nestopt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench_command.add_parser(sub)
    _study_parser(sub)
    report.add_parser(sub)
    sub.add_parser("tasks", help="list the registered tasks, task families and games")
    sub.add_parser("optimizers", help="list the registered optimizers")

    meta_train_command.add_parser(sub)

    o = sub.add_parser("overhead", help="optimizer step time and memory vs torch AdamW(fused) and SGD(foreach)")
    o.add_argument("--params", type=_count, default=None,
                   help="parameter count, e.g. 10M (the default; 1M with --processes)")
    o.add_argument("--optimizers", help="comma-separated optimizer names (default: every installed optimizer but "
                   "the ones run only when named, such as kron)")
    o.add_argument("--steps", type=_int, default=10, help="timed steps per round (default 10)")
    o.add_argument("--rounds", type=_int, default=3, help="interleaved rounds (default 3)")
    o.add_argument("--device", default="cpu", help="cpu or cuda")
    o.add_argument("--processes", type=_int, default=None,
                   help="instead: the added cost of the collectives that keep the ranks identical, over this many local "
                        "gloo processes (at least 2; default model 1M parameters)")
    o.add_argument("--json", dest="json_out", help="also write the rows to this JSON file (its folder must exist)")
    o.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    return p


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
    import re

    import torch

    from ._io import OutputError, atomic_write_json, check_file_target
    from .bench import registry
    from .bench.overhead import BYTES_PER_PARAM, Interrupted, format_table, max_params, measure, memory_bytes

    if args.params is None:
        args.params = 10_000_000 if args.processes is None else 1_000_000
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device {args.device!r} is invalid: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device!r} is invalid: torch sees no CUDA device here")
        if ":" in args.device and int(args.device.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device!r} is invalid: torch sees {torch.cuda.device_count()} CUDA "
                             f"device(s) here (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if args.params < 1:
        raise UsageError(f"--params {args.params} is invalid: must be a positive count")
    bound = max_params(args.device)
    if args.params > bound:
        mem = memory_bytes(args.device)
        why = f" (what {mem / 2**30:.0f} GiB holds at about {BYTES_PER_PARAM} bytes a parameter)" if mem else ""
        raise UsageError(f"--params {args.params:.4g} is invalid: at most {bound:.4g} on {args.device}{why}")
    _positive("--steps", args.steps)
    _positive("--rounds", args.rounds)
    names = _names(args.optimizers, "--optimizers", "optimizer", registry.names())  # None: measure's default
    for n in names or ():
        if n not in registry.names():
            raise UsageError(f"unknown optimizer {n!r}; valid names: {', '.join(registry.names())}")
    target = None
    if args.json_out is not None:  # checked before the work, not after it
        try:
            target = check_file_target(args.json_out, force=args.force, option="--json")
        except OutputError as e:
            raise UsageError(str(e)) from None
    if args.processes is not None:
        return _overhead_processes(args, target)
    try:
        rows = measure(names, n_params=args.params, steps=args.steps, rounds=args.rounds, device=args.device)
    except Interrupted as e:
        if not e.rows:
            return _interrupted("nothing was measured yet")
        print(format_table(e.rows, args.params, args.device))
        where = ""
        if target is not None:
            partial = target.parent / "partial" / target.name
            atomic_write_json(partial, [r.as_dict() for r in e.rows])
            where = f"; they are in {partial} ({target} was not written)"
        return _interrupted(f"{len(e.rows)} of {e.total} configurations measured (the table above){where}")
    print(format_table(rows, args.params, args.device))
    if target is not None:
        atomic_write_json(target, [r.as_dict() for r in rows])
    return 0


def _overhead_processes(args: argparse.Namespace, target: Any) -> int:
    """``nestopt overhead --processes N``: the collectives' cost (:mod:`nestopt.bench.collectives`)."""
    from ._io import atomic_write_json
    from .bench import collectives

    if not 2 <= args.processes <= 64:
        raise UsageError(f"--processes {args.processes} is invalid: expected 2 to 64 local processes (the collectives "
                         "are between processes)")
    if args.device != "cpu" or args.optimizers is not None:
        raise UsageError("--processes measures the CPU (gloo) and its own optimizers: drop --device and --optimizers")
    doc = collectives.measure(args.processes, args.params, steps=args.steps, rounds=args.rounds)
    print(collectives.format_table(doc))
    if target is not None:
        atomic_write_json(target, doc)
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
            if (first.type, first.repeat, first.metavar, first.switch) != (o.type, o.repeat, o.metavar, o.switch):
                raise ValueError(f"studies {owners[o.flag]} and {s.name!r} declare {o.flag} differently")
            owners.setdefault(o.flag, []).append(s.name)
    for flag, o in options.items():
        if o.switch:
            st.add_argument(flag, action="store_true", default=None, help=f"{', '.join(owners[flag])}: {o.help}")
            continue
        kind = {"action": "append", "default": []} if o.repeat else {"default": None}
        if o.metavar:
            kind["metavar"] = o.metavar
        st.add_argument(flag, type=_int if o.type is int else o.type, help=f"{', '.join(owners[flag])}: {o.help}", **kind)
    st.add_argument("--out", required=True, help="output folder for report.md, results.json and figures")
    st.add_argument("--log-dir", help="also write the figures as TensorBoard images here; needs tensorboard")
    st.add_argument("--force", action="store_true", help=FORCE_HELP)


def _given(args: argparse.Namespace, option: Any) -> bool:
    value = getattr(args, option.dest)
    return bool(value) if option.repeat else value is not None


def _cmd_study(args: argparse.Namespace) -> int:
    from ._io import Staged, recording_parts
    from .studies import registry as studies

    if args.name not in studies.names():
        raise UsageError(f"unknown study {args.name!r}; valid names: {', '.join(studies.names())}")
    study = studies.get(args.name)
    for other in studies.records():  # an option of another study: say which studies take it
        for o in other.options:
            if o.flag in study.flags or not _given(args, o):
                continue
            value = getattr(args, o.dest)
            owners = [s.name for s in studies.records() if o.flag in s.flags]
            takes = f"{args.name} takes {studies.join(study.flags)}" if study.flags else f"{args.name} takes no options"
            raise UsageError(f"{o.flag} {(value[0] if o.repeat else value)!r} does not apply to the {args.name} study: "
                             f"only {studies.join(owners)} take{'s' if len(owners) == 1 else ''} {o.flag} ({takes})")
    options = {o.dest: (tuple(getattr(args, o.dest)) if o.repeat else getattr(args, o.dest))
               if _given(args, o) else o.default for o in study.options}
    out = _out(args.out, force=args.force)
    t0 = time.perf_counter()
    if study.prepare is not None:
        try:
            options = study.prepare(out, **options)
        except ValueError as e:
            raise UsageError(str(e))
    stage = Staged(out, replaces=(*study.files, *(("*.png",) if study.figures else ())))
    had_result = any((out / f).is_file() for f in study.files)

    def part_done(name: str) -> None:
        print(f"study {args.name}: part {name} finished ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    try:
        with recording_parts(stage.parts, log=part_done):
            doc = study.run(stage.dir, **options)
    except KeyboardInterrupt:
        where = stage.to_partial({"study": args.name})
        kept = f"; the complete result in {out} is as it was" if had_result else ""
        if where is None:
            return _interrupted(f"study {args.name} had finished no part, nothing was written{kept}")
        return _interrupted(f"study {args.name}: what had finished is in {where}{kept}")
    except BaseException:
        where = stage.to_partial({"study": args.name, "failed": True})
        if where is not None:
            print(f"nestopt: study {args.name} failed; what had finished is in {where}", file=sys.stderr)
        raise
    stage.commit()
    for line in study.summary(doc):
        print(line)
    print(f"study {args.name}: {time.perf_counter() - t0:.0f} s; wrote {study.wrote(out)}")
    if args.log_dir is not None:
        from .integrations import logdir

        logdir.study(args.log_dir, out.glob("*.png"))
        print(f"study {args.name}: TensorBoard event files (its figures) in {args.log_dir}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        return report.main(args)
    except report.UsageError as e:
        raise UsageError(str(e)) from None


COMMANDS = {"report": _cmd_report, "bench": bench_command.cmd_bench, "figures": bench_command.cmd_figures, "study": _cmd_study, "tasks": _cmd_tasks, "optimizers": _cmd_optimizers, "overhead": _cmd_overhead,
            "meta-train": meta_train_command.cmd_meta_train}


@contextmanager
def _process_group(command: str) -> Iterator[None]:
    """The process group of a torchrun launch for ``command``, started here and ended after it
    (after a barrier when it returned); nothing in one process. A usage error for a command that
    does not spread over ranks, or a launch environment that lacks a variable."""
    from ._io import OutputError

    try:
        launched = _ranks.launched()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not launched:
        yield
        return
    if command not in RANKED_COMMANDS:
        raise UsageError(f"{command} does not run under torchrun (WORLD_SIZE={_ranks.env_world_size()}): only "
                         f"{' and '.join(RANKED_COMMANDS)} spread over ranks; run it in one process")
    try:
        started = _ranks.init_from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # the rendezvous failed (an unreachable MASTER_ADDR, a port in use, a timeout)
        import os

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"the torchrun process group did not start (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                         f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {first}") from None
    from ._io import signals_seen

    finished, seen = False, signals_seen()
    try:
        yield
        # (an interrupted run leaves at once: a rank the signal caught inside an exchange never
        # reaches the barrier, and the group's end unblocks it)
        finished = signals_seen() == seen
    except (UsageError, OutputError) as e:
        # Every rank meets the same usage error: rank 0 says it, and the ranks leave together, so
        # torchrun (which stops the others when one exits) does not stop rank 0 before it has said it.
        if started:
            if _ranks.is_main():
                print(f"nestopt: error: {e}", file=sys.stderr, flush=True)
            e.told = True  # type: ignore[attr-defined]
            _ranks.leave_together()
        raise
    finally:
        if started:
            _ranks.shutdown(wait=finished)


def _launched() -> bool:
    try:
        return _ranks.launched()
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    from ._io import OutputError, Terminated, interruptible, last_signal

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "log_dir", None) is not None:  # checked before the work, not after it
            _check_log_dir(args.log_dir)
        # SIGINT and SIGTERM stop every command cleanly, also in a background job (which a shell
        # starts with SIGINT ignored); the handlers before are restored after.
        with interruptible(), _process_group(args.command):
            rc = COMMANDS[args.command](args)
            sys.stdout.flush()  # (a closed pipe shows here, inside the handler below, not at exit)
        # the shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)
        return 128 + signal.SIGTERM if rc == EXIT_INTERRUPTED and last_signal() == signal.SIGTERM else rc
    except (UsageError, OutputError) as e:
        if getattr(e, "told", False):  # said by rank 0 of a torchrun launch
            return EXIT_USAGE
        if _ranks.env_rank() == 0:  # under torchrun every rank meets the same error: rank 0 says it
            print(f"nestopt: error: {e}", file=sys.stderr)
        elif _launched():
            time.sleep(LEAVE_GRACE_S)  # (no group yet: give rank 0 the time to say it before torchrun stops it)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"nestopt: interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`nestopt tasks | head`): stop quietly, as `head` asked; stdout is
        # pointed at /dev/null so the interpreter's last flush raises nothing either
        _quiet_stdout()
        return 0


def _check_log_dir(path: str) -> None:
    from pathlib import Path

    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"--log-dir {path!r} is invalid: it is a file, not a folder")
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
    except ImportError:
        raise UsageError(f"--log-dir {path!r} needs the tensorboard package: pip install 'nestopt[integrations]'") from None


def _quiet_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (captured by a test): nothing to point elsewhere
        pass


if __name__ == "__main__":
    sys.exit(main())
