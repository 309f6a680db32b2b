"""sce: Select (top-variance elements), Calculate (per-model weights), Erase (sign conflicts), then
merge the task vectors (mergekit 0.1.5, arXiv:2408.07990).

    d_i      = x_i - b, masked to the `select_topk` fraction of elements (among those whose variance
               across the models is non-zero) with the largest variance across the models
    w_i      = mean(d_i²) / sum_j mean(d_j²)            (1/n each when that sum is below 1e-6)
    keep_i   = sign(d_i) == sign(sum_j d_j)             (sum >= 0 counts as +; zeros never agree)
    out      = b + sum_i w_i keep_i d_i / max(sum_i w_i keep_i, 1e-6)

Tensor-wide numbers, streamed: the selection is an exact radix select over the variance's float32
bit patterns (2 passes; the variance is >= 0, so its bits order like its values) that keeps exactly
mergekit's k elements, ties at the threshold taken in flat order (1 pass of per-row tie counts,
select.Window), then one pass sums each masked task vector's squares in float64. Without
selection, only that last pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from darwin_stream.methods.contract import (
    BasePolicy,
    Chunk,
    MergeMethod,
    Params,
    Statistic,
    doc_summary,
    param,
)
from darwin_stream.methods.gta import INT8_MASK
from darwin_stream.methods.masks import apply_mask
from darwin_stream.methods.reduce import sum_tree
from darwin_stream.methods.select import (
    Located,
    Members,
    RadixSelect,
    RowCounts,
    Window,
    bin_members,
    combine_members,
    combine_rows,
    gathers,
    hi_histogram,
    lo_histogram,
    magnitude_keys,
    make_window,
    members_histograms,
    members_prefixes,
    row_counts,
    window_ranks,
    with_prefixes,
)

WEIGHT_FLOOR = 1e-6  # mergekit: weights sum below this -> equal weights; divisor clamped to this


class Stage(enum.Enum):
    """What a pass of sce's statistic gathers."""

    COUNTS = "counts"  # top-bin histogram of the variance keys
    LOW = "low"  # low-bit histograms inside the threshold's bin
    TIES = "ties"  # per-row counts of the elements tied at the threshold, when only some are kept
    SQUARES = "squares"  # float64 sums of each selected task vector's squares


@dataclass(frozen=True)
class _Counts:
    counts: torch.Tensor
    zeros: torch.Tensor
    topk: float


@dataclass(frozen=True)
class _Low:
    lo: dict[int, torch.Tensor]
    members: dict[int, Members] | None = None  # the bins' elements, where gathered (select.Members)


@dataclass(frozen=True)
class _Squares:
    squares: torch.Tensor
    numel: int


@dataclass(frozen=True)
class SceState:
    """The statistic's state: the next pass, then the selection window (exactly mergekit's k
    elements), then the per-model weights. `take` 0: nothing is selected."""

    next: Stage
    take: int = 0
    counts: torch.Tensor | None = None
    located: tuple[Located | None, ...] = ()
    window: Window | None = None
    weights: tuple[float, ...] | None = None
    gather: bool = False  # the LOW pass gathers the threshold bin's elements: TIES then reads nothing


def _topk(params: Params) -> float:
    return float(params.get("select_topk", 1.0))


def _deltas(chunk: Chunk) -> list[torch.Tensor]:
    if chunk.base is None:
        raise ValueError("sce needs a base model")
    return [m - chunk.base for m in chunk.models]


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise population variance across models, bit for bit mergekit's
    `torch.var(stack, dim=0, unbiased=False)` in float32.

    torch reduces a short dim with Welford's recurrence in float64, one element at a time, then
    rounds to float32; these are the same float64 operations, elementwise over the models: 4 ns an
    element instead of 130 (two models, one thread), where torch.var was 88% of sce's time."""
    mean = deltas[0].to(torch.float64, copy=True)
    m2 = torch.zeros_like(mean)
    for k, d in enumerate(deltas[1:], 2):
        x = d.to(torch.float64, copy=True)
        delta = x - mean
        mean += delta / k
        m2 += delta * x.sub_(mean)
    return (m2 / len(deltas)).to(torch.float32)


def variance_keys(deltas: list[torch.Tensor]) -> torch.Tensor:
    """int32 keys ordered like the elementwise population variance across models (mergekit's torch.var)."""
    return magnitude_keys(variance(deltas))


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return 4 if 0 < _topk(params) < 1 else 1


