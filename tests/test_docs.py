"""The README and the documentation: every number comes from a stored result.

- every generated block is exactly what its renderer makes of the stored result (a changed result,
  or a hand edit inside a block, fails here: run ``nestopt report --docs``);
- no number outside a generated block is typed by hand (code, citations and list markers aside);
- every stored result was made by its record's command, and every block names a known renderer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nestopt.report.blocks import blocks, doc_files, hand_typed, render_all
from nestopt.report.published import RECORDS
from nestopt.report.render import names
from nestopt.report.store import read_json, results_dir, stored

ROOT = Path(__file__).resolve().parent.parent
FILES = doc_files(ROOT)


def test_the_docs_exist():
    rel = {str(p.relative_to(ROOT)) for p in FILES}
    assert {"README.md", "docs/index.md"} <= rel


def test_every_generated_block_matches_what_its_result_renders():
    changed = render_all(ROOT, write=False)
    assert changed == [], f"blocks that differ from their results (run `nestopt report --docs`): {changed}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_number_is_typed_by_hand(path):
    found = hand_typed(path.read_text())
    assert found == [], f"{path.relative_to(ROOT)}: numbers outside generated blocks: {found[:20]}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_names_a_renderer(path):
    known = set(names())
    unknown = [n for n, _, _ in blocks(path.read_text()) if n not in known]
    assert unknown == []


def test_every_published_result_is_cited_and_every_stored_one_is_published():
    from nestopt.report.render import RENDERERS

    placed = {n for p in FILES for n, _, _ in blocks(p.read_text())} - {"summary.latest"}
    cited = {k for n in placed for k in ((RENDERERS[n][0],) if isinstance(RENDERERS[n][0], str) else RENDERERS[n][0])}
    assert set(RECORDS) <= cited, f"published but cited nowhere: {set(RECORDS) - cited}"
    assert set(stored(ROOT)) <= set(RECORDS)


@pytest.mark.parametrize("key", stored(ROOT))
def test_a_stored_result_came_from_its_records_command(key):
    prov = read_json(results_dir(ROOT) / key / "provenance.json")
    assert prov["key"] == key and prov["command"] == RECORDS[key].command()
    assert len(prov["code_hash"]) == 16 and prov["files"]
