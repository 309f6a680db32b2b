"""tools/bench_compute_floor.py: it runs, and blends what a linear merge would."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_compute_floor as cf


def test_the_tool_reports_one_and_two_threads_for_a_geometry(capsys):
    assert cf.main(["--geometry", "tiny", "--reps", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" thread")[0].rsplit(" ", 1)[1] for line in lines] == ["1", "2"]
    assert all("ns per element per thread" in line for line in lines)


def test_the_blend_walks_the_sources_as_a_linear_merge_would(monkeypatch):
    """Every block it rounds is 0.6 a + 0.4 b of the block it read (checked on the last one)."""
    seen = []
    real = torch.Tensor.copy_

    def spy(self, src, *a, **k):
        out = real(self, src, *a, **k)
        if self.dtype == torch.bfloat16:
            seen.append(self.clone())
        return out

    n = 2 * cf.INPLACE_BLOCK
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3 * cf.INPLACE_BLOCK, generator=g).to(torch.bfloat16)
    b = torch.randn(3 * cf.INPLACE_BLOCK, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    cf.blend(a, b, n, 0, cf.INPLACE_BLOCK)
    monkeypatch.undo()
    assert len(seen) == 2
    s = cf.INPLACE_BLOCK
    want = (a[s : 2 * s].double() * 0.6 + b[s : 2 * s].double() * 0.4)
    # float32 arithmetic rounded once to bf16: bf16's unit roundoff (2^-8 relative: half an ulp of
    # 2^-7 just above a power of two), plus float32's own rounding (~1e-7 of the inputs) near 0
    assert torch.allclose(seen[-1].double(), want, rtol=2**-8, atol=1e-6)
