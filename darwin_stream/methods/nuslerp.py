"""nuslerp: slerp between two models (or their task vectors from a base), with mergekit's choice of
what a "vector" is: the whole flattened tensor (default), each row along the last dim, or each
column (`nuslerp_row_wise`, the vectors along dim 0).

`t = w_1 / (w_0 + w_1)` (0.5 when |w_0 + w_1| < 1e-6). The angle of a whole tensor or of a column
spans every row, so one streaming pass sums `<v0, v1>`, `|v0|²`, `|v1|²` in float64 (per column for
the row-wise mode: a float64 vector the size of one row); a last-dim vector lies inside one block, so
that mode needs no pass, except for a 1-D tensor, which is one vector that blocks may split.
"""

from __future__ import annotations

import enum
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
    param,
    required,
)
from darwin_stream.methods.reduce import sum_tree

NORM_FLOOR = 1e-7  # mergekit divides a vector by max(|v|, 1e-7)
COLINEAR = 1e-16  # mergekit lerps where 1 - cos² <= eps² (eps = 1e-8), evaluated in float32


class Vectors(enum.Enum):
    """What one slerped vector is."""

    TENSOR = "tensor"  # the whole flattened tensor
    COLUMNS = "columns"  # each column: the vectors along dim 0
    ROWS = "rows"  # each row: the vectors along the last dim


@dataclass(frozen=True)
class Dots:
    """float64 <v0, v1>, |v0|², |v1|², per vector (any shape)."""

    ab: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor


def weight_t(model_params: Sequence[Params]) -> float:
    w0, w1 = (float(mp["weight"]) for mp in model_params)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _mode(shape: tuple[int, ...], params: Params) -> Vectors:
    if params.get("nuslerp_flatten", True) or len(shape) <= 1:
        return Vectors.TENSOR
    return Vectors.COLUMNS if params.get("nuslerp_row_wise", False) else Vectors.ROWS


def _vectors(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    if len(chunk.models) != 2:
        raise ValueError(f"nuslerp blends exactly two models (besides an optional base), got {len(chunk.models)}")
    v0, v1 = chunk.models
    if chunk.base is not None:
        v0, v1 = v0 - chunk.base, v1 - chunk.base
    return v0, v1


def _sums(v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> Dots:
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    if dim is None:
        a, b = a.reshape(-1), b.reshape(-1)
        return Dots(ab=a @ b, aa=a @ a, bb=b @ b)
    return Dots(ab=(a * b).sum(dim), aa=(a * a).sum(dim), bb=(b * b).sum(dim))


def coefficients(t: float, ab: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s0, s1) with nuslerp(t, v0, v1) = s0 v0 + s1 v1, from float64 dot products (any shape)."""
    na, nb = aa.clamp(min=0).sqrt().clamp(min=NORM_FLOOR), bb.clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (ab / na / nb).clamp(-1, 1)
    c32 = cos.to(torch.float32)
    colinear = (1 - c32 * c32) <= torch.tensor(COLINEAR, dtype=torch.float32)
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    s0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    s1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return s0, s1


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return 0 if _mode(shape, params) is Vectors.ROWS else 1


def _partial(chunk: Chunk, state: Dots | None) -> Dots:
    v0, v1 = _vectors(chunk)
    return _sums(v0, v1, None if _mode(chunk.shape, chunk.params) is Vectors.TENSOR else 0)


def _finish(combined: Dots, state: Dots | None) -> Dots:
    return combined


def blend(chunk: Chunk, state: Dots | None) -> torch.Tensor:
    v0, v1 = _vectors(chunk)
    t = weight_t(chunk.model_params)
    rows = _mode(chunk.shape, chunk.params) is Vectors.ROWS
    sums = _sums(v0, v1, -1) if rows else state
    if sums is None:
        raise ValueError("nuslerp needs its statistic state")
    s0, s1 = coefficients(t, sums.ab, sums.aa, sums.bb)
    if rows:
        s0, s1 = s0.unsqueeze(-1), s1.unsqueeze(-1)
    out = v0 * s0.to(v0.dtype) + v1 * s1.to(v1.dtype)
    return out + chunk.base if chunk.base is not None else out


NUSLERP = MergeMethod(
    name="nuslerp",
    summary=doc_summary(__doc__, "nuslerp"),
    blend=blend,
    statistic=Statistic(passes=_passes, partial=_partial, combine=sum_tree, finish=_finish, dtype=torch.float64),
    base=BasePolicy.OPTIONAL,
    arity=Arity(2, 2),
    model_parameters=(required("weight", "t is the second model's share of the two weights"),),
    parameters=(
        param("nuslerp_row_wise", False, "without flatten: slerp the columns (vectors along dim 0)"),
        param("nuslerp_flatten", True, "slerp the whole flattened tensor as one vector"),
    ),
)
