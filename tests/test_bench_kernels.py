"""tools/bench_kernels.py times what the engine runs and compares old and new children by their bits."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench_kernels  # noqa: E402


def test_a_method_is_timed_in_the_engines_blocks_and_digested():
    r = bench_kernels.time_method("ties", (96, 64), reps=1)
    assert r["block_rows"] == 96  # a small tensor is one block under 256 MiB
    assert r["statistic_s"] > 0 and r["blend_s"] > 0
    again = bench_kernels.time_method("ties", (96, 64), reps=1)
    assert again["digest"] == r["digest"]  # the same child: what "same bits" compares
    other = bench_kernels.time_method("dare_ties", (96, 64), reps=1)
    assert other["digest"] != r["digest"]


def test_against_extracts_a_commit_and_times_it_in_a_subprocess(tmp_path):
    src = bench_kernels._extract("HEAD", tmp_path)
    assert (src / "darwin_stream" / "methods" / "gta.py").exists()
    old = bench_kernels._run_other(src, "dare_linear", 1)
    assert [r["shape"] for r in old] == [list(s) for s in bench_kernels.SHAPES]
    table = bench_kernels._table(old, old, "HEAD")
    assert "| dare_linear | 3072x1024 |" in table and "1.0x | yes |" in table
