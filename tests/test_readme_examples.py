"""The examples of the README and of the documentation pages run as written (issue 21).

The documented files are ``README.md`` and every ``docs/*.md`` page (``DOC_FILES``). Every
```python block of them is a complete script: it is saved on its own and run by a fresh
interpreter in an empty folder, with a timeout, so a block that leans on an earlier one, lacks an
import, or hangs fails here. A block whose code is exactly that of an earlier one (the README's
tour repeats two examples of the pages) runs once. A block that cannot stand alone would have to
say so in its fence (```python no-run: <reason>); none does, and at most ``MAX_EXEMPT`` may.

Every ``nestopt ...`` line of their shell blocks is parsed by the real command-line parser
(nothing runs), and the names it gives (study, suite, tasks, optimizers, variants) are checked
against the registries, so the documented commands cannot go stale. The two set-up commands at the
top of the README start with ``pip`` and are checked by ``tests/test_readme.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120          # per block; each takes 3 to 15 s of CPU on 2 cores (the benchmark block the most)
MAX_EXEMPT = 1
NO_RUN = "no-run"
SHELL_INFO = {"", "bash", "sh", "shell", "console"}


@dataclass
class Block:
    info: str                  # the fence's info string ("python", "bash", "python no-run: why", ...)
    line: int                  # line of the opening fence
    heading: str               # the nearest heading above it
    lines: list[str] = field(default_factory=list)
    file: str = "README.md"    # the file, relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def code(self) -> str:
        return "\n".join(self.lines) + "\n"


def fenced_blocks(text: str, file: str = "README.md") -> list[Block]:
    """The fenced blocks of a Markdown text, in order (indented fences, as in a list item, too)."""
    blocks: list[Block] = []
    heading, block, indent = "", None, 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if block is None:
            if stripped.startswith("```"):
                indent = len(line) - len(stripped)
                block = Block(stripped[3:].strip(), n, heading, file=file)
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif stripped.rstrip() == "```":
            blocks.append(block)
            block = None
        else:
            block.lines.append(line[indent:] if not line[:indent].strip() else line)
    assert block is None, f"{file}:{block.line}: a fence that is never closed"
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "top"


def _doc_blocks() -> list[Block]:
    """The fenced blocks of every documented file, file by file."""
    return [b for path in DOC_FILES for b in fenced_blocks(path.read_text(), str(path.relative_to(ROOT)))]


def _python_blocks() -> list[Block]:
    """The python blocks, each distinct code once (the first place it appears)."""
    blocks, seen = [], set()
    for b in _doc_blocks():
        if b.lang == "python" and b.code not in seen:
            seen.add(b.code)
            blocks.append(b)
    return blocks


def _ids(blocks: list[Block]) -> list[str]:
    ids, seen = [], {}
    for b in blocks:
        base = _slug(Path(b.file).stem + " " + b.heading)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


PYTHON_BLOCKS = _python_blocks()


def run_script(code: str, folder: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``code`` as ``folder/example.py`` in a fresh interpreter whose cwd is ``folder``. On a
    timeout the whole process group goes (a hung example's worker processes too)."""
    script = folder / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NESTOPT_")}  # as in a clean shell
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.Popen([sys.executable, script.name], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, None, out, err)  # returncode None: timed out
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_readme_has_python_examples_and_few_exemptions():
    assert len(PYTHON_BLOCKS) >= 8, "the documentation's python blocks were not found"
    exempt = [b for b in PYTHON_BLOCKS if NO_RUN in b.info]
    assert len(exempt) <= MAX_EXEMPT, f"too many blocks are exempt from running: {[b.where for b in exempt]}"
    for b in exempt:
        reason = b.info.split(NO_RUN, 1)[1].strip(" :")
        assert reason, f"{b.where}: a '{NO_RUN}' block must say why (```python {NO_RUN}: <reason>)"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_readme_python_block_runs_as_written(block: Block, tmp_path: Path):
    if NO_RUN in block.info:
        pytest.skip(f"{block.where}: {block.info}")
    result = run_script(block.code, tmp_path)
    where = f"{block.where} (under '{block.heading}')"
    if result.returncode is None:
        pytest.fail(f"{where} did not finish in {TIMEOUT_S} s (a hang?); its stderr ends:\n{result.stderr[-4000:]}")
    if result.returncode != 0:
        pytest.fail(f"{where} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")


