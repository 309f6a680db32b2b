"""ram / ramplus_tl: Reinforced Agent Merging (mergekit 0.1.5, arXiv:2601.13572).

An element of task vector `d_i = x_i - b` counts when `|d_i| > epsilon`. Where exactly one model's
counts, its value is taken whole; where several do, they are averaged:

    out = b + sum_i [|d_i| > eps] · d_i · (unique ? lambda_i : 1 / count)

ram has `lambda_i = 1`, and is elementwise. ramplus_tl (tensor-local) boosts the unique values of a
model that shares much: `rho_i = shared_i / max(unique_i, eps)` with `shared_i` and `unique_i` the
numbers of its counting elements that are shared or unique in the whole tensor, `lambda_i = 1 + r ·
clamp(rho_i, 0, alpha)`. Those two integers per model are counted exactly in one streaming pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from darwin_stream.methods.contract import BasePolicy, Chunk, MergeMethod, Statistic, doc_summary, param
from darwin_stream.methods.reduce import sum_tree


def _masks(chunk: Chunk) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their counting masks, and the per-element count of counting models."""
    if chunk.base is None:
        raise ValueError("ram and ramplus_tl need a base model")
    eps = float(chunk.params.get("epsilon", 1e-5))
    deltas = [m - chunk.base for m in chunk.models]
    nonzero = [d.abs() > eps for d in deltas]
    counts = torch.zeros(chunk.base.shape, dtype=torch.int64)
    for nz in nonzero:
        counts += nz
    return deltas, nonzero, counts


def merge(chunk: Chunk, lambdas: list[float] | None) -> torch.Tensor:
    base = chunk.base
    if not chunk.models:
        assert base is not None
        return base.clone()
    deltas, nonzero, counts = _masks(chunk)
    unique = counts == 1
    divisor = counts.clamp(min=1).to(deltas[0].dtype)
    out = None
    for i, (d, nz) in enumerate(zip(deltas, nonzero, strict=True)):
        dz = d * nz
        # mergekit's roundings: the unique part (times lambda) plus the overlap part over the count;
        # one of the two is zero at every element, so each term is one product or one quotient.
        kept = dz * lambdas[i] if lambdas is not None else dz
        term = torch.where(unique, kept, dz / divisor)
        out = term if out is None else out.add_(term)
    assert base is not None and out is not None
    return base + out


@dataclass(frozen=True)
class _Counts:
    """Per model, (shared, unique) counts of its counting elements, and the parameters of the boost."""

    counts: torch.Tensor
    r: float
    alpha: float
    eps: float


@dataclass(frozen=True)
class Boosts:
    lambdas: tuple[float, ...]


def _partial(chunk: Chunk, state: Any) -> _Counts:
    _, nonzero, counts = _masks(chunk)
    shared, unique = counts > 1, counts == 1
    per_model = [torch.stack([(nz & shared).sum(), (nz & unique).sum()]) for nz in nonzero]
    return _Counts(torch.stack(per_model) if per_model else torch.zeros((0, 2), dtype=torch.int64),
                   r=float(chunk.params.get("r", 0.1)), alpha=float(chunk.params.get("alpha", 0.2)),
                   eps=float(chunk.params.get("epsilon", 1e-5)))


def lambdas(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, eps: float) -> list[float]:
    """ramplus_tl's per-model boost, in float32 as mergekit computes it (int counts / clamped float)."""
    rho = shared / unique.clamp(min=eps)
    return [float(x) for x in 1 + r * rho.clamp(min=0, max=alpha)]


def _finish(combined: _Counts, state: Any) -> Boosts:
    c = combined.counts
    return Boosts(tuple(lambdas(c[:, 0], c[:, 1], combined.r, combined.alpha, combined.eps)))


def _ram_blend(chunk: Chunk, state: Any) -> torch.Tensor:
    return merge(chunk, None)


def _plus_blend(chunk: Chunk, state: Boosts | None) -> torch.Tensor:
    if state is None:
        raise ValueError("ramplus_tl needs its statistic state")
    return merge(chunk, list(state.lambdas))


EPSILON = param("epsilon", 1e-5, "a task-vector element counts when its magnitude is above this")
RAM = MergeMethod(
    name="ram",
    summary=doc_summary(__doc__, "ram"),
    blend=_ram_blend,
    base=BasePolicy.REQUIRED,
    parameters=(EPSILON,),
)
RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    summary=doc_summary(__doc__, "ramplus_tl"),
    blend=_plus_blend,
    statistic=Statistic(passes=1, partial=_partial, combine=sum_tree, finish=_finish),
    base=BasePolicy.REQUIRED,
    parameters=(
        param("r", 0.1, "how much a model's unique values are boosted by what it shares"),
        param("alpha", 0.2, "the most the share ratio counts"),
        EPSILON,
    ),
)
