"""The ``nestopt`` command line.

    nestopt bench --suite quick|full [--tasks T,..] [--optimizers O,..] [--seeds N] [--steps N]
                  [--workers N] [--highlight NAME,..] [--label N] --out DIR [--force]
    nestopt figures DIR [--highlight NAME,..] [--label N] [--out DIR2]
    nestopt study polyak|large-lr|controller|controller-variants|learned|hpo|games --out DIR [--force]
                  [--net LABEL=PATH ...] [--peer NAME ...]   (learned)
                  [--variant NAME ... --seeds N]   (controller-variants)
    nestopt meta-train [--net hybrid|mlp|mlp-seed|linear|lstm|attention|controller] [--method tbptt|es|pes|surrogate] [--steps N]
                       [--unroll N] [--horizon N] [--pairs N] [--sigma S] [--workers N]
                       [--families F,..] [--seed N] [--resume | --force] --out DIR
    nestopt report --run KEY .. | --docs [--verify] | --check [--cheap-only] [--given KEY=DIR] | --list
    nestopt tasks
    nestopt optimizers
    nestopt overhead [--params 10M] [--optimizers O,..] [--steps N] [--rounds N] [--device cpu|cuda]
                     [--json FILE [--force]]

Bad input prints one line naming the argument, the value and what is allowed, and exits with code 2.

Outputs never lose work: a command refuses an ``--out`` folder that holds anything unless given
``--force`` (``meta-train``: ``--resume`` continues its checkpoint), and writes each file to a
temporary name and renames it. A run's files reach ``--out`` together when it completes and replace
the older result's files; an interrupted run (Ctrl-C, SIGINT or SIGTERM, in the foreground or in the
background) writes what it finished to ``OUT/partial/`` instead, leaves a complete result in
``OUT`` as it was, and exits with code 130 (SIGINT) or 143 (SIGTERM) (see :mod:`nestopt._io`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cli_args import (EXIT_INTERRUPTED, FORCE_HELP, UsageError, _count, _int, _interrupted, _names,
                        _out, _Parser, _positive)
from .commands import bench as bench_command
from .report import command as report

EXIT_USAGE = 2
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestopt", description="Nested and learned optimization for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench_command.add_parser(sub)
    _study_parser(sub)
    report.add_parser(sub)
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
    m.add_argument("--force", action="store_true",
                   help="start over in a non-empty --out (its checkpoint.pt is replaced by this run's)")

    o = sub.add_parser("overhead", help="optimizer step time and memory vs torch AdamW(fused) and SGD(foreach)")
    o.add_argument("--params", type=_count, default=10_000_000, help="parameter count, e.g. 10M (default)")
    o.add_argument("--optimizers", help="comma-separated optimizer names (default: every installed optimizer but "
                   "the ones run only when named, such as kron)")
    o.add_argument("--steps", type=_int, default=10, help="timed steps per round (default 10)")
    o.add_argument("--rounds", type=_int, default=3, help="interleaved rounds (default 3)")
    o.add_argument("--device", default="cpu", help="cpu or cuda")
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
    return 0


def _cmd_meta_train(args: argparse.Namespace) -> int:
    import json

    from . import tasks as task_registry
    from ._io import Staged, atomic_path, atomic_write_text
    from .meta import DirectUpdateMLP, MetaConfig, meta_train
    from .meta.train import CheckpointError
    from .nets import KINDS, save_net

    nets = {**KINDS, "mlp-seed": lambda: DirectUpdateMLP("seed"), "controller": _meta_controller}
    if args.net not in nets:
        raise UsageError(f"--net {args.net!r} is invalid: expected one of {', '.join(nets)}")
    if args.method not in ("tbptt", "surrogate", "es", "pes"):
        raise UsageError(f"--method {args.method!r} is invalid: expected tbptt, surrogate, es or pes")
    if args.net == "controller" and args.method not in ("es", "pes"):
        raise UsageError(f"--method {args.method} is invalid with --net controller: a nested optimizer's runs are "
                         "not differentiable; use es or pes")
    families = tuple(_names(args.families, "--families", "task family", task_registry.family_names()) or ())
    for f in families:
        if f not in task_registry.family_names():
            raise UsageError(f"unknown task family {f!r}; valid names: {', '.join(task_registry.family_names())}")
    for flag, value in (("--pairs", args.pairs), ("--workers", args.workers), ("--steps", args.steps),
                        ("--unroll", args.unroll), ("--horizon", args.horizon)):
        _positive(flag, value)
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} is invalid: must be an integer from 0 to 2**63 - 1")
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise UsageError(f"--sigma {args.sigma} is invalid: must be a positive number")
    ckpt = Path(args.out) / "checkpoint.pt"
    resume = args.resume and ckpt.is_file()
    if args.resume and not resume and Path(args.out).is_dir() and any(Path(args.out).iterdir()) and not args.force:
        raise UsageError(f"--resume is invalid: --out {args.out!r} holds no checkpoint.pt to continue; "
                         "add --force to start over in it")
    hint = ("--resume to continue from its checkpoint.pt, or --force to start over" if ckpt.is_file()
            else "--force to replace what it holds")
    out = _out(args.out, force=args.force, resume=resume, hint=hint)
    if args.resume and not resume:
        print(f"meta-train: no checkpoint in {out} to resume: starting at step 0", file=sys.stderr, flush=True)
    cfg = MetaConfig(families=families, unroll=args.unroll, horizon=max(args.horizon, args.unroll),
                     outer_steps=args.steps, seed=args.seed, method=args.method, es_pairs=args.pairs,
                     es_sigma=args.sigma, workers=args.workers)
    torch_threads()
    net = nets[args.net]()
    t0 = time.perf_counter()
    every = max(1, args.steps // 20)
    rows: list[dict] = []  # the history so far (a resumed run's included)

    def progress(row: dict) -> None:
        rows.append(row)
        if row["step"] % every == 0 or row["step"] == args.steps:
            print(f"meta-train {row['step']}/{args.steps}  meta-loss {row['meta_loss']:+.4f}  "
                  f"({row['task']})  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def resumed(step: int, history: list[dict]) -> None:
        rows[:] = history
        print(f"meta-train: resuming from step {step} of {args.steps} ({ckpt})", file=sys.stderr, flush=True)

    def write(stage: Staged, history: list[dict]) -> None:
        with atomic_path(stage.dir / "net.safetensors") as tmp:
            save_net(net, tmp, meta=meta_record(args.net, cfg, history, time.perf_counter() - t0))
        atomic_write_text(stage.dir / "history.json", json.dumps(history))

    try:
        history = meta_train(net, cfg, checkpoint=ckpt, resume=resume, progress=progress, on_resume=resumed)
    except CheckpointError as e:
        raise UsageError(f"--resume is invalid: {e}") from None
    except KeyboardInterrupt:
        step = rows[-1]["step"] if rows else 0
        if not rows:
            return _interrupted("no outer step had finished, nothing was written")
        stage = Staged(out)
        try:
            write(stage, rows)
        finally:
            where = stage.to_partial({"step": step, "of": args.steps})
        return _interrupted(f"at step {step} of {args.steps}: continue with --resume (from {ckpt}); "
                            f"the network so far is in {where}")
    wall = time.perf_counter() - t0
    stage = Staged(out, replaces=("net.safetensors", "history.json"))
    try:
        write(stage, history)
    except BaseException:
        stage.discard()
        raise
    stage.commit()
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


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        return report.main(args)
    except report.UsageError as e:
        raise UsageError(str(e)) from None


COMMANDS = {"report": _cmd_report, "bench": bench_command.cmd_bench, "figures": bench_command.cmd_figures, "study": _cmd_study, "tasks": _cmd_tasks, "optimizers": _cmd_optimizers, "overhead": _cmd_overhead,
            "meta-train": _cmd_meta_train}


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    from ._io import OutputError, Terminated, interruptible, last_signal

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # SIGINT and SIGTERM stop every command cleanly, also in a background job (which a shell
        # starts with SIGINT ignored); the handlers before are restored after.
        with interruptible():
            rc = COMMANDS[args.command](args)
        # the shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)
        return 128 + signal.SIGTERM if rc == EXIT_INTERRUPTED and last_signal() == signal.SIGTERM else rc
    except (UsageError, OutputError) as e:
        print(f"nestopt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"nestopt: interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
