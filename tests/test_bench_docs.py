"""The merge benchmark never damages the checkout: it renders into .bench/, touches the docs only
with --write-docs, and then keeps the sections of geometries it has no results for."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """The tool as in a fresh clone: no .bench/results, the docs as committed (copied)."""
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "BENCH", tmp_path / ".bench")
    monkeypatch.setattr(bench, "DOCS", docs)
    return docs


def _subsection(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + 1)
    return text[start:end]


def test_report_without_write_docs_leaves_the_docs_alone(fresh_clone):
    before = fresh_clone.read_bytes()
    out = bench.render_docs(write=False)
    assert fresh_clone.read_bytes() == before
    assert out.parent == bench.BENCH / "results" and "## Merge benchmark" in out.read_text()


def test_write_docs_keeps_geometries_without_results(fresh_clone):
    before = fresh_clone.read_text()
    assert "### qwen3-4b (" in before and "### qwen3-0.6b (" in before
    bench.render_docs(write=True)
    after = fresh_clone.read_text()
    for g in ("### qwen3-0.6b (", "### qwen3-4b ("):
        assert _subsection(after, g) == _subsection(before, g), g
    for row in [ln for ln in before.splitlines() if ln.startswith(("| qwen3-4b ", "| qwen3-0.6b ", "- `.bench/"))]:
        assert row in after.splitlines(), row
    # the other benchmarks' sections are not this tool's
    for section in ("## Read path", "## Scoring throughput", "## Writer"):
        assert _subsection(after, section) == _subsection(before, section)
    assert "No results yet" not in after
