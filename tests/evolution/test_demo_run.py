"""`darwin-stream demo`: the shipped manifest, pointed at a work directory, and the verdict it prints."""

from __future__ import annotations

import pytest

from darwin_stream.evolution import demo
from darwin_stream.evolution.report import EvolveReport


def test_the_demo_manifest_points_at_the_work_directory_and_seed(tmp_path):
    p = demo.demo_manifest(tmp_path, seed=7)
    text = p.read_text()
    assert "demo-out/" not in text and f"{tmp_path.as_posix()}/parent_a" in text
    assert "seed: 7}" in text
    from darwin_stream.manifest import parse_manifest

    m = parse_manifest(text)
    assert m.evolve is not None and m.merge_method == "task_arithmetic"
    assert len(m.evolve.genes) == 6


def _result(child: float, best_other: float, n: int) -> demo.DemoResult:
    rows = [("base", {"a": best_other, "b": best_other}, best_other),
            ("evolved child", {"a": child, "b": child}, child)]
    rep = EvolveReport(best_fitness=child, heldout={}, generations=1, evaluations=1, run_dir="r", child_dir="c")
    return demo.DemoResult(rep, rows, child - best_other, 1.0 / n, 0.0)


def test_vigor_needs_more_than_one_item_per_skill():
    assert _result(0.90, 0.88, 100).vigor  # 0.02 > 0.01
    assert not _result(0.90, 0.895, 100).vigor  # 0.005 < 0.01
    assert "no hybrid vigor" in demo.format_table(_result(0.5, 0.5, 10))


def test_evolve_says_which_extra_it_needs(monkeypatch):
    import importlib.util

    from darwin_stream.errors import DarwinError
    from darwin_stream.evolution import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(DarwinError, match=r"\[evolve\]"):
        run.evolve("whatever.yaml", "r")
