"""Writing outputs so that no finished work is lost (layer 0: the standard library only).

- :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_path`: a file is written
  to a temporary name in its own folder and renamed onto its name (``os.replace``), so a reader
  sees the old file or the new one, never half of one.
- :func:`prepare_out`: an output folder the caller may write: created when missing, refused when
  it holds anything unless the user said so (``--force``, or ``--resume`` for a run that resumes).
- :class:`Staged`: a run's files are written into a hidden folder inside the output folder and
  reach it only when the run completes (:meth:`Staged.commit`: the files of the result before it
  go, so two runs' figures never mix); an interrupted run's files go to ``OUT/partial/`` instead
  (:meth:`Staged.to_partial`), beside the complete result, which stays as it was.
- :func:`save_part`: a long run records each finished part; inside :func:`recording_parts` the
  record is written at once (to ``parts/NAME.json`` of the run's stage), elsewhere it is a no-op.
- :func:`interruptible`: SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` (a
  ``KeyboardInterrupt``) for the block, even in a process a shell started in the background (which
  inherits SIGINT ignored); :func:`deferred_interrupts` holds them back while a block must run
  whole (a commit, a checkpoint and the state it records).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

PARTIAL = "partial"
MANIFEST = ".nestopt-files.json"
STAGE_PREFIX = ".nestopt-stage-"

__all__ = ["MANIFEST", "PARTIAL", "OutputError", "Staged", "Terminated", "atomic_path", "atomic_write_bytes",
           "atomic_savefig", "atomic_write_json", "atomic_write_text", "check_file_target", "deferred_interrupts", "interruptible", "interrupts_handled", "jsonable",
           "prepare_out", "recording_parts", "save_part", "signals_seen"]


class OutputError(ValueError):
    """An output the caller may not write; the message is one line that names the option to add."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` (inside :func:`interruptible`)."""


# -- files ------------------------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    # Same folder (os.replace cannot cross file systems), hidden, and the same suffix: writers that
    # pick a format from the name (matplotlib's savefig) still pick the right one.
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(3)}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block
    ends normally, removed when it raises (``path`` is then as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; return ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, strict: bool = True) -> Path:
    """``obj`` as JSON; with ``strict`` it is first made :func:`jsonable` (non-finite floats as
    ``null``, tensors and arrays as lists), so the file is strict JSON."""
    return atomic_write_text(path, json.dumps(jsonable(obj) if strict else obj, indent=indent, allow_nan=not strict))


def atomic_savefig(fig: Any, path: str | Path, **kw: Any) -> Path:
    """``fig.savefig`` (matplotlib) through a temporary file of the same suffix and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kw)
    return path


def jsonable(x: Any) -> Any:
    """``x`` as strict-JSON values: non-finite floats become ``None``; tuples and sets lists;
    tensors, arrays and numpy scalars their values (``tolist``); dataclasses dicts; anything else
    unknown its ``str``."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


# -- output folders -------------------------------------------------------------------------------

def prepare_out(path: str | Path, *, force: bool, resume: bool = False, flag_hint: str = "--force to replace it",
                option: str = "--out") -> Path:
    """The folder ``path``, created if missing and checked writable. One that holds anything is
    refused (:class:`OutputError`, whose line ends "add ``flag_hint``") unless ``force`` or
    ``resume``; with ``force``, the stages a killed run left behind are removed."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{option} {text!r} is invalid: expected a folder path")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {text!r} is a file: expected a folder (a new or an empty one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nestopt-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{option} {text!r} is not a writable folder: {e.strerror or e}") from None
    entries = sorted(p.name for p in out.iterdir())
    if entries and not (force or resume):
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise OutputError(f"{option} {text!r} is not empty (it holds {shown}): add {flag_hint}")
    if force:
        for name in entries:
            if name.startswith(STAGE_PREFIX) and not _stage_alive(name):
                shutil.rmtree(out / name, ignore_errors=True)
    return out


def _stage_alive(name: str) -> bool:
    """Whether the process that made the stage ``name`` still runs (then it is not stale)."""
    try:
        pid = int(name[len(STAGE_PREFIX):].split("-")[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_file_target(path: str | Path, *, force: bool, option: str, flag_hint: str = "--force to replace it") -> Path:
    """A file the caller will write at the end of its work, checked before the work starts: its
    folder exists and is writable, it is not a folder, and it does not exist (unless ``force``)."""
    text = str(path)
    p = Path(path)
    if not text.strip():
        raise OutputError(f"{option} {text!r} is invalid: expected a file path")
    parent = p.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {text!r} is invalid: its folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {text!r} is invalid: its folder {str(parent)!r} is not writable")
    if p.is_dir():
        raise OutputError(f"{option} {text!r} is invalid: it is a folder; expected a file path")
    if p.exists() and not force:
        raise OutputError(f"{option} {text!r} exists: add {flag_hint}")
    return p


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _swap_dir(src: Path, dest: Path) -> None:
    """Put folder ``src`` at ``dest``, replacing what was there (a rename, then a removal)."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f"{STAGE_PREFIX}{os.getpid()}-old-{secrets.token_hex(3)}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with suppress(OSError):
                old.unlink()