def test_a_broken_block_fails(tmp_path: Path):
    """The harness itself: a block that leans on an earlier one (a missing import) fails, and one
    that hangs is stopped at its timeout."""
    polyak = next(b for b in PYTHON_BLOCKS if "from nestopt.optim import Polyak" in b.code)
    broken = polyak.code.replace("from nestopt.optim import Polyak", "from nestopt.optim import Polyak as P")
    result = run_script(broken, tmp_path)
    assert result.returncode not in (0, None) and "NameError" in result.stderr
    result = run_script("import time\ntime.sleep(60)\n", tmp_path, timeout=2)
    assert result.returncode is None


# -- the shell commands ------------------------------------------------------------------------


def _commands() -> list[tuple[str, str]]:
    """(file:line, command) of every line of a shell block that starts with ``nestopt``,
    continuation lines (a trailing backslash) joined."""
    cmds = []
    for b in _doc_blocks():
        if b.lang not in SHELL_INFO:
            continue
        pending, start = "", 0
        for i, line in enumerate(b.lines, b.line + 1):
            if not pending and not line.strip().startswith("nestopt "):
                continue
            start = start or i
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            cmds.append((f"{b.file}:{start}", pending))
            pending, start = "", 0
        assert not pending, f"{b.file}:{start}: a command ends with a line continuation"
    return cmds


COMMANDS = _commands()


def test_readme_has_commands():
    assert len(COMMANDS) >= 10, "the documentation's nestopt commands were not found"


def _check_names(line: str, flag: str, value: str, valid: list[str]) -> None:
    for name in (v.strip() for v in value.split(",")):
        assert name in valid, f"{line}: {flag} names {name!r}, which does not exist; valid: {', '.join(valid)}"


@pytest.mark.parametrize(("line", "command"), COMMANDS, ids=[" ".join(shlex.split(c, comments=True)) for _, c in COMMANDS])
def test_readme_command_is_accepted_by_the_parser(line: str, command: str):
    from nestopt import cli
    from nestopt import tasks as task_registry
    from nestopt.bench import SUITES
    from nestopt.bench import registry as opt_registry
    from nestopt.studies import registry as studies

    argv = shlex.split(command, comments=True)
    assert argv[0] == "nestopt"
    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except (cli.UsageError, SystemExit) as e:
        pytest.fail(f"{line}: {command!r} is refused by the parser: {e}")
    # argparse takes an unambiguous prefix (--suit for --suite); the docs spell options out
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[1]]
    flags = {s for a in sub._actions for s in a.option_strings}
    for token in argv[2:]:
        if token.startswith("--"):
            assert token.split("=")[0] in flags, f"{line}: {argv[1]} has no option {token} (spelled out)"
    optimizers = opt_registry.names(available_only=False)
    if getattr(args, "suite", None) is not None:
        _check_names(line, "--suite", args.suite, list(SUITES))
    if getattr(args, "tasks", None) is not None:
        _check_names(line, "--tasks", args.tasks, task_registry.names())
    if getattr(args, "optimizers", None) is not None:
        _check_names(line, "--optimizers", args.optimizers, optimizers)
    if args.command == "study":
        _check_names(line, "study", args.name, studies.names())
        study = studies.get(args.name)
        given = [a for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in ("--out", "--force")]
        for flag in given:
            assert flag.split("=")[0] in study.flags, f"{line}: study {args.name} has no option {flag}"
        for peer in getattr(args, "peer", None) or []:
            _check_names(line, "--peer", peer, optimizers)
        if getattr(args, "variant", None):
            from nestopt.studies.controller import VARIANTS

            for v in args.variant:
                assert v in VARIANTS, f"{line}: --variant {v!r} does not exist; valid: {list(VARIANTS)}"
