"""della / della_linear: DELLA's MagPrune drop, then task arithmetic with (della) or without
(della_linear) the ties sign consensus (mergekit 0.1.5, arXiv:2406.11617).

MagPrune keeps each element of a task vector with a probability that grows with its magnitude rank
inside its row (along dim 1; a 1-D tensor is one row): `p = (density - epsilon) + 2 epsilon ·
(rank - 1)/(m - 1)` for ranks 1..m, smallest magnitude first. mergekit then rescales the whole
pruned tensor to the L1 norm it had (with `rescale`), not each element by 1/p.

A row of a 2-D tensor lies inside one block, so its ranks are computed there (a stable sort: equal
magnitudes rank by position, where mergekit's argsort picks any order). A 1-D tensor may be split
across blocks: a first pass gathers its magnitude keys, and ranks come from the sorted keys. The
L1 rescale needs both norms of the whole tensor: one more pass. The draw is the same counter-based
hash of (seed, model, flat index) as DARE's, so a child does not depend on chunking.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from darwin_stream.methods.breeding import TASK_VECTOR
from darwin_stream.methods.contract import (
    BasePolicy,
    Chunk,
    MergeMethod,
    Params,
    Statistic,
    doc_summary,
    param,
)
from darwin_stream.methods.gta import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    RESCALE_EPS,
    WEIGHT,
    gta_blend,
    normalize_param,
    rescale_param,
)
from darwin_stream.methods.masks import apply_mask, uniform_u32
from darwin_stream.methods.select import magnitude_keys


@dataclass(frozen=True)
class _Part:
    """A pass's partial: per model, a 1-D tensor's magnitude keys (`gather`) or its two L1 norms."""

    gather: bool
    models: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class MagPrune:
    """The state: per model, a 1-D tensor's sorted keys (ranks), and the L1 rescale once known."""

    sorted: tuple[torch.Tensor | None, ...]
    scale: tuple[float, ...] | None = None


def _check(density: float, epsilon: float) -> None:
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"della: epsilon {epsilon} must keep density {density} +/- epsilon inside (0, 1)")


def _pruned(mp: Params) -> bool:
    return float(mp.get("density", 1.0)) < 1


def _delta(chunk: Chunk, i: int) -> torch.Tensor:
    if chunk.base is None:
        raise ValueError("della needs a base model")
    return chunk.models[i] - chunk.base


def _composite(keys: torch.Tensor, offset: int) -> torch.Tensor:
    """int64 keys unique per element, ordered by magnitude, then by flat position."""
    idx = torch.arange(offset, offset + keys.numel(), dtype=torch.int64)
    return (keys.reshape(-1).to(torch.int64) << 32) | idx


def rank_thresholds(m: int, density: float, epsilon: float) -> torch.Tensor:
    """int64 `t[r - 1]` for ranks r = 1..m: a draw u (32 bits) keeps an element of rank r iff u < t.

    mergekit's keep probability, in its float32 arithmetic: `((rank - min) / (max - min)).clamp(0, 1)
    * 2 eps + (d - eps)`; the draw keeps where `u < p * 2^32`, which for an integer u is `u <
    ceil(p * 2^32)` (p * 2^32 is exact in float64). One table per row length, instead of that
    arithmetic per element."""
    ranks = torch.arange(1, m + 1, dtype=torch.int64).to(torch.float32)
    rank_norm = ((ranks - 1) / max(m - 1, 1)).clamp_(0, 1)
    probs = (rank_norm * 2 * epsilon) + (density - epsilon)
    return torch.ceil(probs.to(torch.float64) * 2.0**32).to(torch.int64)


def rank_bounds(m: int, density: float, epsilon: float) -> tuple[torch.Tensor, bool]:
    """`_rank_bounds`, kept for the row lengths of 2-D tensors (a 1-D tensor's is its whole length)."""
    return _cached_bounds(m, density, epsilon) if m <= 1 << 16 else _rank_bounds(m, density, epsilon)


def _rank_bounds(m: int, density: float, epsilon: float) -> tuple[torch.Tensor, bool]:
    """`rank_thresholds` as (table, inclusive): where every threshold t lies in [1, 2^32] (every
    density and epsilon that della accepts), the int32 bit patterns of t - 1, which a uint32 draw
    keeps at or below; halves the scatter's bytes and makes the comparison uint32 against uint32
    (0.42 + 0.10 ns an element instead of 0.83 + 0.42). Otherwise the int64 thresholds."""
    table = rank_thresholds(m, density, epsilon)
    if int(table.min()) >= 1 and int(table.max()) <= 2**32:
        return torch.from_numpy((table - 1).numpy().astype(np.uint32).view(np.int32)), True
    return table, False


@functools.lru_cache(maxsize=32)
def _cached_bounds(m: int, density: float, epsilon: float) -> tuple[torch.Tensor, bool]:
    return _rank_bounds(m, density, epsilon)