def selected(chunk: Chunk, state: SceState | None, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The task vectors after the top-variance selection (`deltas`, overwritten)."""
    topk = _topk(chunk.params)
    if topk >= 1:
        return deltas
    if topk <= 0 or (state is not None and state.take == 0):
        return [torch.zeros_like(d) for d in deltas]
    assert state is not None and state.window is not None
    keep = state.window.keep(variance_keys(deltas), chunk.offset, _row_elems(chunk.shape))
    return [apply_mask(d, keep) for d in deltas]  # a dropped negative delta is -0.0, which sums as +0.0


def _stage(chunk: Chunk, state: SceState | None) -> Stage:
    if state is None:
        return Stage.COUNTS if 0 < _topk(chunk.params) < 1 else Stage.SQUARES
    return state.next


def _row_elems(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _partial(chunk: Chunk, state: SceState | None) -> _Counts | _Low | RowCounts | _Squares | None:
    stage = _stage(chunk, state)
    if stage is Stage.COUNTS:
        keys = variance_keys(_deltas(chunk))
        counts, _ = hi_histogram(keys, with_sums=False)
        return _Counts(counts, (keys == 0).sum(), _topk(chunk.params))
    if stage is Stage.LOW:
        assert state is not None
        keys = variance_keys(_deltas(chunk))
        bins = RadixSelect.bins(state.located)
        if state.gather:
            row_elems = _row_elems(chunk.shape)
            total_rows = max(chunk.numel, 1) // max(row_elems, 1)
            return _Low({}, bin_members(keys, bins, chunk.offset, row_elems, total_rows))
        return _Low({b: lo_histogram(keys, b) for b in bins})
    if stage is Stage.TIES:
        assert state is not None
        w = state.window
        if w is None or not w.split or w.ranked:
            return None
        return row_counts(variance_keys(_deltas(chunk)), w, chunk.offset, _row_elems(chunk.shape))
    sq = torch.stack([(d.to(torch.float64) ** 2).sum() for d in selected(chunk, state, _deltas(chunk))])
    return _Squares(sq, chunk.numel)


def _combine(parts: list) -> _Counts | _Low | RowCounts | _Squares | None:
    if parts[0] is None:
        return None
    if isinstance(parts[0], _Low) and parts[0].members is not None:
        return _Low({}, combine_members([p.members for p in parts]))
    return combine_rows(parts) if isinstance(parts[0], RowCounts) else sum_tree(parts)


def _finish(combined: _Counts | _Low | RowCounts | _Squares | None, state: SceState | None) -> SceState:
    if isinstance(combined, _Counts):
        nonzero = int(combined.counts.sum()) - int(combined.zeros)
        # mergekit: int(count_nonzero(var) * density), the product a float32 tensor
        k = int(torch.tensor(nonzero) * combined.topk)
        located = tuple(RadixSelect.first(combined.counts, window_ranks(0, k))) if k > 0 else ()
        gather = gathers(combined.counts, RadixSelect.bins(located))
        return SceState(Stage.LOW, take=k, counts=combined.counts, located=located, gather=gather)
    assert state is not None or isinstance(combined, _Squares)
    if isinstance(combined, _Low):
        assert state is not None
        lo = combined.lo if combined.members is None else members_histograms(combined.members)
        window = make_window(0, state.take, state.counts, state.located, lo) if state.take > 0 else None
        if window is not None and combined.members is not None:
            window = members_prefixes(window, combined.members)
        return replace(state, next=Stage.TIES, window=window, counts=None)
    if state is not None and state.next is Stage.TIES:
        window = with_prefixes(state.window, combined) if isinstance(combined, RowCounts) and state.window else state.window
        return replace(state, next=Stage.SQUARES, window=window)
    assert isinstance(combined, _Squares)
    means = combined.squares / max(int(combined.numel), 1)
    total = float(means.sum())
    n = means.numel()
    weights = [1.0 / n] * n if abs(total) < WEIGHT_FLOOR else [float(m) / total for m in means]
    return replace(state or SceState(Stage.SQUARES), weights=tuple(weights))


def blend(chunk: Chunk, state: SceState | None) -> torch.Tensor:
    base = chunk.base
    deltas = _deltas(chunk)
    if not deltas:
        assert base is not None
        return base.clone()
    if state is None or state.weights is None:
        raise ValueError("sce needs its statistic state")
    deltas = selected(chunk, state, deltas)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    # The sign election without comparisons or selects, as gta._consensus: S = +-1 the sign of the
    # sum (+ where it is 0), relu(S d) is |d| where d agrees, and S times the sum of the agreeing
    # |d| w is the sum of the agreeing d w, rounding for rounding; + 0.0 makes an empty sum +0.0.
    sign = torch.ones_like(total).copysign_(total)
    del total
    merged = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for d, w in zip(deltas, state.weights, strict=True):
        agreeing = d.mul_(sign).clamp_(min=0)
        merged += agreeing * w
        divisor.add_(agreeing.sign_(), alpha=w)  # 1 * w is exact: no rounding in the product
    assert base is not None
    merged.mul_(sign).add_(0.0)
    return merged.div_(divisor.clamp_(min=WEIGHT_FLOOR)).add_(base)


SCE = MergeMethod(
    name="sce",
    summary=doc_summary(__doc__, "sce"),
    blend=blend,
    statistic=Statistic(passes=_passes, partial=_partial, combine=_combine, finish=_finish),
    base=BasePolicy.REQUIRED,
    parameters=(INT8_MASK, param("select_topk", 1.0, "fraction of the elements, by variance across the models, kept")),
)