class Staged:
    """The files of one run into ``out``, kept apart until the run ends (see the module docstring).

    ``dir`` is where the run writes its files; ``parts`` where :func:`save_part` writes each
    finished part. ``replaces``: name patterns (``glob``) of the files an older result of the same
    command holds, removed by :meth:`commit` even from a folder without a manifest.
    """

    def __init__(self, out: str | Path, *, replaces: Iterable[str] = ()) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.root = self.out / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = self.root / "files"
        self.parts = self.root / "parts"
        self.dir.mkdir(parents=True)
        self.replaces = tuple(replaces)
        self.started = time.time()

    def commit(self) -> list[str]:
        """The run completed: its files replace the older result's in ``out`` (which are removed,
        so no file of two runs mixes), a stale ``partial/`` goes, and ``out``'s manifest lists the
        new files. Returns their names."""
        with deferred_interrupts():
            new = _files(self.dir)
            old = set()
            manifest = self.out / MANIFEST
            with suppress(OSError, ValueError, TypeError):
                old |= set(json.loads(manifest.read_text())["files"])
            for pattern in self.replaces:
                old |= {str(p.relative_to(self.out)) for p in self.out.glob(pattern) if p.is_file()}
            for name in sorted(old - set(new)):
                target = self.out / name
                if target.is_file() and not name.startswith((STAGE_PREFIX, PARTIAL + os.sep)):
                    with suppress(OSError):
                        target.unlink()
            for name in new:
                (self.out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.dir / name, self.out / name)
            atomic_write_json(manifest, {"files": new, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
            stale = self.out / PARTIAL
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
        return new

    def finished(self) -> bool:
        """Whether the run left anything: a file or a part."""
        return bool(_files(self.dir)) or (self.parts.is_dir() and bool(_files(self.parts)))

    def to_partial(self, status: dict[str, Any] | None = None) -> Path | None:
        """The run stopped early: its files and finished parts become ``out/partial/`` (replacing
        an older ``partial/``), with ``status.json`` saying so; the result in ``out`` is left as it
        was. Returns the folder, or ``None`` (and nothing written) when the run finished nothing."""
        with deferred_interrupts():
            if not self.finished():
                self.discard()
                return None
            if self.parts.is_dir():
                os.replace(self.parts, self.dir / "parts")
            parts = sorted(p.stem for p in (self.dir / "parts").glob("*.json")) if (self.dir / "parts").is_dir() else []
            atomic_write_json(self.dir / "status.json", {
                "complete": False, "parts": parts, "files": _files(self.dir),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "stopped": time.strftime("%Y-%m-%dT%H:%M:%S"), **(status or {})})
            dest = self.out / PARTIAL
            _swap_dir(self.dir, dest)
            shutil.rmtree(self.root, ignore_errors=True)
        return dest

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- finished parts -------------------------------------------------------------------------------

_RECORDERS: list[tuple[Path, Callable[[str], None] | None]] = []


@contextmanager
def recording_parts(folder: str | Path, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """:func:`save_part` writes into ``folder`` in the block (``log`` gets a line per part)."""
    folder = Path(folder)
    _RECORDERS.append((folder, log))
    try:
        yield folder
    finally:
        _RECORDERS.pop()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "part"


def save_part(name: str, record: Any) -> None:
    """A long run finished its part ``name`` and ``record`` holds it: inside
    :func:`recording_parts` it is written at once to ``NAME.json`` (strict JSON, see
    :func:`jsonable`); elsewhere nothing happens."""
    if not _RECORDERS:
        return
    folder, log = _RECORDERS[-1]
    with deferred_interrupts():
        atomic_write_json(folder / f"{_safe(name)}.json", {"part": name, "record": record})
    if log is not None:
        log(name)


# -- signals --------------------------------------------------------------------------------------

_DEFER = 0
_PENDING: list[int] = []
_ACTIVE = 0
_SEEN = [0]
_LAST = [0]


def signals_seen() -> int:
    """How many SIGINT and SIGTERM the :func:`interruptible` handlers have taken so far."""
    return _SEEN[0]


def last_signal() -> int:
    """The last signal the :func:`interruptible` handlers took (0: none)."""
    return _LAST[0]


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated("SIGTERM")
    raise KeyboardInterrupt


def _handler(signum: int, frame: Any) -> None:
    _SEEN[0] += 1
    _LAST[0] = signum
    if _DEFER:
        _PENDING.append(signum)
        return
    _raise_for(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` in the block, whatever
    the dispositions were (a background job starts with SIGINT ignored); they are restored after.
    Outside the main thread (where Python cannot set handlers) the block runs as it is."""
    global _ACTIVE
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _LAST[0] = 0
    for s in before:
        signal.signal(s, _handler)
    _ACTIVE += 1
    try:
        yield
    finally:
        _ACTIVE -= 1
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def interrupts_handled() -> bool:
    """Whether an :func:`interruptible` block is active (its handlers are the ones installed)."""
    return _ACTIVE > 0


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A SIGINT or SIGTERM that arrives in the block is raised when the block ends (inside
    :func:`interruptible`; elsewhere the block runs as it is)."""
    global _DEFER
    _DEFER += 1
    try:
        yield
    finally:
        _DEFER -= 1
        if not _DEFER and _PENDING:
            signum = _PENDING[0]
            _PENDING.clear()
            _raise_for(signum)


# -- loading files a user may hand us -----------------------------------------------------------------
class LoadError(ValueError):
    """A file nestopt will not load; the message (one line) names the file and what is wrong."""


_PLAIN = (str, bytes, int, float, bool, type(None))


def is_plain(obj: Any) -> bool:
    """Whether ``obj`` holds only tensors, numbers, strings, bytes, ``None`` and lists, tuples and
    dicts of them: what ``torch.load(weights_only=True)`` reads back without running any code."""
    import torch

    if isinstance(obj, _PLAIN) or torch.is_tensor(obj) or isinstance(obj, torch.dtype | torch.Size):
        return True
    if isinstance(obj, list | tuple):
        return all(is_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, _PLAIN) and is_plain(v) for k, v in obj.items())
    return False


def safe_load(path: str | Path, *, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, so a
    crafted file cannot run code while it loads. A :class:`LoadError` names the file and says
    whether it is missing, damaged or truncated, or holds other objects (which are not unpickled)."""
    import pickle

    import torch

    name = str(path)
    if not Path(path).is_file():
        raise LoadError(f"{what} {name!r} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if _names_a_global(e):
            raise LoadError(f"{what} {name!r} holds objects other than tensors and plain values; nestopt does not "
                            "unpickle them, because that can run code from the file (a file nestopt wrote holds "
                            "none: this one was written by something else, or altered)") from None
        raise LoadError(f"{what} {name!r} is damaged ({_first(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        raise LoadError(f"{what} {name!r} is damaged or truncated ({_first(e)})") from None


def _names_a_global(e: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused an object (a class or function to import), as
    opposed to bytes that are not a pickle at all."""
    text = str(e)
    return "Unsupported global" in text or "GLOBAL" in text or "not an allowed global" in text


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__
