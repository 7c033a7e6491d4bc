"""An optimizer's ``telemetry()`` to TensorBoard and CSV, from a plain PyTorch loop.

    from torch.utils.tensorboard import SummaryWriter
    from nestopt.integrations.telemetry import TelemetryWriter

    log = TelemetryWriter("runs/polyak", csv="runs/polyak/telemetry.csv")
    for step in range(steps):
        ...
        opt.step(closure)
        log.write(opt, step)            # nestopt/eta, nestopt/steps, ... (and a guard's, a dict's)
    log.close()

TensorBoard scalars are named ``{prefix}/{name}``; the CSV file has one row per value
(``step,name,value``), so names that appear later (a hindsight label after the first replay) need
no new column. Nothing is read from the optimizer but its ``telemetry()``, when ``write`` is called.
"""

from __future__ import annotations

import csv as _csv_module
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def values_of(source: Any) -> dict[str, float]:
    """``source.telemetry()`` (a nestopt optimizer, a ``TrainingGuard``), or a mapping of numbers."""
    if hasattr(source, "telemetry") and callable(source.telemetry):
        return dict(source.telemetry())
    if isinstance(source, Mapping):
        return {str(k): float(v) for k, v in source.items()}
    raise TypeError(f"source={type(source).__name__} is invalid: expected an object with telemetry() (every nestopt "
                    "optimizer, a TrainingGuard) or a mapping of names to numbers")


class TelemetryWriter:
    """Writes telemetry to a TensorBoard event file (``log_dir``, or a ``writer`` you already
    have) and/or a CSV file (``csv``). At least one of them is needed."""

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None, csv: str | Path | None = None,
                 prefix: str = "nestopt") -> None:
        if log_dir is not None and writer is not None:
            raise ValueError("log_dir and writer are both given: pass one (a SummaryWriter already has its folder)")
        if log_dir is None and writer is None and csv is None:
            raise ValueError("TelemetryWriter needs somewhere to write: log_dir (TensorBoard), writer or csv")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix={prefix!r} is invalid: expected a string")
        self.prefix = prefix.rstrip("/")
        self._own = False
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                raise ImportError("TelemetryWriter(log_dir=...) writes TensorBoard event files, which needs the "
                                  "tensorboard package: pip install 'nestopt[integrations]' (or pass csv=)") from e
            writer = SummaryWriter(str(log_dir))
            self._own = True
        self.writer = writer
        self._csv_file = None
        self._csv = None
        if csv is not None:
            path = Path(csv)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists() or path.stat().st_size == 0
            self._csv_file = path.open("a", newline="")
            self._csv = _csv_module.writer(self._csv_file)  # (the module under another name: csv= is an argument)
            if new:
                self._csv.writerow(["step", "name", "value"])

    def write(self, source: Any, step: int) -> dict[str, float]:
        """Write ``source``'s telemetry at ``step``; returns the values written (non-finite ones are
        written as they are: a NaN on a chart is what happened)."""
        if not (isinstance(step, int) and step >= 0):
            raise ValueError(f"step={step!r} is invalid: expected a non-negative int")
        vals = values_of(source)
        for name, v in vals.items():
            tag = f"{self.prefix}/{name}" if self.prefix else name
            if self.writer is not None:
                self.writer.add_scalar(tag, v, step)
            if self._csv is not None:
                self._csv.writerow([step, tag, repr(v) if math.isfinite(v) else str(v)])
        if self._csv_file is not None:
            self._csv_file.flush()
        return vals

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self._csv_file is not None:
            self._csv_file.flush()

    def close(self) -> None:
        """Flush and close what this writer opened (a ``writer`` you passed stays open)."""
        if self.writer is not None:
            self.writer.flush()
            if self._own:
                self.writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = self._csv = None

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

