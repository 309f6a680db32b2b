"""passthrough: copy one model's rows (layer stacking / frankenmerges), optionally times `scale`."""

from __future__ import annotations

from typing import Any

import torch

from darwin_stream.methods import Chunk, MergeMethod, register


def blend(chunk: Chunk, state: Any = None) -> torch.Tensor:
    sources = ([chunk.base] if chunk.base is not None else []) + list(chunk.models)
    if len(sources) != 1:
        raise ValueError(f"passthrough expects exactly one input tensor, got {len(sources)}")
    scale = chunk.model_params[0].get("scale") if chunk.models and chunk.model_params else None
    x = sources[0]
    if chunk.out is not None:
        return x.mul_(float(scale)) if scale is not None else x  # the engine's scratch: no copy needed
    return x * float(scale) if scale is not None else x.clone()


PASSTHROUGH = register(MergeMethod(name="passthrough", blend=blend, model_param_defaults={"scale": None}, inplace=True))
