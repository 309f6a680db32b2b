"""arcee_fusion: take the other model's value only where it matters, by an importance score with a
threshold set by the score's own spread (mergekit 0.1.5).

    importance = |x - b| · KL_row,   KL_row = sum_j p_j log(p_j / q_j) along the last dim,
                 p = softmax(x) + 1e-8, q = softmax(b) + 1e-8 (a 1-D tensor is one row)
    threshold  = median + 1.5 (q3 - q1) of the importance over the whole tensor,
                 the quantile at q being sorted[int(q (n - 1))]
    out        = b + (x - b) · [importance >= threshold]

The quantiles are exact: two radix passes over the importance's float32 bits. mergekit takes them
from a random sample of 10^6 elements (with replacement) when a tensor is larger than that, so
there its threshold is an estimate that changes from run to run; here it is the exact one. A row
of a ≥2-D tensor lies in one block, so its KL is computed there; a 1-D tensor (which blocks may
split) is gathered whole by its one pass, which gives both its KL and its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from darwin_stream.methods.contract import (
    Arity,
    BasePolicy,
    Chunk,
    MergeMethod,
    Params,
    Statistic,
    doc_summary,
)
from darwin_stream.methods.reduce import sum_tree
from darwin_stream.methods.select import (
    Located,
    RadixSelect,
    hi_counts,
    key_value,
    lo_counts,
    ordered_keys,
    quantile_ranks,
)

EPS = 1e-8
QUANTILES = [0.25, 0.5, 0.75]


@dataclass(frozen=True)
class _Whole:
    """A 1-D tensor's rows from `offset` on, gathered whole by its one pass."""

    offset: int
    b: torch.Tensor
    x: torch.Tensor


@dataclass(frozen=True)
class _Counts:
    counts: torch.Tensor


@dataclass(frozen=True)
class _Low:
    lo: dict[int, torch.Tensor]


@dataclass(frozen=True)
class Ranked:
    """After pass 1: the bins of the three quantiles."""

    located: tuple[Located | None, ...]


@dataclass(frozen=True)
class Threshold:
    """The final state: the importance threshold (and a 1-D tensor's KL, computed whole)."""

    threshold: float
    kl: torch.Tensor | None = None


def _pair(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk.base is None or len(chunk.models) != 1:
        raise ValueError("arcee_fusion needs the base model and exactly one other model")
    return chunk.base, chunk.models[0]


def kl_rows(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's per-row KL term, keepdim, in the inputs' dtype."""
    p = torch.softmax(x, dim=-1) + EPS
    q = torch.softmax(b, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(x: torch.Tensor, b: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    return (x - b).abs() * kl


def threshold(q1: float, median: float, q3: float) -> float:
    """median + 1.5 IQR, in float32 as mergekit computes it."""
    t = torch.tensor([q1, median, q3], dtype=torch.float32)
    return float(t[1] + 1.5 * (t[2] - t[0]))


def _one_d(chunk: Chunk) -> bool:
    return len(chunk.shape) <= 1


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return 1 if len(shape) <= 1 else 2


def _partial(chunk: Chunk, state: Ranked | None) -> _Whole | _Counts | _Low:
    b, x = _pair(chunk)
    if _one_d(chunk):
        return _Whole(chunk.offset, b.reshape(-1).clone(), x.reshape(-1).clone())
    keys = ordered_keys(importance(x, b, kl_rows(x, b)))
    if state is None:
        return _Counts(hi_counts(keys))
    return _Low({h: lo_counts(keys, h) for h in RadixSelect.bins(state.located)})


def _combine(parts: Sequence[_Whole | _Counts | _Low]) -> _Whole | _Counts | _Low:
    if isinstance(parts[0], _Whole):
        ordered = sorted(parts, key=lambda p: p.offset)  # type: ignore[union-attr]
        return _Whole(0, torch.cat([p.b for p in ordered]), torch.cat([p.x for p in ordered]))  # type: ignore[union-attr]
    return sum_tree(parts)


def _finish(combined: _Whole | _Counts | _Low, state: Ranked | None) -> Ranked | Threshold:
    if isinstance(combined, _Whole):  # a whole 1-D tensor
        b, x = combined.b, combined.x
        kl = kl_rows(x, b)
        imp = torch.sort(importance(x, b, kl)).values
        idx = (torch.tensor(QUANTILES, dtype=torch.float32) * (imp.numel() - 1)).long()
        q1, med, q3 = (float(v) for v in imp[idx])
        return Threshold(threshold(q1, med, q3), kl)
    if isinstance(combined, _Counts):
        counts = combined.counts
        return Ranked(tuple(RadixSelect.first(counts, quantile_ranks(int(counts.sum()), QUANTILES))))
    assert state is not None
    keys = RadixSelect.second(state.located, combined.lo)
    q1, med, q3 = (key_value(k) for k in keys)
    return Threshold(threshold(q1, med, q3))


def blend(chunk: Chunk, state: Ranked | Threshold | None) -> torch.Tensor:
    b, x = _pair(chunk)
    if not isinstance(state, Threshold):
        raise ValueError("arcee_fusion needs its statistic state")
    kl = state.kl if _one_d(chunk) and state.kl is not None else kl_rows(x, b)
    keep = importance(x, b, kl) >= state.threshold
    return b + (x - b) * keep.to(x.dtype)


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    summary=doc_summary(__doc__, "arcee_fusion"),
    blend=blend,
    statistic=Statistic(passes=_passes, partial=_partial, combine=_combine, finish=_finish),
    base=BasePolicy.REQUIRED,
    arity=Arity(1, 1),
)
