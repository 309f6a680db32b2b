"""arcee_fusion: take the other model's value only where it matters, by an importance score with a
threshold set by the score's own spread (mergekit 0.1.5).

    importance = |x - b| · KL_row,   KL_row = sum_j p_j log(p_j / q_j) along the last dim,
                 p = softmax(x) + 1e-8, q = softmax(b) + 1e-8 (a 1-D tensor is one row)
    threshold  = median + 1.5 (q3 - q1) of the importance over the whole tensor,
                 the quantile at q being sorted[int(q (n - 1))]
    out        = b + (x - b) · [importance >= threshold]

The quantiles are exact: two radix passes over the importance's float32 bits. mergekit takes them
from a random sample of 10^6 elements (with replacement) when a tensor is larger than that, so
there its threshold is an estimate that changes from run to run; here it is the exact one. A row
of a ≥2-D tensor lies in one block, so its KL is computed there; a 1-D tensor (which blocks may
split) is gathered whole by its one pass, which gives both its KL and its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from darwin_stream.methods import Chunk, MergeMethod, Params, Statistic, register
from darwin_stream.methods._order import hi_counts, key_value, lo_counts, ordered_keys, quantile_ranks
from darwin_stream.methods._sparsify import RadixSelect, sum_tree

EPS = 1e-8
QUANTILES = [0.25, 0.5, 0.75]


def _pair(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk.base is None or len(chunk.models) != 1:
        raise ValueError("arcee_fusion needs the base model and exactly one other model")
    return chunk.base, chunk.models[0]


def kl_rows(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's per-row KL term, keepdim, in the inputs' dtype."""
    p = torch.softmax(x, dim=-1) + EPS
    q = torch.softmax(b, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(x: torch.Tensor, b: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    return (x - b).abs() * kl


def threshold(q1: float, median: float, q3: float) -> float:
    """median + 1.5 IQR, in float32 as mergekit computes it."""
    t = torch.tensor([q1, median, q3], dtype=torch.float32)
    return float(t[1] + 1.5 * (t[2] - t[0]))


def _one_d(chunk: Chunk) -> bool:
    return len(chunk.shape) <= 1


def _passes(shape: tuple[int, ...], params: Params) -> int:
    return 1 if len(shape) <= 1 else 2


def _partial(chunk: Chunk, state: Any) -> dict[str, Any]:
    b, x = _pair(chunk)
    if _one_d(chunk):
        return {"offset": chunk.offset, "b": b.reshape(-1).clone(), "x": x.reshape(-1).clone()}
    keys = ordered_keys(importance(x, b, kl_rows(x, b)))
    if state is None:
        return {"counts": hi_counts(keys)}
    return {"lo": {h: lo_counts(keys, h) for h in RadixSelect.bins(state["located"])}}


def _combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if "offset" in parts[0]:
        ordered = sorted(parts, key=lambda p: p["offset"])
        return {"offset": 0, "b": torch.cat([p["b"] for p in ordered]), "x": torch.cat([p["x"] for p in ordered])}
    return sum_tree(parts)


def _finish(combined: dict[str, Any], state: Any) -> dict[str, Any]:
    if "offset" in combined:  # a whole 1-D tensor
        b, x = combined["b"], combined["x"]
        kl = kl_rows(x, b)
        imp = torch.sort(importance(x, b, kl)).values
        idx = (torch.tensor(QUANTILES, dtype=torch.float32) * (imp.numel() - 1)).long()
        q1, med, q3 = (float(v) for v in imp[idx])
        return {"kl": kl, "threshold": threshold(q1, med, q3)}
    if state is None:
        counts = combined["counts"]
        return {"located": RadixSelect.first(counts, quantile_ranks(int(counts.sum()), QUANTILES))}
    keys = RadixSelect.second(state["located"], combined["lo"])
    q1, med, q3 = (key_value(k) for k in keys)
    return {"threshold": threshold(q1, med, q3)}


def blend(chunk: Chunk, state: Any) -> torch.Tensor:
    b, x = _pair(chunk)
    if state is None or "threshold" not in state:
        raise ValueError("arcee_fusion needs its statistic state")
    kl = state["kl"] if _one_d(chunk) else kl_rows(x, b)
    keep = importance(x, b, kl) >= state["threshold"]
    return b + (x - b) * keep.to(x.dtype)


ARCEE_FUSION = register(
    MergeMethod(
        name="arcee_fusion",
        blend=blend,
        statistic=Statistic(passes=_passes, partial=_partial, combine=_combine, finish=_finish),
        needs_base=True,
        non_base=(1, 1),
    )
)
