"""One table of the tensor dtypes darwin-stream reads and writes, in safetensors' spelling."""

from __future__ import annotations

import functools

import numpy as np
import torch

from darwin_stream.errors import ManifestError, SourceError

# safetensors code -> (torch dtype, numpy dtype, itemsize); BF16's numpy dtype is ml_dtypes', looked
# up on first use (`to_numpy`): importing ml_dtypes costs 0.5-0.9 s here, a third of a model_stock
# merge's start-up, and only zarr stores and their exports need it.
_TABLE: dict[str, tuple[torch.dtype, np.dtype | None, int]] = {
    "BF16": (torch.bfloat16, None, 2),
    "F16": (torch.float16, np.dtype(np.float16), 2),
    "F32": (torch.float32, np.dtype(np.float32), 4),
    "F64": (torch.float64, np.dtype(np.float64), 8),
    "I64": (torch.int64, np.dtype(np.int64), 8),
    "I32": (torch.int32, np.dtype(np.int32), 4),
    "I16": (torch.int16, np.dtype(np.int16), 2),
    "I8": (torch.int8, np.dtype(np.int8), 1),
    "U8": (torch.uint8, np.dtype(np.uint8), 1),
    "BOOL": (torch.bool, np.dtype(np.bool_), 1),
}

# Names users write in YAML (mergekit's spelling) -> safetensors code.
_ALIASES = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float64": "F64", "fp64": "F64",
}

FLOAT_CODES = frozenset({"BF16", "F16", "F32", "F64"})


def known(code: str) -> bool:
    return code in _TABLE


def itemsize(code: str) -> int:
    return _TABLE[code][2]


def to_torch(code: str) -> torch.dtype:
    return _TABLE[code][0]


def to_numpy(code: str) -> np.dtype:
    dtype = _TABLE[code][1]
    return _bfloat16() if dtype is None else dtype


@functools.cache
def _bfloat16() -> np.dtype:
    import ml_dtypes  # heavy (0.5-0.9 s): only stores need numpy's bfloat16

    return np.dtype(ml_dtypes.bfloat16)


def from_torch(dtype: torch.dtype) -> str:
    for code, (t, _, _) in _TABLE.items():
        if t == dtype:
            return code
    raise SourceError(f"unsupported tensor dtype {dtype}")


def parse(name: str) -> str:
    """A user's dtype name (bfloat16, float16, float32, BF16, ...) -> safetensors code."""
    code = _ALIASES.get(name.lower(), name.upper())
    if code not in _TABLE or code not in FLOAT_CODES:
        raise ManifestError(f"dtype: expected one of bfloat16, float16, float32, float64, got {name!r}")
    return code
