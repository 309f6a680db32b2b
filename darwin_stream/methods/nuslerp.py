"""nuslerp: slerp between two models (or their task vectors from a base), with mergekit's choice of
what a "vector" is: the whole flattened tensor (default), each row along the last dim, or each
column (`nuslerp_row_wise`, the vectors along dim 0).

`t = w_1 / (w_0 + w_1)` (0.5 when |w_0 + w_1| < 1e-6). The angle of a whole tensor or of a column
spans every row, so one streaming pass sums `<v0, v1>`, `|v0|²`, `|v1|²` in float64 (per column for
the row-wise mode: a float64 vector the size of one row); a last-dim vector lies inside one block, so
that mode needs no pass, except for a 1-D tensor, which is one vector that blocks may split.
"""

from __future__ import annotations

from typing import Any

import torch

from darwin_stream.methods import REQUIRED, Chunk, MergeMethod, Params, Statistic, register
from darwin_stream.methods._sparsify import sum_tree

NORM_FLOOR = 1e-7  # mergekit divides a vector by max(|v|, 1e-7)
COLINEAR = 1e-16  # mergekit lerps where 1 - cos² <= eps² (eps = 1e-8), evaluated in float32


def weight_t(model_params: Any) -> float:
    w0, w1 = (float(mp["weight"]) for mp in model_params)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _mode(shape: tuple[int, ...], params: Params) -> str:
    """'tensor' (one vector), 'columns' (vectors along dim 0) or 'rows' (along the last dim)."""
    if params.get("nuslerp_flatten", True) or len(shape) <= 1:
        return "tensor"
    return "columns" if params.get("nuslerp_row_wise", False) else "rows"


def _vectors(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    if len(chunk.models) != 2:
        raise ValueError(f"nuslerp blends exactly two models (besides an optional base), got {len(chunk.models)}")
    v0, v1 = chunk.models
    if chunk.base is not None:
        v0, v1 = v0 - chunk.base, v1 - chunk.base
    return v0, v1


def _sums(v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> dict[str, torch.Tensor]:
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    if dim is None:
        a, b = a.reshape(-1), b.reshape(-1)
        return {"ab": a @ b, "aa": a @ a, "bb": b @ b}
    return {"ab": (a * b).sum(dim), "aa": (a * a).sum(dim), "bb": (b * b).sum(dim)}


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
    return 0 if _mode(shape, params) == "rows" else 1


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    v0, v1 = _vectors(chunk)
    return _sums(v0, v1, None if _mode(chunk.shape, chunk.params) == "tensor" else 0)


def _finish(combined: dict[str, Any], state: Any) -> dict[str, torch.Tensor]:
    return {k: combined[k] for k in ("ab", "aa", "bb")}


def blend(chunk: Chunk, state: Any) -> torch.Tensor:
    v0, v1 = _vectors(chunk)
    t = weight_t(chunk.model_params)
    sums = _sums(v0, v1, -1) if _mode(chunk.shape, chunk.params) == "rows" else state
    if sums is None:
        raise ValueError("nuslerp needs its statistic state")
    s0, s1 = coefficients(t, sums["ab"], sums["aa"], sums["bb"])
    if _mode(chunk.shape, chunk.params) == "rows":
        s0, s1 = s0.unsqueeze(-1), s1.unsqueeze(-1)
    out = v0 * s0.to(v0.dtype) + v1 * s1.to(v1.dtype)
    return out + chunk.base if chunk.base is not None else out


NUSLERP = register(
    MergeMethod(
        name="nuslerp",
        blend=blend,
        statistic=Statistic(passes=_passes, partial=_partial, combine=sum_tree, finish=_finish, dtype=torch.float64),
        base_optional=True,
        non_base=(2, 2),
        model_param_defaults={"weight": REQUIRED},
        param_defaults={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    )
)
