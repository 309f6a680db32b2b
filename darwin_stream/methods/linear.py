"""linear: weighted average of the models (model soups), optionally normalised by the weight sum."""

from __future__ import annotations

from typing import Any

import torch

from darwin_stream.methods.breeding import WEIGHTS
from darwin_stream.methods.contract import Chunk, MergeMethod, doc_summary, param, required


def blend(chunk: Chunk, state: Any = None) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (mergekit's default)."""
    if chunk.base is not None:
        # mergekit weighs the base like any other model; the plan must list it among `models` with its
        # weight rather than pass it as `base`, or its contribution would be silently lost.
        raise ValueError("linear takes no base tensor: list the base model among the weighted models")
    if not chunk.models:
        raise ValueError("linear needs at least one model")
    weights = [float(mp["weight"]) for mp in chunk.model_params]
    # mergekit's order of operations (weights as tensors of the chunk's dtype, accumulate with
    # addcmul, divide by their sum last): where the terms nearly cancel, the rounding of each step
    # decides the bf16 result, so matching the child bit for bit means matching this sequence.
    w = torch.tensor(weights, dtype=chunk.models[0].dtype, device=chunk.models[0].device)
    out = chunk.out.zero_() if chunk.out is not None else torch.zeros_like(chunk.models[0])
    for i, x in enumerate(chunk.models):
        out.addcmul_(x, w[i])
    if chunk.params.get("normalize", True):
        total = w.sum()
        if total == 0:
            # mergekit divides anyway and writes inf/NaN weights; refuse instead. The test is on the
            # divisor itself: weights [1, -1 + 1e-9] sum to 1e-9 in float64 but to 0 in float32.
            raise ValueError(f"linear with normalize: the weights {weights} sum to zero")
        out.div_(total)
    return out


def check(params: Any, model_params: Any, numel: int) -> str | None:
    """The plan's view of the zero-sum refusal, in the float32 the engine divides in."""
    if not params.get("normalize", True):
        return None
    weights = [float(mp["weight"]) for mp in model_params]
    if weights and float(torch.tensor(weights, dtype=torch.float32).sum()) == 0:
        return f"linear with normalize: the weights {weights} sum to zero (in float32)"
    return None


LINEAR = MergeMethod(
    name="linear",
    summary=doc_summary(__doc__, "linear"),
    blend=blend,
    model_parameters=(required("weight", "this model's share of the average"),),
    parameters=(param("normalize", True, "divide by the sum of the weights"),),
    inplace=True,
    check=check,
    breed=WEIGHTS,
)
