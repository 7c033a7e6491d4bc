"""``nestopt meta-train``: meta-train an update network (for ``LearnedOptimizer``) or a nested
optimizer's controller on task families, registered ones or a user's by import path.

    nestopt meta-train [--net hybrid|mlp|mlp-seed|linear|lstm|attention|controller] [--method tbptt|es|pes|surrogate]
                       [--steps N] [--unroll N] [--horizon N] [--pairs N] [--sigma S] [--workers N]
                       [--family F,..] [--days LO:HI] [--seed N] [--resume | --force] --out DIR

``--family mypkg.tasks:MyFamily`` imports a user's :class:`~nestopt.tasks.TaskFamily`;
``--days 0:60`` keeps to its seeds (days) 0 to 59, e.g. the past days of ``trading-daily``.

``torchrun --nproc_per_node N -m nestopt meta-train --method es|pes ...`` spreads the particles over
the ranks (see :mod:`nestopt.meta.train`); rank 0 checks ``--out``, reads and writes the checkpoint,
prints the progress and writes the files, and the result is the one a single process writes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from .. import _ranks
from .._cli_args import EXIT_INTERRUPTED, UsageError, _int, _interrupted, _names, _out, _positive


def add_parser(sub: Any) -> None:
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
    m.add_argument("--log-dir", help="also write TensorBoard event files here (each outer step's meta-loss); needs "
                   "tensorboard")
    m.add_argument("--steps", type=_int, default=3000, help="outer steps (default 3000)")
    m.add_argument("--unroll", type=_int, default=20, help="inner steps per truncation (default 20)")
    m.add_argument("--horizon", type=_int, default=200, help="inner steps per task (default 200)")
    m.add_argument("--families", "--family", dest="families", default="quadratic,teacher-mlp",
                   help="task families to meta-train on: registered names (nestopt tasks) or a user's family by import "
                        "path, module:Class (comma-separated; default quadratic,teacher-mlp)")
    m.add_argument("--days", metavar="LO:HI",
                   help="keep to seeds (days) LO to HI - 1 of each family, e.g. 0:60 for trading-daily's past days")
    m.add_argument("--seed", type=_int, default=0)
    m.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    m.add_argument("--force", action="store_true",
                   help="start over in a non-empty --out (its checkpoint.pt is replaced by this run's)")


def cmd_meta_train(args: argparse.Namespace) -> int:
    import json

    from .. import tasks as task_registry
    from .._io import Staged, atomic_path, atomic_write_text
    from ..meta import DirectUpdateMLP, MetaConfig, meta_train
    from ..meta.train import CheckpointError
    from ..nets import KINDS, save_net

    nets = {**KINDS, "mlp-seed": lambda: DirectUpdateMLP("seed"), "controller": meta_controller}
    if args.net not in nets:
        raise UsageError(f"--net {args.net!r} is invalid: expected one of {', '.join(nets)}")
    if args.method not in ("tbptt", "surrogate", "es", "pes"):
        raise UsageError(f"--method {args.method!r} is invalid: expected tbptt, surrogate, es or pes")
    if args.net == "controller" and args.method not in ("es", "pes"):
        raise UsageError(f"--method {args.method} is invalid with --net controller: a nested optimizer's runs are "
                         "not differentiable; use es or pes")
    families = family_specs(args.families, args.days)
    for flag, value in (("--pairs", args.pairs), ("--workers", args.workers), ("--steps", args.steps),
                        ("--unroll", args.unroll), ("--horizon", args.horizon)):
        _positive(flag, value)
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} is invalid: must be an integer from 0 to 2**63 - 1")
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise UsageError(f"--sigma {args.sigma} is invalid: must be a positive number")
    ranked, main = _ranks.is_distributed(), _ranks.is_main()
    if ranked and args.method not in ("es", "pes"):
        raise UsageError(f"--method {args.method} is invalid under torchrun ({_ranks.world_size()} ranks): only es and "
                         "pes spread their unrolls over the ranks; run it in one process, or use --method es or pes")
    ckpt = Path(args.out) / "checkpoint.pt"
    # rank 0 checks --out (the others may not see its file system) and tells the others what it found
    found: tuple[str, Any] = ("ok", (False, ""))
    if main:
        try:
            found = ("ok", _prepare_out(args, ckpt))
        except UsageError as e:
            found = ("error", str(e))
    found = _ranks.broadcast(found)
    if found[0] == "error":
        raise UsageError(found[1])
    resume, where = found[1]
    out = Path(where)  # (rank 0's: the other ranks write nothing)
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
        if main and (row["step"] % every == 0 or row["step"] == args.steps):
            print(f"meta-train {row['step']}/{args.steps}  meta-loss {row['meta_loss']:+.4f}  "
                  f"({row['task']})  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def resumed(step: int, history: list[dict]) -> None:
        rows[:] = history
        if main:
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
        if not main:
            return EXIT_INTERRUPTED  # rank 0 says what was written
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
    if not main:
        return 0  # rank 0 writes the files
    stage = Staged(out, replaces=("net.safetensors", "history.json"))
    try:
        write(stage, history)
    except BaseException:
        stage.discard()
        raise
    stage.commit()
    print(f"meta-train: {len(history)} outer steps in {wall:.0f} s; wrote {out / 'net.safetensors'}")
    if args.log_dir is not None:
        from ..integrations import logdir

        logdir.meta_train(args.log_dir, history)
        print(f"meta-train: TensorBoard event files in {args.log_dir}")
    return 0


def _prepare_out(args: argparse.Namespace, ckpt: Path) -> tuple[bool, str]:
    """Check (and make) ``--out``: ``(resume, the folder)``; a usage error says what is wrong."""
    resume = args.resume and ckpt.is_file()
    if args.resume and not resume and Path(args.out).is_dir() and any(Path(args.out).iterdir()) and not args.force:
        raise UsageError(f"--resume is invalid: --out {args.out!r} holds no checkpoint.pt to continue; "
                         "add --force to start over in it")
    hint = ("--resume to continue from its checkpoint.pt, or --force to start over" if ckpt.is_file()
            else "--force to replace what it holds")
    out = _out(args.out, force=args.force, resume=resume, hint=hint)
    if args.resume and not resume:
        print(f"meta-train: no checkpoint in {out} to resume: starting at step 0", file=sys.stderr, flush=True)
    return resume, str(out)


def meta_controller():
    from ..nets import Controller
    from ..optim.nested import DEFAULT_FEATURES, FEATURES

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
    families = settings["families"]
    if families != ["quadratic", "teacher-mlp"]:
        bases = list(dict.fromkeys(f.partition("@")[0] for f in families))
        days = {f.partition("@")[2] for f in families}
        method += f" --family {','.join(bases)}" + (f" --days {days.pop()}" if len(days) == 1 and "" not in days else "")
    return {"command": f"nestopt meta-train --net {net}{method} --out DIR", "config": settings, "seconds": round(seconds, 1),
            "history": [[h["step"], round(h["meta_loss"], 5)] for h in history[stride - 1::stride]]}


def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and keeps runs reproducible


def family_specs(families: str, days: str | None) -> tuple[str, ...]:
    """The ``--family`` names (each a registered name or ``module:Class``), each with ``@LO:HI``
    when ``--days`` is given; a usage error names what is wrong."""
    from .. import tasks as task_registry

    names = tuple(_names(families, "--family", "task family", task_registry.family_names()) or ())
    if days is not None:
        lo, colon, hi = days.partition(":")
        if not (colon and lo.isdigit() and hi.isdigit() and int(hi) > int(lo)):
            raise UsageError(f"--days {days!r} is invalid: expected LO:HI with 0 <= LO < HI, e.g. 0:60")
        if any("@" in n for n in names):
            raise UsageError(f"--days {days!r} is invalid with a family that names its own days ({names})")
        names = tuple(f"{n}@{days}" for n in names)
    for n in names:
        try:
            task_registry.family(n)
        except KeyError as e:
            raise UsageError(str(e.args[0]) if e.args else str(e)) from None
    return names
