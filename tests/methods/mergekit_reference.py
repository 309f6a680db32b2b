"""Whole-tensor float64 references for mergekit 0.1.5's nearswap, nuslerp, multislerp, karcher, della,
sce, arcee_fusion and ram methods, each written straight from mergekit's algorithm (not from ours),
plus a driver that cuts 1-D tensors into element blocks as the engine's blocks do."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from darwin_stream.methods import Chunk, get, pass_count
from darwin_stream.methods.masks import uniform_bits
from tests.methods.methods_reference import window_mask

F64 = torch.float64


def run_blocks(
    name: str,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    model_params: Sequence[dict[str, Any]] = (),
    params: dict[str, Any] | None = None,
    rows: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Like methods_reference.run_method, but `rows` also cuts a 1-D tensor (into `rows` elements)."""
    method = get(name)
    params = {**method.param_defaults, **(params or {})}
    model_params = [{**method.model_param_defaults, **mp} for mp in model_params] or [
        dict(method.model_param_defaults) for _ in models
    ]
    like = base if base is not None else models[0]
    n = like.shape[0] if like.dim() else 1
    rows = rows or n
    per_row = like.numel() // max(n, 1)
    chunks = []
    for r0 in range(0, n, rows):

        def cut(x: torch.Tensor, r0: int = r0) -> torch.Tensor:
            return x[r0 : r0 + rows] if x.dim() else x

        chunks.append(
            Chunk(
                models=[cut(m).clone() for m in models],
                model_params=model_params,
                params=params,
                base=None if base is None else cut(base).clone(),
                offset=r0 * per_row,
                numel=like.numel(),
                shape=tuple(like.shape),
                seed=seed,
            )
        )
    stat = method.statistic
    state = None
    for _ in range(pass_count(stat, tuple(like.shape), params)):
        assert stat is not None
        parts = [stat.partial(c, state) for c in chunks]
        state = stat.finish(stat.combine(parts), state)
    out = [method.blend(c, state) for c in chunks]
    return out[0] if len(out) == 1 else torch.cat(out)


def ref_nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a, b = base.to(F64), other.to(F64)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """mergekit's nuslerp() in float64 (its colinearity test is on float32 cos, as mergekit runs)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.float().square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def ref_nuslerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    m0, m1 = (m.to(F64) for m in models)
    dim = 0 if row_wise else -1
    if base is None:
        return _nuslerp_vectors(t, m0, m1, dim, flatten)
    b = base.to(F64)
    return b + _nuslerp_vectors(t, m0 - b, m1 - b, dim, flatten)


def ref_multislerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """mergekit's multislerp step by step (tangent space and exponential map included), in float64."""
    if len(models) == 1:
        return models[0].to(F64)
    xs = torch.stack([m.to(F64) for m in models])
    if base is not None:
        xs = xs - base.to(F64)
    flat = xs.reshape(xs.shape[0], -1)
    w = torch.tensor(weights, dtype=F64)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    if mean.norm() < eps:
        assert len(models) == 2
        res = (xs[0] * w[0] + xs[1] * w[1])
        return res + base.to(F64) if base is not None else res
    mean = mean / mean.norm()
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    res = (res * (norms.squeeze(-1) * w).sum()).reshape(xs.shape[1:])
    return res + base.to(F64) if base is not None else res


def ref_karcher(models: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher_merge_tensors on whole tensors, in float64, equal weights."""
    xs = [m.to(F64) for m in models]
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [x.norm() for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0 else x / n for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(na, vu, strict=True))
    mn = mean.norm()
    mean = vu[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, vu, strict=True):
            dot = torch.clamp((mean * u).sum(), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = tangent.norm()
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = mean.norm()
        if float(un) > tol:
            mean = mean / un
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def magprune_mask(delta: torch.Tensor, density: float, epsilon: float, u: torch.Tensor) -> torch.Tensor:
    """mergekit's della_magprune keep mask, given uniforms `u` in place of torch.bernoulli's draws.

    Ranks by |delta| along dim 1 (a 1-D tensor is one row), equal magnitudes in position order."""
    x = delta.to(F64)
    if x.dim() < 2:
        x, u = x.reshape(1, -1), u.reshape(1, -1)
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ranks = order.argsort(dim=1).to(F64) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo).clamp(min=1)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return (u.to(F64) < probs).reshape(delta.shape)


def hashed_uniforms(seed: int, model: int, shape: Sequence[int]) -> torch.Tensor:
    """The engine's counter-based uniforms in [0, 1) for a whole tensor (what mergekit's bernoulli draws)."""
    n = math.prod(shape)
    return (uniform_bits(seed, model, 0, n).to(F64) / 2.0**32).reshape(tuple(shape))


def ref_sce(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's sce_merge in float64, but for the selection: the variance is taken in float32, as
    mergekit runs it, and exactly k elements are kept, ties taken in flat order (our tie rule)."""
    b = base.to(F64)
    tvs = torch.stack([m.to(F64) - b for m in models])
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(b)
        else:
            var = torch.var(tvs.float(), dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            if k == 0:
                mask = torch.zeros_like(b)
            else:
                mask = window_mask(var, 0, k).to(F64)
        tvs = tvs * mask.unsqueeze(0)
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(F64)
    erase = (tvs.sign() == majority).to(F64)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(1)
    w = torch.ones_like(w) / w.numel() if abs(float(w.sum())) < 1e-6 else w / w.sum()
    ew = w.reshape(-1, *([1] * b.dim())) * erase
    return b + (tvs * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def ref_arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion with exact quantiles (no sampling). The importance, which only selects,
    is computed in float32 as mergekit runs it; the result in float64."""
    b32, x32 = base.float(), other.float()
    if b32.dim() == 0:
        b32, x32 = b32.reshape(1), x32.reshape(1)
    p = torch.softmax(x32, dim=-1) + 1e-8
    q = torch.softmax(b32, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    imp = (x32 - b32).abs() * kl
    flat = torch.sort(imp.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    q1, med, q3 = flat[idx]
    mask = (imp >= med + 1.5 * (q3 - q1)).reshape(base.shape)
    return base.to(F64) + (other.to(F64) - base.to(F64)) * mask


def ref_ram(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    epsilon: float = 1e-5,
    plus: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
) -> torch.Tensor:
    """mergekit's ram_merge / ramplus_tl_merge in float64 (the counting test on float32 deltas)."""
    b = base.to(F64)
    tv = torch.stack([m.to(F64) - b for m in models]).reshape(len(models), -1)
    nz = torch.stack([(m.float() - base.float()).abs() > epsilon for m in models]).reshape(len(models), -1)
    counts = nz.sum(0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nz
    if plus:
        shared_c = (nz & overlap).sum(1).to(F64)
        unique_c = (nz & unique).sum(1).to(F64).clamp(min=epsilon)
        lam = 1 + r * (shared_c / unique_c).clamp(0, alpha)
    else:
        lam = torch.ones(len(models), dtype=F64)
    merged = (tvz * unique * lam.unsqueeze(-1) + tvz * overlap / counts.clamp(min=1)).sum(0)
    return b + merged.reshape(b.shape)
