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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

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
from darwin_stream.methods.masks import uniform_bits
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


def _ranks(chunk: Chunk, delta: torch.Tensor, sorted_keys: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """1-based magnitude ranks of `delta`'s elements within their row, and the row length."""
    keys = magnitude_keys(delta)
    if len(chunk.shape) <= 1:
        if sorted_keys is None:
            raise ValueError("della needs its first pass for a 1-D tensor")
        pos = torch.searchsorted(sorted_keys, _composite(keys, chunk.offset))
        return (pos + 1).reshape(delta.shape), max(chunk.numel, 1)
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(1, keys.shape[1] + 1, dtype=order.dtype)
    ranks.scatter_(1, order, ar.reshape(1, -1, *([1] * (keys.dim() - 2))).expand_as(order))
    return ranks, keys.shape[1]


def keep(chunk: Chunk, i: int, delta: torch.Tensor, sorted_keys: torch.Tensor | None) -> torch.Tensor:
    """MagPrune's Bernoulli keep mask for model i on this chunk."""
    mp = chunk.model_params[i]
    density, epsilon = float(mp.get("density", 1.0)), float(mp.get("epsilon", 0.15))
    ranks, m = _ranks(chunk, delta, sorted_keys)
    # mergekit's float32 arithmetic: ((rank - min) / (max - min)).clamp(0, 1) * 2 * eps + (d - eps)
    rank_norm = ((ranks.to(torch.float32) - 1) / max(m - 1, 1)).clamp_(0, 1)
    probs = (rank_norm * 2 * epsilon) + (density - epsilon)
    u = uniform_bits(chunk.seed, i, chunk.offset, delta.numel()).reshape(delta.shape)
    return u.to(torch.float64) < probs.to(torch.float64) * 2.0**32


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
        mag = delta.abs().to(torch.float64)
        kept = keep(chunk, i, delta, sorted_keys)
        models.append(torch.stack([mag.sum(), (mag * kept).sum()]))
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
    delta = torch.where(kept, delta, torch.zeros((), dtype=delta.dtype))
    scale = state.scale[i] if state and state.scale else 1.0
    return delta * scale if scale != 1.0 else delta


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
