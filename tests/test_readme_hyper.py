"""The README's hypergradient and games examples run as written."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_example(heading: str) -> dict:
    """Execute the first python block under ``heading`` and return its namespace."""
    section = (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, f"README.md#{heading}", "exec"), namespace)
    return namespace


def test_readme_hypergradient_example_runs():
    namespace = _run_example("Hypergradients")
    assert namespace["info"].iterations >= 1
    assert set(namespace["hg"]) == {"weight", "bias"}


def test_readme_games_example_runs():
    assert _run_example("Complex momentum and games")["history"][-1]["distance"] < 1e-10
