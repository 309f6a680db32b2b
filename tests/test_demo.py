"""The README's first command: `darwin-stream demo` trains, evolves, and shows hybrid vigor, measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KEYS = {"best_fitness", "heldout", "generations", "evaluations", "run_dir", "child_dir"}


def _demo(work: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "darwin_stream.cli", "demo", "--workdir", str(work), "--json"],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("demo") / "demo-out"
    return work, _demo(work)


def test_the_evolved_child_beats_base_parents_and_the_50_50_merge(demo_run):
    """Hybrid vigor on the held-out split, by more than one item per skill (issue 14, section 4)."""
    work, report = demo_run
    assert set(report) >= KEYS
    h = report["heldout"]
    n = sum(1 for line in (work / "tasks" / "heldout" / "skill_a.jsonl").read_text().splitlines()[1:] if line)
    others = [h["base"], h["linear_50_50"], *h["parents"].values()]
    assert len(h["parents"]) == 2
    assert h["child"] - max(others) > 1 / n, h
    assert report["evaluations"] == 96 and report["generations"] == 12
    assert Path(report["child_dir"], "README.md").read_text().count("Held-out split") == 1


def test_a_second_demo_reuses_the_build_and_the_run(demo_run):
    work, first = demo_run
    stamp = (work / "base" / "config.json").stat().st_mtime_ns
    again = _demo(work)
    assert (work / "base" / "config.json").stat().st_mtime_ns == stamp  # not retrained
    assert again["scored_evaluations"] == 0  # the finished run was resumed, not searched again
    assert again["heldout"] == first["heldout"] and again["best_fitness"] == first["best_fitness"]
