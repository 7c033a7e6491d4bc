"""``nestopt study learned --out DIR``: do meta-trained update networks generalise?

Protocol: the networks were meta-trained on the ``quadratic`` and ``teacher-mlp`` families
(``nestopt meta-train``); here they run, untuned (``lr=1``), on tasks from families never seen in
meta-training (``digits-mlp``, ``trading``, and the workloads of a different kind: ``digits-cnn``
convolutions, ``gru-seq`` recurrences, ``logic-gates`` multiplicative attention) and on one task at a
horizon 10x the meta-training runs' (2000 steps against 200). Baseline: AdamW tuned per task over five rates (3e-4 to 3e-2), its
target the worst seed's final validation loss at its best rate, as in the bench. Per task and
network: steps to that target on each of 5 seeds, the speedup over tuned AdamW (its steps / the
network's) with a bootstrap 90% interval over seeds, and the divergence count. Peers
(``--peer NAME``: a registry optimizer such as ``prodigy``) run the same way, untuned at their
default rates, as a reference for how hard "faster than tuned AdamW" is.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_savefig, atomic_write_text, save_part
from .. import tasks as task_registry
from .._threads import one_thread
from ..train import LoopResult, train_loop
from ._common import finite

ADAMW_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
HELD_OUT = (("digits-mlp", 101), ("digits-mlp", 102), ("digits-mlp", 103), ("digits-mlp", 104),
            ("trading", 201), ("trading", 202), ("digits-cnn", 301), ("digits-cnn", 302), ("gru-seq", 401),
            ("gru-seq", 402), ("logic-gates", 501), ("logic-gates", 502))
LONG = ("digits-mlp", 105, 2000)
SEEDS = 5
EVAL_POINTS = 30


def _task(family: str, index: int) -> Any:
    return task_registry.family(family).sample(index)


PEER = "peer:"  # a net value "peer:NAME" runs the registry optimizer NAME, untuned, at its default rate


def _make(opt: str, model: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``opt`` over ``model`` (an ``nn.Module``, or bare parameters): a peer gets the
    param groups its registry spec asks for (Muon's split of the hidden matrices)."""
    module = model if isinstance(model, torch.nn.Module) else None
    params = model.parameters() if module is not None else model
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if opt.startswith(PEER):
        from ..bench import registry

        spec = registry.get(opt[len(PEER):])
        return spec.make_for(module) if module is not None else spec.make(params)
    from ..optim.learned import LearnedOptimizer

    return LearnedOptimizer(params, net=opt, lr=lr)


