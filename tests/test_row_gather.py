"""Gathered rows: any row range of a gathered input equals the same rows of the whole, and the
whole equals a float64 reference built row by row from the runs."""

from __future__ import annotations

import torch

from darwin_stream.plan.types import RowRun
from darwin_stream.row_gather import gather, needs_float32

G = torch.Generator().manual_seed(0)
SRC = {("a", "e"): torch.randn(6, 3, generator=G).to(torch.bfloat16),
       ("b", "e"): torch.randn(5, 3, generator=G).to(torch.bfloat16)}
RUNS = (
    RowRun(0, 3, (("a", "e", 2),)),  # a's rows 2..4
    RowRun(3, 2, ()),  # zeros
    RowRun(5, 2, (("a", "e", 0), ("b", "e", 3))),  # mean of a 0..1 and b 3..4
    RowRun(7, 1, (("b", "e", 0),)),
)
reads: list[tuple[str, str, int, int]] = []


def read(p: str, t: str, r0: int, r1: int) -> torch.Tensor:
    reads.append((p, t, r0, r1))
    return SRC[(p, t)][r0:r1]


def reference() -> torch.Tensor:
    rows = []
    for g in RUNS:
        for k in range(g.count):
            terms = [SRC[(p, t)][s + k].double() for p, t, s in g.terms]
            rows.append(sum(terms) / len(terms) if terms else torch.zeros(3, dtype=torch.float64))
    return torch.stack(rows)


def test_whole_matches_the_reference():
    got = gather(RUNS, 0, 8, (3,), torch.float32, read)
    assert torch.allclose(got.double(), reference(), rtol=2**-20, atol=0)


def test_every_row_range_matches_the_whole():
    whole = gather(RUNS, 0, 8, (3,), torch.float32, read)
    for start in range(8):
        for stop in range(start + 1, 9):
            reads.clear()
            part = gather(RUNS, start, stop, (3,), torch.float32, read)
            assert torch.equal(part, whole[start:stop])
            # only the rows asked for are read: never the whole matrix
            assert sum(r1 - r0 for _, _, r0, r1 in reads) <= 2 * (stop - start)


def test_a_copy_keeps_the_stored_dtype_and_a_mean_does_not():
    def dtype_of(p: str, t: str) -> torch.dtype:
        return SRC[(p, t)].dtype

    assert not needs_float32(RUNS[:2] + RUNS[3:], dtype_of, torch.bfloat16)
    assert needs_float32(RUNS, dtype_of, torch.bfloat16)
    assert needs_float32(RUNS[:1], dtype_of, torch.float32)  # a bf16 term in a float32 input
    got = gather(RUNS[:2], 0, 5, (3,), torch.bfloat16, read)
    assert torch.equal(got[:3], SRC[("a", "e")][2:5]) and not got[3:].any()