def _row_thresholds(keys: torch.Tensor, table: torch.Tensor) -> np.ndarray:
    """Each element's threshold, `table[rank - 1]` (in the table's dtype), its rank by magnitude key
    within its row (dim 1), equal keys in position order (a stable sort's ranks).

    The row is sorted as one int64 per element, key << 32 | position, which makes every value
    distinct, so numpy's vectorised sort (not stable, and needing no indices) gives the stable
    order: 3 ns an element against 38 ns for torch's stable sort of the keys (rows of 1024, one
    thread); the positions come back in the low bits, and scatter each rank's threshold there."""
    m = keys.shape[1]
    moved = keys.movedim(1, -1) if keys.dim() > 2 else keys
    comp = moved.reshape(-1, m).cpu().numpy().astype(np.int64)
    comp <<= 32
    comp |= np.arange(m, dtype=np.int64)
    comp.sort(axis=1)
    comp &= 0xFFFFFFFF
    cols = torch.from_numpy(comp)
    thr = torch.empty(cols.shape, dtype=table.dtype).scatter_(1, cols, table.expand(cols.shape[0], m))
    if keys.dim() > 2:
        thr = thr.reshape(moved.shape).movedim(-1, 1).contiguous()
    return thr.reshape(-1).numpy()


def keep(chunk: Chunk, i: int, delta: torch.Tensor, sorted_keys: torch.Tensor | None) -> torch.Tensor:
    """MagPrune's Bernoulli keep mask for model i on this chunk."""
    mp = chunk.model_params[i]
    density, epsilon = float(mp.get("density", 1.0)), float(mp.get("epsilon", 0.15))
    keys = magnitude_keys(delta)
    if len(chunk.shape) <= 1:
        if sorted_keys is None:
            raise ValueError("della needs its first pass for a 1-D tensor")
        table, inclusive = rank_bounds(max(chunk.numel, 1), density, epsilon)
        pos = torch.searchsorted(sorted_keys, _composite(keys.cpu(), chunk.offset))
        thr = table[pos].numpy()
    else:
        table, inclusive = rank_bounds(keys.shape[1], density, epsilon)
        thr = _row_thresholds(keys, table)
    u = uniform_u32(chunk.seed, i, chunk.offset, delta.numel())
    kept = u <= thr.view(np.uint32) if inclusive else u < thr
    return torch.from_numpy(kept).reshape(delta.shape).to(delta.device)


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return int(len(shape) <= 1) + int(bool(params.get("rescale", True)))


def _partial(chunk: Chunk, state: MagPrune | None) -> _Part:
    gather = len(chunk.shape) <= 1 and state is None
    models: list[torch.Tensor | None] = []
    for i, mp in enumerate(chunk.model_params):
        if not _pruned(mp):
            models.append(None)
            continue
        _check(float(mp["density"]), float(mp.get("epsilon", 0.15)))
        delta = _delta(chunk, i)
        if gather:
            models.append(_composite(magnitude_keys(delta), chunk.offset))
            continue
        sorted_keys = state.sorted[i] if state else None
        kept = keep(chunk, i, delta, sorted_keys)
        mag = delta.abs_()  # float64 sums of the float32 magnitudes, without a float64 copy (the same bits)
        models.append(torch.stack([mag.sum(dtype=torch.float64), apply_mask(mag, kept).sum(dtype=torch.float64)]))
    return _Part(gather, tuple(models))


def _combine(parts: Sequence[_Part]) -> _Part:
    out: list[torch.Tensor | None] = []
    for i in range(len(parts[0].models)):
        xs = [p.models[i] for p in parts]
        if xs[0] is None:
            out.append(None)
        elif parts[0].gather:
            out.append(torch.cat(xs))  # type: ignore[arg-type]
        else:
            out.append(torch.stack(xs).sum(0))  # type: ignore[arg-type]
    return _Part(parts[0].gather, tuple(out))


def _finish(combined: _Part, state: MagPrune | None) -> MagPrune:
    state = state or MagPrune(sorted=(None,) * len(combined.models))
    if combined.gather:
        return replace(state, sorted=tuple(None if k is None else torch.sort(k).values for k in combined.models))
    scales = []
    for s in combined.models:
        before, after = (1.0, 1.0) if s is None else (float(s[0]), float(s[1]))
        scales.append(before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0)
    return replace(state, scale=tuple(scales))


def sparsify(chunk: Chunk, state: MagPrune | None, i: int) -> torch.Tensor:
    """Model i's task vector after MagPrune (and the L1 rescale, when asked for)."""
    delta = _delta(chunk, i)
    mp = chunk.model_params[i]
    if not _pruned(mp):
        return delta
    density = float(mp["density"])
    if density <= 0:
        return torch.zeros_like(delta)
    _check(density, float(mp.get("epsilon", 0.15)))
    kept = keep(chunk, i, delta, state.sorted[i] if state else None)
    apply_mask(delta, kept)  # a product, as mergekit's: see gta.sparsified_delta
    scale = state.scale[i] if state and state.scale else 1.0
    return delta.mul_(scale) if scale != 1.0 else delta


def _make(name: str, consensus: bool, normalize: bool) -> MergeMethod:
    def blend(chunk: Chunk, state: Any) -> torch.Tensor:
        return gta_blend(chunk, state, sparsify, consensus, normalize)

    return MergeMethod(
        name=name,
        summary=doc_summary(__doc__, name),
        blend=blend,
        statistic=Statistic(passes=_passes, partial=_partial, combine=_combine, finish=_finish),
        base=BasePolicy.REQUIRED,
        random=True,
        model_parameters=(WEIGHT, DENSITY, EPSILON),
        parameters=(INT8_MASK, normalize_param(normalize), rescale_param(True), LAMBDA),
        breed=TASK_VECTOR,
    )


EPSILON = param("epsilon", 0.15, "keep probabilities range over density +/- epsilon by magnitude rank")
DELLA = _make("della", consensus=True, normalize=True)
DELLA_LINEAR = _make("della_linear", consensus=False, normalize=False)