def run(family: str, index: int, opt: str, lr: float, seed: int, steps: int | None = None) -> dict[str, Any]:
    """Train one held-out task; the validation curve at ``EVAL_POINTS`` points (the loop and its
    divergence rule are :func:`nestopt.train.train_loop`'s; ``train_s`` is training time only)."""
    task = _task(family, index)
    steps = steps or task.default_steps
    model = task.init(seed)
    o = _make(opt, model, lr)
    curve: dict[str, list[float]] = {"step": [], "val_loss": []}

    def on_eval(step: int, metrics: dict[str, float], res: LoopResult) -> None:
        curve["step"].append(step)
        curve["val_loss"].append(metrics["val_loss"])

    res = train_loop(o, steps, lambda batch: task.loss(model, batch), batch=task.sampler(seed),
                     evaluate=lambda: task.evaluate(model), eval_every=max(1, steps // EVAL_POINTS), on_eval=on_eval)
    diverged = res.diverged
    return {"task": f"{family}#{index}", "name": getattr(task, "name", family), "opt": opt, "lr": lr, "seed": seed,
            "steps": steps, "curve": curve, "diverged": diverged, "train_s": res.train_time,
            "final": None if diverged else curve["val_loss"][-1]}


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C (and stops the pool)
    torch.set_num_threads(1)  # one thread per worker process: the pool fills the cores


def _run_job(job: tuple) -> dict[str, Any]:
    return run(*job)


def _steps_to(curve: dict[str, list[float]], target: float) -> float:
    for s, v in zip(curve["step"], curve["val_loss"]):
        if v is not None and math.isfinite(v) and v <= target:
            return float(s)
    return math.inf


def _speedup_ci(adam: list[float], mine: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90% bootstrap interval of median(AdamW steps) / median(network steps), resampling the
    seeds of each independently (a target never reached counts as infinitely many steps)."""
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        a = statistics.median(rng.choice(adam) for _ in adam)
        m = statistics.median(rng.choice(mine) for _ in mine)
        vals.append(a / m if math.isfinite(m) and math.isfinite(a) else 0.0)
    vals.sort()
    return vals[int(0.05 * n)], vals[int(0.95 * n) - 1]


def analyse(records: list[dict[str, Any]], nets: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == task]
        steps = rs[0]["steps"]
        by_lr = {}
        for lr in ADAMW_LRS:
            runs = [r for r in rs if r["opt"] == "adamw" and r["lr"] == lr]
            if runs:
                by_lr[lr] = max(math.inf if r["final"] is None else r["final"] for r in runs)
        best = min(by_lr, key=lambda k: by_lr[k])
        target = by_lr[best]
        adam_steps = [_steps_to(r["curve"], target) for r in rs if r["opt"] == "adamw" and r["lr"] == best]
        for label, path in nets.items():
            runs = [r for r in rs if r["opt"] == path]
            mine = [_steps_to(r["curve"], target) for r in runs]
            reached = sum(math.isfinite(m) for m in mine)
            median_steps = statistics.median(mine) if mine else math.inf
            speedup = statistics.median(adam_steps) / median_steps if math.isfinite(median_steps) else 0.0
            ci = _speedup_ci(adam_steps, mine) if mine else (0.0, 0.0)
            rows.append({"task": task, "name": rs[0]["name"], "steps": steps, "net": label, "adamw_lr": best,
                         "target": target, "adamw_steps": statistics.median(adam_steps), "steps_to_target": median_steps,
                         "reached": reached, "seeds": len(runs), "speedup": speedup, "speedup_ci90": ci,
                         "diverged": sum(r["diverged"] for r in runs), "faster": speedup > 1.0})
    return rows


def run_study(out: str | Path, nets: dict[str, str] | None = None, workers: int | None = None,
              held_out: tuple[tuple[str, int], ...] = HELD_OUT, seeds: int = SEEDS, long: tuple | None = LONG,
              histories: dict[str, list[list[float]]] | None = None) -> dict[str, Any]:
    """Evaluate each network in ``nets`` (label -> .safetensors path) on the held-out tasks."""
    import multiprocessing as mp

    from ..nets import SHIPPED

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nets = nets or {"shipped default (linear)": str(SHIPPED)}
    t0 = time.perf_counter()
    jobs = [(f, i, "adamw", lr, s) for f, i in held_out for lr in ADAMW_LRS for s in range(seeds)]
    jobs += [(f, i, path, 1.0, s) for f, i in held_out for path in nets.values() for s in range(seeds)]
    if long is not None:
        f, i, n = long
        jobs += [(f, i, "adamw", lr, s, n) for lr in ADAMW_LRS for s in range(seeds)]
        jobs += [(f, i, path, 1.0, s, n) for path in nets.values() for s in range(seeds)]
    jobs.sort(key=lambda j: -(j[5] if len(j) > 5 else 400) * (3 if j[0] == "trading" else 1))
    records: list[dict[str, Any]] = []
    saved = [time.perf_counter()]

    def finished(rec: dict[str, Any]) -> None:  # the runs so far are the study's part "runs" (every 5 s)
        records.append(rec)
        if len(records) == len(jobs) or time.perf_counter() - saved[0] > 5.0:
            save_part("runs", records)
            saved[0] = time.perf_counter()

    try:
        if workers == 1:
            with one_thread():
                for j in jobs:
                    finished(_run_job(j))
        else:
            with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                for rec in pool.imap(_run_job, jobs, chunksize=1):  # in order, as pool.map
                    finished(rec)
    except KeyboardInterrupt:
        if records:
            save_part("runs", records)
        raise
    short = [r for r in records if long is None or r["steps"] != long[2] or r["task"] != f"{long[0]}#{long[1]}"]
    long_recs = [r for r in records if r not in short]
    rows = analyse(short, nets)
    long_rows = analyse(long_recs, nets) if long_recs else []
    if histories is None:  # the meta-loss curves stored in the weight files
        from ..nets import net_metadata

        histories = {}
        for label, path in nets.items():
            if path.startswith(PEER):
                continue
            meta = net_metadata(path)
            if meta.get("history"):
                surrogate = meta.get("config", {}).get("method") == "surrogate"
                histories[label + (" (its surrogate loss)" if surrogate else "")] = meta["history"]
    figures = _figures(records, rows + long_rows, nets, histories, out)
    doc = {"study": "learned", "wall_s": time.perf_counter() - t0, "nets": nets, "rows": rows, "long": long_rows,
           "figures": figures, "records": records}
    doc["verdicts"] = verdicts(doc)
    atomic_write_text(out / "results.json", json.dumps(finite(doc), indent=1))
    atomic_write_text(out / "report.md", _report(doc, seeds))
    return doc


def _figures(records: list[dict[str, Any]], rows: list[dict[str, Any]], nets: dict[str, str],
             histories: dict[str, list[list[float]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    tasks = list(dict.fromkeys((r["task"], r["steps"]) for r in records))
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(tasks) / cols), cols, figsize=(16, 3.5 * math.ceil(len(tasks) / cols)),
                             squeeze=False)
    for ax, (task, steps) in zip(axes.flat, tasks):
        row = next((r for r in rows if r["task"] == task and r["steps"] == steps), None)
        groups = {"AdamW (tuned)": [r for r in records if r["task"] == task and r["steps"] == steps and r["opt"] == "adamw"
                                    and row is not None and r["lr"] == row["adamw_lr"]]}
        for label, path in nets.items():
            groups[label] = [r for r in records if r["task"] == task and r["steps"] == steps and r["opt"] == path]
        for idx, (label, rs) in enumerate(groups.items()):
            for k, r in enumerate(rs):
                ax.plot(r["curve"]["step"], r["curve"]["val_loss"], lw=0.8, alpha=0.7, color=f"C{idx}",
                        label=label if k == 0 else None)
        if row is not None:
            ax.axhline(row["target"], color="k", ls="--", lw=0.7)
        ax.set_yscale("log")
        ax.set_title(f"{task} ({steps} steps)", fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("held-out tasks: validation loss (each seed; dashed: tuned AdamW's target)")
    fig.tight_layout()
    atomic_savefig(fig, out / "heldout_curves.png", dpi=100)
    plt.close(fig)
    files.append("heldout_curves.png")
    if histories:
        fig, ax = plt.subplots(figsize=(8, 4))
        for label, hist in histories.items():
            xs = [h[0] for h in hist]
            ys = [h[1] for h in hist]
            k = 10
            smooth = [statistics.fmean(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, label=label)
        ax.set_xlabel("outer step")
        ax.set_ylabel("meta-loss, running mean")
        ax.set_title("meta-training: mean log(L_t / L_0) per truncation (surrogate runs: their own loss)", fontsize=9)
        ax.legend()
        fig.tight_layout()
        atomic_savefig(fig, out / "meta_training.png", dpi=100)
        plt.close(fig)
        files.append("meta_training.png")
    return files


def verdicts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per network: held-out tasks where it beat tuned AdamW, diverged runs, and the verdict
    ("met": faster on at least half with no divergence, "not met", or "reference" for a peer)."""
    out = {}
    for label in doc["nets"]:
        rs = [r for r in doc["rows"] if r["net"] == label]
        faster = sum(r["faster"] for r in rs)
        div = sum(r["diverged"] for r in rs + [x for x in doc["long"] if x["net"] == label])
        verdict = ("reference" if doc["nets"][label].startswith(PEER) else
                   "met" if faster * 2 >= len(rs) and div == 0 else "not met")
        out[label] = {"faster": faster, "tasks": len(rs), "diverged": div, "verdict": verdict}
    return out


def _report(doc: dict[str, Any], seeds: int) -> str:
    L = ["# Learned optimizers on held-out tasks", "",
         f"Command: `nestopt study learned --out DIR` ({doc['wall_s']:.0f} s here). {__doc__.split(chr(10) + chr(10), 1)[1]}",
         "Networks: " + ", ".join(f"`{k}` ({v})" for k, v in doc["nets"].items()), "",
         "| task | steps | net | AdamW lr | AdamW steps | net steps (median) | reached | speedup (90% CI) | diverged |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"] + doc["long"]:
        lo, hi = r["speedup_ci90"]
        L.append(f"| {r['name']} | {r['steps']} | {r['net']} | {r['adamw_lr']:g} | {r['adamw_steps']:.0f} | "
                 f"{r['steps_to_target']:.0f} | {r['reached']}/{r['seeds']} | {r['speedup']:.2f} ({lo:.2f}-{hi:.2f}) | "
                 f"{r['diverged']} |")
    for label, v in doc["verdicts"].items():
        verdict = ("a reference, not a candidate" if v["verdict"] == "reference" else
                   f"Acceptance (faster on at least half, no divergence): **{v['verdict']}**")
        L += ["", f"**{label}**: faster than tuned AdamW (median steps to its target) on {v['faster']} of {v['tasks']} "
              f"held-out tasks; {v['diverged']} diverged runs. {verdict}."]
    L += ["", "A speedup of 0 means the network's median seed never reached the target.", ""]
    L += [f"![{f}]({f})" for f in doc["figures"]]
    return "\n".join(L) + "\n"
