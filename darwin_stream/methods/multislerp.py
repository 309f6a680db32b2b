"""multislerp: barycentric interpolation of several models (or task vectors) on the hypersphere.

mergekit projects the unit vectors `u_i = v_i / (|v_i| + eps)` to the tangent space at their
normalised weighted mean, averages there and maps back. The weighted tangent average is zero
(`sum_i w_i (u_i - <u_i, m> m) = (|M| - <M, m>) m = 0` for `M = sum_i w_i u_i`, `m = M / |M|`), so
the result is `m · sum_i w_i |v_i|`: a linear combination of the inputs whose coefficients need only
the Gram matrix `<v_i, v_j>`, summed in one float64 pass. Blending is then elementwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from darwin_stream.methods.contract import (
    Arity,
    BasePolicy,
    Chunk,
    MergeMethod,
    Statistic,
    doc_summary,
    param,
    required,
)
from darwin_stream.methods.reduce import gram, sum_tree


def _vectors(chunk: Chunk) -> list[torch.Tensor]:
    if not chunk.models:
        raise ValueError("multislerp needs at least one model")
    if chunk.base is None:
        return list(chunk.models)
    return [m - chunk.base for m in chunk.models]


def weights_of(model_params: Any, normalize: bool) -> list[float]:
    w = [float(mp["weight"]) for mp in model_params]
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError(f"multislerp with normalize_weights: the weights {w} sum to zero")
        w = [x / total for x in w]
    return w


def coefficients(g: torch.Tensor, w: list[float], eps: float) -> list[float]:
    """c with multislerp(v) = sum_i c_i v_i, from the Gram matrix `g` and the (normalised) weights."""
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(len(w))]
    a = torch.tensor([wi / (ni + eps) for wi, ni in zip(w, norms, strict=True)], dtype=torch.float64)
    mean_norm = math.sqrt(max(float(a @ g @ a), 0.0))
    if mean_norm < eps:
        if len(w) == 2:
            return list(w)  # mergekit's fallback: the linear blend
        raise ValueError(
            "multislerp: the weighted sum of the unit vectors is zero (antipodal inputs whose "
            "weights balance out); use different weights"
        )
    scale = sum(wi * ni for wi, ni in zip(w, norms, strict=True)) / mean_norm
    return [float(x) * scale for x in a]


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    return {"gram": gram(_vectors(chunk)) if len(chunk.models) > 1 else torch.zeros(())}


def _finish(combined: dict[str, Any], state: Any) -> dict[str, torch.Tensor]:
    return {"gram": combined["gram"]}


def blend(chunk: Chunk, state: Any) -> torch.Tensor:
    if len(chunk.models) == 1:
        return chunk.models[0].clone()  # mergekit: one model needs no interpolation
    if state is None:
        raise ValueError("multislerp needs its statistic state")
    w = weights_of(chunk.model_params, bool(chunk.params.get("normalize_weights", True)))
    c = coefficients(state["gram"], w, float(chunk.params.get("eps", 1e-8)))
    vectors = _vectors(chunk)
    out = vectors[0] * c[0]
    for v, ci in zip(vectors[1:], c[1:], strict=True):
        out += v * ci
    return out + chunk.base if chunk.base is not None else out


MULTISLERP = MergeMethod(
    name="multislerp",
    summary=doc_summary(__doc__, "multislerp"),
    blend=blend,
    statistic=Statistic(passes=1, partial=_partial, combine=sum_tree, finish=_finish, dtype=torch.float64),
    base=BasePolicy.OPTIONAL,
    arity=Arity(1),
    model_parameters=(required("weight", "this model's share of the barycentre"),),
    parameters=(
        param("normalize_weights", True, "divide the weights by their sum"),
        param("eps", 1e-8, "added to each norm before dividing by it"),
    ),
)
