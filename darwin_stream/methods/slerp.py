"""slerp: spherical interpolation from the base (t=0) to the other model (t=1), over the whole tensor.

The angle is a property of the whole flattened tensors, so one streaming pass sums dot(a, b), |a|^2 and
|b|^2 in float64; blending is then the elementwise s0*a + s1*b.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from darwin_stream.methods.breeding import T_PARAM
from darwin_stream.methods.contract import (
    Arity,
    BasePolicy,
    Chunk,
    MergeMethod,
    Statistic,
    doc_summary,
    required,
)
from darwin_stream.methods.reduce import sum_tree

DOT_THRESHOLD = 0.9995  # |cos| above this: nearly colinear, mergekit falls back to lerp
EPS = 1e-8  # a vector with norm <= EPS is not normalised (mergekit)


def coefficients(t: float, ab: float, aa: float, bb: float) -> tuple[float, float]:
    """(s0, s1) with slerp(t, a, b) = s0*a + s1*b, from the exact tensor-wide dot products."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    cos = ab / (na if na > EPS else 1.0) / (nb if nb > EPS else 1.0)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta_0 = math.acos(cos)
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    return math.sin(theta_0 - theta_t) / sin_theta_0, math.sin(theta_t) / sin_theta_0


def _pair(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk.base is None or len(chunk.models) != 1:
        raise ValueError("slerp needs the base model and exactly one other model")
    return chunk.base, chunk.models[0]


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    a, b = _pair(chunk)
    # The engine upcasts a statistic's chunks to float64 (Statistic.dtype), so these are views.
    a64, b64 = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    return {"t": float(chunk.params["t"]), "ab": a64 @ b64, "aa": a64 @ a64, "bb": b64 @ b64}


def _finish(combined: dict[str, Any], state: Any) -> tuple[float, float]:
    return coefficients(combined["t"], float(combined["ab"]), float(combined["aa"]), float(combined["bb"]))


def blend(chunk: Chunk, state: tuple[float, float]) -> torch.Tensor:
    a, b = _pair(chunk)
    s0, s1 = state
    if chunk.out is None:
        return a * s0 + b * s1
    # Same roundings as above (two products, one sum), in the engine's scratch.
    return torch.add(a.mul_(s0), b.mul_(s1), out=chunk.out)


SLERP = MergeMethod(
    name="slerp",
    summary=doc_summary(__doc__, "slerp"),
    blend=blend,
    statistic=Statistic(passes=1, partial=_partial, combine=sum_tree, finish=_finish, dtype=torch.float64),
    base=BasePolicy.REQUIRED,
    arity=Arity(1, 1, "blends exactly 2 models (base_model and one other), got {inputs}"),
    inplace=True,
    parameters=(required("t", "0 gives the base, 1 the other model"),),
    breed=T_PARAM,
)
