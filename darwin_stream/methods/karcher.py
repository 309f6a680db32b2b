"""karcher: the weighted Karcher (Riemannian) mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit 0.1.5, arXiv:2603.04972).

mergekit iterates on whole tensors: `mean <- exp_mean(sum_i a_i θ_i/sin θ_i (u_i - <u_i, mean> mean))`
until the tangent is shorter than `tol`, at most `max_iter` times. Every iterate is a combination
of the unit vectors `u_i = x_i / |x_i|`, so the iteration runs on its coefficients, with every
inner product and norm taken through the Gram matrix `<x_i, x_j>`: one float64 streaming pass,
however many iterations convergence takes, and an elementwise blend `sum_i k_i x_i` after it.
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
)
from darwin_stream.methods.reduce import gram, sum_tree


def _norm(c: torch.Tensor, k: torch.Tensor) -> float:
    return math.sqrt(max(float(c @ k @ c), 0.0))


def coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """k with karcher(x) = sum_i k_i x_i, from the float64 Gram matrix of the inputs (equal weights)."""
    n = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    inv = torch.tensor([1 / x if x > 0 else 0.0 for x in norms], dtype=torch.float64)
    k = g * inv[:, None] * inv[None, :]  # Gram matrix of the unit vectors (zero vectors: zero rows)
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha = torch.zeros(n, dtype=torch.float64)
    alpha[valid] = 1.0 / len(valid)  # equal weights, renormalised over the usable inputs
    c = alpha.clone()
    mean_norm = _norm(c, k)
    if mean_norm < tol:
        c = torch.zeros(n, dtype=torch.float64)
        c[valid[0]] = 1.0
    else:
        c /= mean_norm
    for _ in range(max_iter):
        dots = (k @ c).clamp(-1, 1)
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            f = float(alpha[i]) * theta / math.sin(theta)
            tangent[i] += f
            tangent -= f * float(dots[i]) * c
        tn = _norm(tangent, k)
        if tn < tol:
            break
        c = math.cos(tn) * c + (math.sin(tn) / tn) * tangent
        un = _norm(c, k)
        if un > tol:
            c /= un
    scale = sum(norms) / n  # mergekit scales by the mean norm over all inputs, zero ones included
    return [float(c[i] * inv[i]) * scale for i in range(n)]


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    return {"gram": gram(list(chunk.models))}


def _finish(combined: dict[str, Any], state: Any) -> dict[str, torch.Tensor]:
    return {"gram": combined["gram"]}


def blend(chunk: Chunk, state: Any) -> torch.Tensor:
    if chunk.base is not None:
        raise ValueError("karcher takes no base tensor: every input is averaged")
    if not chunk.models:
        raise ValueError("karcher needs at least one model")
    if len(chunk.models) == 1:
        return chunk.models[0].clone()
    if state is None:
        raise ValueError("karcher needs its statistic state")
    k = coefficients(state["gram"], int(chunk.params.get("max_iter", 10)), float(chunk.params.get("tol", 1e-5)))
    out = chunk.models[0] * k[0]
    for x, ki in zip(chunk.models[1:], k[1:], strict=True):
        out += x * ki
    return out


KARCHER = MergeMethod(
    name="karcher",
    summary=doc_summary(__doc__, "karcher"),
    blend=blend,
    statistic=Statistic(passes=1, partial=_partial, combine=sum_tree, finish=_finish, dtype=torch.float64),
    base=BasePolicy.INPUT,
    arity=Arity(1),
    parameters=(
        param("max_iter", 10, "most iterations of the mean"),
        param("tol", 1e-5, "stop when the tangent step is shorter than this"),
    ),
)
