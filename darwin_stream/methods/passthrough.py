"""passthrough: copy one model's rows (layer stacking / frankenmerges), optionally times `scale`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from darwin_stream.methods.breeding import CHOOSE
from darwin_stream.methods.contract import Arity, Chunk, MergeMethod, Params, doc_summary, param


def blend(chunk: Chunk, state: Any = None) -> torch.Tensor:
    sources = ([chunk.base] if chunk.base is not None else []) + list(chunk.models)
    if len(sources) != 1:
        raise ValueError(f"passthrough expects exactly one input tensor, got {len(sources)}")
    scale = chunk.model_params[0].get("scale") if chunk.models and chunk.model_params else None
    x = sources[0]
    if chunk.out is not None:
        return x.mul_(float(scale)) if scale is not None else x  # the engine's scratch: no copy needed
    return x * float(scale) if scale is not None else x.clone()


def _scale(params: Params) -> float:
    """`scale`: absent or null (the manifest gave none) means 1."""
    s = params.get("scale")
    return 1.0 if s is None else float(s)


def identity(params: Params, model_params: Sequence[Params]) -> bool:
    """Unscaled: the child's tensor is the input's bytes."""
    return _scale(params) == 1.0 and not (model_params and _scale(model_params[0]) != 1.0)


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary=doc_summary(__doc__, "passthrough"),
    blend=blend,
    model_parameters=(param("scale", None, "multiply the tensor by it (none: copy)"),),
    arity=Arity(1, 1, "takes exactly 1 model per slice, got {inputs}"),
    inplace=True,
    identity=identity,
    breed=CHOOSE,
)
