"""The zarr-extensions `bfloat16` data type for zarr-python 3.1, backed by ml_dtypes.

zarr 3.1 ships float16/32/64 but no bfloat16, and LLM weights are mostly bf16. Registering this
ZDType lets bf16 tensors be stored as real bf16 arrays (metadata `"data_type": "bfloat16"`, the name
the zarr-extensions registry gives it), so they round-trip bit-exactly and other zarr readers that
know the extension read them as bf16 rather than as opaque uint16 bits.

Importing `darwin_stream.store` registers it once; `register()` is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, DTypeJSON
from zarr.core.dtype.npy.common import endianness_to_numpy_str, get_endianness_from_numpy_dtype
from zarr.core.dtype.npy.float import BaseFloat

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """bfloat16 (1 sign, 8 exponent, 7 mantissa bits) as numpy's ml_dtypes.bfloat16."""

    dtype_cls = type(BF16)  # type: ignore[assignment]
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()  # no zarr v2 spelling: v3 only

    @property
    def item_size(self) -> int:
        return 2

    @classmethod
    def _check_native_dtype(cls, dtype: object) -> bool:
        return isinstance(dtype, np.dtype) and dtype.type is ml_dtypes.bfloat16

    @classmethod
    def from_native_dtype(cls, dtype: object) -> Self:
        if cls._check_native_dtype(dtype):
            return cls(endianness=get_endianness_from_numpy_dtype(dtype))  # type: ignore[arg-type]
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected ml_dtypes.bfloat16")

    def to_native_dtype(self) -> np.dtype:  # type: ignore[override]
        return BF16.newbyteorder(endianness_to_numpy_str(self.endianness))

    @classmethod
    def _check_json_v2(cls, data: DTypeJSON) -> bool:  # type: ignore[override]
        return False


def register() -> None:
    """Make zarr resolve "bfloat16" metadata and ml_dtypes.bfloat16 arrays to `BFloat16`."""
    if "bfloat16" not in data_type_registry.contents:
        data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)
