"""Gathered input rows: an input whose rows are other rows of its parents (plan.types.RowRun).

A child whose vocabulary is not its parents' (tokenizer_source: union, a token re-embedded from
another model) needs, for each parent, that parent's embedding and lm_head rows in the child's
token order, with rows the parent lacks filled by mergekit's rule. The planner writes this as runs;
here a task assembles its rows [start, stop) from them, one run at a time, so that a task holds
its own rows and never the whole matrix (a 151k-token Qwen embedding is 1.2 GiB in float32).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from darwin_stream.plan.types import RowRun

# (parent key, tensor, first row, stop row) -> those rows as stored (zero-copy for local shards)
ReadRows = Callable[[str, str, int, int], torch.Tensor]

MEAN_BLOCK_BYTES = 2**20  # float32 rows gathered at a time for a padding mean: small beside any task
_MEANS_KEPT = 16  # padding means remembered per process (one per vocabulary input of a plan)
_means: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
_means_lock = threading.Lock()


def needs_float32(runs: tuple[RowRun, ...], dtype_of: Callable[[str, str], torch.dtype], stored: torch.dtype) -> bool:
    """Whether the gathered rows are held in float32: a run that averages, or a term stored in
    another dtype, cannot be copied into the parent's own dtype without rounding."""
    return any(g.mean or len(g.terms) > 1 or any(dtype_of(p, t) != stored for p, t, _ in g.terms) for g in runs)


def padding_mean(runs: tuple[RowRun, ...], rows: int, row_shape: tuple[int, ...], read: ReadRows,
                 key: Hashable | None = None) -> torch.Tensor:
    """The mean of the gathered rows [0, rows), in float32 (summed in float64), for padding rows.

    mergekit pads a vocabulary to `pad_to_multiple_of` with the mean of each model's re-indexed
    embedding (torch.mean over the real tokens' rows). Only the tasks holding the last rows need
    it, so it is computed there, `MEAN_BLOCK_BYTES` of rows at a time (a 151k x 1024 embedding is
    593 such reads, with 4 MiB held at most), and kept per process under `key` (which the engine
    makes from the parents' specs and the runs) so that the lm_head's and a cluster worker's
    other tasks do not read it again.
    """
    if key is not None:
        with _means_lock:
            if key in _means:
                _means.move_to_end(key)
                return _means[key]
    per_row = 4
    for s in row_shape:
        per_row *= s
    step = max(1, MEAN_BLOCK_BYTES // max(per_row, 1))
    acc = torch.zeros(row_shape, dtype=torch.float64)
    for r0 in range(0, rows, step):
        block = gather(runs, r0, min(r0 + step, rows), row_shape, torch.float32, read)
        acc += block.sum(dim=0, dtype=torch.float64)
    mean = (acc / max(rows, 1)).to(torch.float32)
    if key is not None:
        with _means_lock:
            _means[key] = mean
            while len(_means) > _MEANS_KEPT:
                _means.popitem(last=False)
    return mean


def gather(runs: tuple[RowRun, ...], start: int, stop: int, row_shape: tuple[int, ...], dtype: torch.dtype,
           read: ReadRows, mean_key: Hashable | None = None) -> torch.Tensor:
    """Rows [start, stop) of a gathered input, as a new tensor of `dtype`; `mean_key` names the
    input for the padding mean's cache (`padding_mean`)."""
    out = torch.empty((stop - start, *row_shape), dtype=dtype)
    i = max(0, bisect.bisect_right(runs, start, key=lambda g: g.row) - 1)
    while start < stop and i < len(runs):
        g = runs[i]
        lo, hi = max(start, g.row), min(stop, g.row + g.count)
        if lo < hi:
            dst = out[lo - start : hi - start]
            skip = lo - g.row
            if g.mean:
                dst.copy_(padding_mean(runs, g.row, row_shape, read, mean_key).expand_as(dst))
            elif not g.terms:
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
