"""Whole-tensor float64 references for the merge methods, written straight from mergekit's algorithms,
plus helpers to run a method the way the engine does (statistic passes, then blend per chunk)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from darwin_stream.methods import Chunk, get, run_statistic

F64 = torch.float64


# --- inputs and comparison ---


def make_inputs(
    shape: tuple[int, ...], n_models: int, seed: int = 0, delta_std: float = 0.002, shared_std: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16 weights like a fine-tune family (shared_std: a task direction common to all), as float32."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    shared = torch.randn(shape, generator=g) * shared_std
    models = [
        (base.float() + shared + torch.randn(shape, generator=g) * delta_std).to(torch.bfloat16)
        for _ in range(n_models)
    ]
    return base.float(), [m.float() for m in models]


def _ordered_bf16(x: torch.Tensor) -> torch.Tensor:
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def bf16_ulp_mismatch_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements whose bf16 roundings are more than one bf16 ulp apart."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(((_ordered_bf16(a) - _ordered_bf16(b)).abs() > 1).to(F64).mean())


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, max_fraction: float = 1e-4) -> None:
    assert torch.isfinite(out).all()
    frac = bf16_ulp_mismatch_fraction(out, ref)
    assert frac <= max_fraction, f"{frac:.2e} of elements differ by more than 1 bf16 ulp"


# --- engine-like driver ---


def make_chunks(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    model_params: Sequence[dict[str, Any]],
    params: dict[str, Any],
    rows: int | None = None,
    seed: int = 0,
) -> list[Chunk]:
    """Row chunks of `rows` rows (None: the whole tensor as one chunk), with the engine's offsets."""
    like = base if base is not None else models[0]
    n_rows = like.shape[0] if like.dim() > 1 else 1
    rows = n_rows if rows is None or like.dim() == 1 else rows
    per_row = like.numel() // n_rows
    chunks = []
    for r0 in range(0, n_rows, rows):

        def cut(x: torch.Tensor, r0: int = r0) -> torch.Tensor:
            return x if x.dim() == 1 else x[r0 : r0 + rows]

        chunks.append(
            Chunk(
                models=[cut(m) for m in models],
                model_params=model_params,
                params=params,
                base=None if base is None else cut(base),
                offset=r0 * per_row,
                numel=like.numel(),
                shape=tuple(like.shape),
                seed=seed,
            )
        )
    return chunks


def run_method(
    name: str,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    model_params: Sequence[dict[str, Any]] = (),
    params: dict[str, Any] | None = None,
    rows: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    method = get(name)
    params = {**method.param_defaults, **(params or {})}
    model_params = [{**method.model_param_defaults, **mp} for mp in model_params] or [
        dict(method.model_param_defaults) for _ in models
    ]
    chunks = make_chunks(base, models, model_params, params, rows, seed)
    state = run_statistic(method, lambda: chunks)
    out = [method.blend(c, state) for c in chunks]
    return out[0] if len(out) == 1 else torch.cat(out)


# --- references (float64, whole tensors) ---


def ref_linear(models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    xs = torch.stack([m.to(F64) for m in models])
    w = torch.tensor(weights, dtype=F64).reshape(-1, *([1] * (xs.dim() - 1)))
    out = (w * xs).sum(0)
    return out / w.sum() if normalize else out


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.to(F64), b.to(F64)
    an = a / a.norm() if a.norm() > 1e-8 else a
    bn = b / b.norm() if b.norm() > 1e-8 else b
    dot = float((an * bn).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def window_mask(values: torch.Tensor, skip: int, take: int) -> torch.Tensor:
    """Exactly the elements of descending ranks (skip, skip + take], ties taken in flat order (our
    tie rule: mergekit keeps the same count, choosing among ties in its sort's undefined order)."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[skip : skip + take]] = True
    return mask.reshape(values.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k by |delta|, k = max(1, int(density*n)) as mergekit 0.1.5's sparsify.magnitude."""
    mag = delta.abs().to(torch.float32)
    return window_mask(mag, 0, max(1, int(density * mag.numel())))


def magnitude_mask_mergekit(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's exact mask: the first k of a descending argsort (arbitrary among ties)."""
    mag = delta.abs().to(torch.float32).reshape(-1)
    k = int(density * mag.numel())
    mask = torch.zeros_like(mag, dtype=torch.bool)
    mask[torch.argsort(mag, descending=True)[:k]] = True
    return mask.reshape(delta.shape)


def outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs as mergekit 0.1.5's magnitude_outliers: n_bot = max(0, n - target - n_top), keep the
    ascending-sorted [n_bot, n_bot + target), i.e. descending ranks (n - n_bot - target, n - n_bot]."""
    mag = delta.abs().to(torch.float32)
    n = mag.numel()
    target_n, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    return window_mask(mag, n - n_bot - target_n, target_n)


def ref_gta(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    masks: Sequence[torch.Tensor | None] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic given each model's keep mask (None: no sparsification)."""
    b = base.to(F64)
    deltas = []
    for i, m in enumerate(models):
        d = m.to(F64) - b
        mask = None if masks is None else masks[i]
        if mask is not None:
            kept = d * mask
            before, after = d.abs().sum(), kept.abs().sum()
            if rescale and before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
            d = kept
        deltas.append(d)
    dv = torch.stack(deltas)
    w = torch.tensor(weights, dtype=F64).reshape(-1, *([1] * b.dim()))
    wd = dv * w
    if consensus:
        majority = torch.where(wd.sum(0) >= 0, 1.0, -1.0).to(F64)
        agree = wd.sign() == majority
        mixed = (wd * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.tensor(1.0, dtype=F64)
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def ref_model_stock(base: torch.Tensor, models: Sequence[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    b = base.to(F64)
    ws = [m.to(F64) for m in models]
    shape = b.shape
    if filter_wise:
        b2 = b.reshape(-1, shape[-1])
        ws2 = [w.reshape(-1, shape[-1]) for w in ws]
    else:
        b2 = b.reshape(1, -1)
        ws2 = [w.reshape(1, -1) for w in ws]
    ds = [w - b2 for w in ws2]
    cos = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            num = (ds[i] * ds[j]).sum(-1)
            den = (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append((num / den).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    k = len(ws)
    t = k * c / (1 + (k - 1) * c)
    avg = sum(ws2) / k
    return (t * avg + (1 - t) * b2).reshape(shape)
