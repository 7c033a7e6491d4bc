"""The README's hypergradient example runs as written."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_hypergradient_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Hypergradients\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md#hypergradients", "exec"), namespace)
    assert namespace["info"].iterations >= 1
    assert set(namespace["hg"]) == {"weight", "bias"}
