"""Gathered input rows: an input whose rows are other rows of its parents (plan.types.RowRun).

A child whose vocabulary is not its parents' (tokenizer_source: union, a token re-embedded from
another model) needs, for each parent, that parent's embedding and lm_head rows in the child's
token order, with rows the parent lacks filled by mergekit's rule. The planner writes this as runs;
here a task assembles its rows [start, stop) from them, one run at a time, so that a task holds
its own rows and never the whole matrix (a 151k-token Qwen embedding is 1.2 GiB in float32).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from darwin_stream.plan.types import RowRun

# (parent key, tensor, first row, stop row) -> those rows as stored (zero-copy for local shards)
ReadRows = Callable[[str, str, int, int], torch.Tensor]


def needs_float32(runs: tuple[RowRun, ...], dtype_of: Callable[[str, str], torch.dtype], stored: torch.dtype) -> bool:
    """Whether the gathered rows are held in float32: a run that averages, or a term stored in
    another dtype, cannot be copied into the parent's own dtype without rounding."""
    return any(len(g.terms) > 1 or any(dtype_of(p, t) != stored for p, t, _ in g.terms) for g in runs)


def gather(runs: tuple[RowRun, ...], start: int, stop: int, row_shape: tuple[int, ...], dtype: torch.dtype,
           read: ReadRows) -> torch.Tensor:
    """Rows [start, stop) of a gathered input, as a new tensor of `dtype`."""
    out = torch.empty((stop - start, *row_shape), dtype=dtype)
    i = max(0, bisect.bisect_right(runs, start, key=lambda g: g.row) - 1)
    while start < stop and i < len(runs):
        g = runs[i]
        lo, hi = max(start, g.row), min(stop, g.row + g.count)
        if lo < hi:
            dst = out[lo - start : hi - start]
            skip = lo - g.row
            if not g.terms:
                dst.zero_()
            elif len(g.terms) == 1:
                p, t, s = g.terms[0]
                dst.copy_(read(p, t, s + skip, s + skip + hi - lo))
            else:
                # mergekit: embed = zeros; embed = embed + row, model by model; embed /= count
                dst.zero_()
                for p, t, s in g.terms:
                    dst.add_(read(p, t, s + skip, s + skip + hi - lo))
                dst.div_(len(g.terms))
        if g.row + g.count >= stop:
            break
        i += 1
    return out
