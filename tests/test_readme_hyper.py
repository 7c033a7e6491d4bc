"""The hypergradient and games examples of the docs (``docs/hypergradients.md``, ``docs/games.md``) run as written."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_example(page: str, heading: str) -> dict:
    """Execute the first python block under ``heading`` (the page's title) of ``docs/page`` and
    return its namespace."""
    section = (ROOT / "docs" / page).read_text().split(f"# {heading}\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, f"docs/{page}#{heading}", "exec"), namespace)
    return namespace


def test_readme_hypergradient_example_runs():
    namespace = _run_example("hypergradients.md", "Hypergradients")
    assert namespace["info"].iterations >= 1
    assert set(namespace["hg"]) == {"weight", "bias"}


def test_readme_games_example_runs():
    assert _run_example("games.md", "Complex momentum and games")["history"][-1]["distance"] < 1e-10
