"""The README's two set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "nestopt bench --suite quick" in cmds[0]
    assert "pytest" in cmds[1] and ".[dev]" in cmds[1]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    install_bench, install_test = _readme_commands()
    assert install_test in ci
    assert install_bench.replace("bench-out", '"$out"') in ci


def test_readme_has_no_unfilled_placeholders():
    text = (ROOT / "README.md").read_text()
    assert "_RESULTS" not in text
