"""The schema of ``results.json``, and a validator that needs no extra package.

Top level (all keys required)::

    schema_version  int      1
    created         str      ISO 8601 time of writing
    complete        bool     false when interrupted (Ctrl-C) before every job finished
    environment     object   nestopt, torch and python versions, platform, cores, workers
    config          object   suite, tasks, optimizers, seeds, steps (null = task defaults)
    runs            array    one record per (task, optimizer, lr, seed), below
    summary         object   targets, chosen_lr, table, ratios, profile, scores
                             (see nestopt.bench.scoring for the definitions)

Run record (all keys required; a loss that was not finite, or was not reached, is null)::

    task, optimizer        str
    lr                     number   learning rate of this run
    seed, steps            int      seed; step budget
    final_train_loss       number|null  mean minibatch loss over the last evaluation interval
    final_val_loss         number|null  validation loss after the last step (null if diverged)
    best_val_loss          number|null  lowest validation loss seen
    final_val_accuracy     number|null  where the task has an accuracy
    steps_to_target        int|null     first evaluated step at or below the task's target
    time_to_target_s       number|null  training seconds to that step
    ms_per_step            number       mean training-step wall time (forward, backward, step)
    diverged               bool         a non-finite loss or a validation loss 100x its start
    diverged_step          int|null
    steps_done, wall_s     int, number
    error                  str|null     what the optimizer raised, if it did (run counted diverged)
    nonfinite_params       bool         a parameter ended NaN or infinite
    metrics                object       the task's other final validation metrics (AUCs, ...)
    curve                  object       arrays step, train_loss, val_loss, time_s (same length)
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
NUM = (int, float)
TOP = {"schema_version": int, "created": str, "complete": bool, "environment": dict, "config": dict,
       "runs": list, "summary": dict}
RUN = {"task": str, "optimizer": str, "lr": NUM, "seed": int, "steps": int,
       "final_train_loss": (*NUM, type(None)), "final_val_loss": (*NUM, type(None)),
       "best_val_loss": (*NUM, type(None)), "final_val_accuracy": (*NUM, type(None)),
       "steps_to_target": (int, type(None)), "time_to_target_s": (*NUM, type(None)),
       "ms_per_step": NUM, "diverged": bool, "diverged_step": (int, type(None)), "steps_done": int,
       "wall_s": NUM, "error": (str, type(None)), "nonfinite_params": bool, "metrics": dict, "curve": dict}
CURVE = ("step", "train_loss", "val_loss", "time_s")
SUMMARY = ("targets", "chosen_lr", "table", "ratios", "profile", "scores")


def validate(doc: Any) -> list[str]:
    """Every way ``doc`` departs from the schema (an empty list when it conforms)."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        return ["top level: expected an object"]
    _fields(doc, TOP, "top level", errors)
    if doc.get("schema_version") not in (None, SCHEMA_VERSION):
        errors.append(f"schema_version: expected {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    for i, run in enumerate(doc.get("runs") or []):
        where = f"runs[{i}]"
        if not isinstance(run, dict):
            errors.append(f"{where}: expected an object")
            continue
        _fields(run, RUN, where, errors)
        curve = run.get("curve")
        if isinstance(curve, dict):
            lengths = {k: len(curve.get(k) or []) for k in CURVE}
            missing = [k for k in CURVE if not isinstance(curve.get(k), list)]
            if missing:
                errors.append(f"{where}.curve: missing arrays {missing}")
            elif len(set(lengths.values())) != 1:
                errors.append(f"{where}.curve: arrays differ in length {lengths}")
    summary = doc.get("summary")
    if isinstance(summary, dict):
        errors += [f"summary: missing key {k!r}" for k in SUMMARY if k not in summary]
    return errors


def _fields(obj: dict, spec: dict, where: str, errors: list[str]) -> None:
    for key, types in spec.items():
        if key not in obj:
            errors.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            errors.append(f"{where}.{key}: expected {types}, got bool")
        elif not isinstance(obj[key], types):
            errors.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
