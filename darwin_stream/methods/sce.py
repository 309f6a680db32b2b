"""sce: Select (top-variance elements), Calculate (per-model weights), Erase (sign conflicts), then
merge the task vectors (mergekit 0.1.5, arXiv:2408.07990).

    d_i      = x_i - b, masked to the `select_topk` fraction of elements (among those whose variance
               across the models is non-zero) with the largest variance across the models
    w_i      = mean(d_i²) / sum_j mean(d_j²)            (1/n each when that sum is below 1e-6)
    keep_i   = sign(d_i) == sign(sum_j d_j)             (sum >= 0 counts as +; zeros never agree)
    out      = b + sum_i w_i keep_i d_i / max(sum_i w_i keep_i, 1e-6)

Tensor-wide numbers, streamed: the variance threshold is an exact radix select over float32 bit
patterns (2 passes; the variance is >= 0, so its bits order like its values), then one pass sums
each masked task vector's squares in float64. Without selection, only that last pass.
"""

from __future__ import annotations

from typing import Any

import torch

from darwin_stream.methods import Chunk, MergeMethod, Params, Statistic, register
from darwin_stream.methods._sparsify import RadixSelect, hi_histogram, lo_histogram, magnitude_keys, sum_tree

WEIGHT_FLOOR = 1e-6  # mergekit: weights sum below this -> equal weights; divisor clamped to this


def _topk(params: Params) -> float:
    return float(params.get("select_topk", 1.0))


def _deltas(chunk: Chunk) -> list[torch.Tensor]:
    if chunk.base is None:
        raise ValueError("sce needs a base model")
    return [m - chunk.base for m in chunk.models]


def variance_keys(deltas: list[torch.Tensor]) -> torch.Tensor:
    """int32 keys ordered like the elementwise population variance across models (mergekit's torch.var)."""
    return magnitude_keys(torch.var(torch.stack(deltas), dim=0, unbiased=False))


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return 3 if 0 < _topk(params) < 1 else 1


def selected(chunk: Chunk, state: Any, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The task vectors after the top-variance selection."""
    topk = _topk(chunk.params)
    if topk >= 1:
        return deltas
    if topk <= 0:
        return [torch.zeros_like(d) for d in deltas]
    keep = variance_keys(deltas) >= state["threshold"]
    zero = torch.zeros((), dtype=deltas[0].dtype)
    return [torch.where(keep, d, zero) for d in deltas]


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    deltas = _deltas(chunk)
    stage = "counts" if state is None and 0 < _topk(chunk.params) < 1 else (state or {}).get("next", "squares")
    if stage == "counts":
        keys = variance_keys(deltas)
        counts, _ = hi_histogram(keys, with_sums=False)
        return {"stage": stage, "counts": counts, "zeros": (keys == 0).sum(), "topk": _topk(chunk.params)}
    if stage == "low":
        keys = variance_keys(deltas)
        return {"stage": stage, "lo": {b: lo_histogram(keys, b) for b in RadixSelect.bins(state["located"])}}
    sq = torch.stack([(d.to(torch.float64) ** 2).sum() for d in selected(chunk, state, deltas)])
    return {"stage": "squares", "squares": sq, "numel": chunk.numel}


def _finish(combined: dict[str, Any], state: Any) -> dict[str, Any]:
    stage, params = combined["stage"], dict(state or {})
    if stage == "counts":
        nonzero = int(combined["counts"].sum()) - int(combined["zeros"])
        # mergekit: int(count_nonzero(var) * density), the product a float32 tensor
        k = int(torch.tensor(nonzero) * combined["topk"])
        return {**params, "located": RadixSelect.first(combined["counts"], [k]), "next": "low"}
    if stage == "low":
        return {**params, "threshold": RadixSelect.second(params["located"], combined["lo"])[0], "next": "squares"}
    means = combined["squares"] / max(int(combined["numel"]), 1)
    total = float(means.sum())
    n = means.numel()
    weights = [1.0 / n] * n if abs(total) < WEIGHT_FLOOR else [float(m) / total for m in means]
    return {**params, "weights": weights}


def blend(chunk: Chunk, state: Any) -> torch.Tensor:
    base = chunk.base
    deltas = _deltas(chunk)
    if not deltas:
        assert base is not None
        return base.clone()
    if state is None or "weights" not in state:
        raise ValueError("sce needs its statistic state")
    deltas = selected(chunk, state, deltas)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    positive = total >= 0
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    zero = torch.zeros((), dtype=total.dtype)
    for d, w in zip(deltas, state["weights"], strict=True):
        ew = torch.where(torch.where(positive, d > 0, d < 0), torch.tensor(w, dtype=d.dtype), zero)
        merged += d * ew
        divisor += ew
    assert base is not None
    return base + merged / divisor.clamp_(min=WEIGHT_FLOOR)


SCE = register(
    MergeMethod(
        name="sce",
        blend=blend,
        statistic=Statistic(passes=_passes, partial=_partial, combine=sum_tree, finish=_finish),
        needs_base=True,
        param_defaults={"int8_mask": False, "select_topk": 1.0},
    )
)
