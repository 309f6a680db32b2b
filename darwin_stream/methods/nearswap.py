"""nearswap: take the other model's value where it is near the base, keep the base where they differ.

Per element, `w = clamp(t / max(|b - x|, 1e-6), 0, 1)` and `out = w x + (1 - w) b` (mergekit 0.1.5,
after alchemonaut's QuartetAnemoi): elementwise, so no statistic and any chunking gives the same child.
"""

from __future__ import annotations

from typing import Any

import torch

from darwin_stream.methods.contract import Arity, BasePolicy, Chunk, MergeMethod, doc_summary, required

FLOOR = 1e-6  # mergekit clamps |b - x| to at least this before dividing


def blend(chunk: Chunk, state: Any = None) -> torch.Tensor:
    if chunk.base is None or len(chunk.models) != 1:
        raise ValueError("nearswap needs the base model and exactly one other model")
    a, b = chunk.base, chunk.models[0]
    t = float(chunk.params["t"])
    w = chunk.out if chunk.out is not None else torch.empty_like(a)
    # mergekit's roundings, step by step: `t / x` is torch's reciprocal(x) * t, then two products
    # and one sum; matching them keeps the child within rounding of mergekit's float32 child.
    torch.sub(a, b, out=w).abs_().clamp_(min=FLOOR).reciprocal_().mul_(t).clamp_(0, 1)
    xb = b.mul(w) if chunk.out is None else b.mul_(w)
    w.neg_().add_(1)  # 1 - w, exactly
    xa = a.mul(w) if chunk.out is None else a.mul_(w)
    return torch.add(xb, xa, out=w)


NEARSWAP = MergeMethod(
    name="nearswap",
    summary=doc_summary(__doc__, "nearswap"),
    blend=blend,
    base=BasePolicy.REQUIRED,
    inplace=True,
    arity=Arity(1, 1),
    parameters=(required("t", "the distance below which the other model's value is taken whole"),),
)
