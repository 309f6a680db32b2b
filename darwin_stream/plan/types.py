"""The plan's types: what the child is, tensor by tensor. A leaf module: it imports nothing above it.

A plan is plain, JSON-serialisable data. The engine turns it into a dask graph that writes a child to
disk; the vLLM worker extension (score/) receives the same plan and blends tensors in place, and
the transformers backend breeds it into its live model. None of them needs the manifest again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RowRun:
    """Rows [row, row + count) of an input, gathered rather than read where they are stored.

    Each term is (parent key, tensor, first source row): the run's rows are rows [first, first +
    count) of that tensor, or the mean of several such ranges (summed in order in float32, then
    divided, as mergekit averages a token's embedding over the models that have it); no term
    means zeros. A child whose vocabulary differs from a parent's (tokenizer_source: union, ...)
    takes its embedding and lm_head inputs this way, one token row at a time, in runs so that a
    vocabulary that mostly keeps its order costs a few runs, not one entry per token.

    A `mean` run (mergekit's `tokenizer.pad_to_multiple_of`) repeats one row: the mean of the
    input's own gathered rows [0, row), the rows of real tokens, as mergekit fills the padding rows
    of each model's embedding before the merge.
    """

    row: int
    count: int
    terms: tuple[tuple[str, str, int], ...] = ()
    mean: bool = False


@dataclass(frozen=True)
class SourceRef:
    """One input tensor: which parent, which tensor, and how it is reshaped before blending."""

    parent: str  # key into Plan.parents
    tensor: str  # tensor name inside that parent
    pad_to: tuple[int, ...] | None = None  # zero-pad (trailing rows/cols) to this shape before blending
    rows: tuple[RowRun, ...] | None = None  # gathered rows (a re-indexed vocabulary), covering every row


@dataclass(frozen=True)
class TensorPlan:
    name: str  # tensor name in the child
    shape: tuple[int, ...]  # shape in the child
    dtype: str  # safetensors code written to the child (BF16, F16, F32)
    method: str  # key into methods.REGISTRY
    models: tuple[SourceRef, ...]  # non-base inputs, in manifest order
    model_params: tuple[dict[str, Any], ...] = ()  # resolved per-model parameters, same order as models
    params: dict[str, Any] = field(default_factory=dict)  # resolved method-level parameters
    base: SourceRef | None = None
    layer: int | None = None  # child layer index, None outside the layers
    role: str | None = None  # canonical role from arch/
    seed: int = 0

    def sources(self) -> tuple[SourceRef, ...]:
        return ((self.base,) if self.base else ()) + self.models


@dataclass
class Plan:
    parents: dict[str, str]  # key -> spec as the user wrote it (path, repo id, URL, store)
    tensors: list[TensorPlan]
    config_from: str  # parent key whose config.json, tokenizer and generation_config the child takes
    tokenizer_from: str
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. intermediate_size after padding
    out_dtype: str | None = None  # None: each tensor keeps its own `dtype`
    manifest: str = ""  # the manifest text, for the model card
    notes: list[str] = field(default_factory=list)  # warnings the model card repeats
    options: dict[str, Any] = field(default_factory=dict)  # darwin section: memory_budget, shard_size, ...
    # The child's own tokenizer (tokenizer_source, tokenizer:, chat_template), as data that
    # darwin_stream.tokenizer rebuilds it from; empty when the child keeps tokenizer_from's files.
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)

        def ref(r: dict | None) -> SourceRef | None:
            if r is None:
                return None
            rows = r.get("rows")
            return SourceRef(
                r["parent"],
                r["tensor"],
                tuple(r["pad_to"]) if r.get("pad_to") else None,
                None if rows is None else tuple(
                    RowRun(g["row"], g["count"], tuple((a, b, c) for a, b, c in g["terms"]), bool(g.get("mean")))
                    for g in rows
                ),
            )

        tensors = [
            TensorPlan(
                **{
                    **t,
                    "shape": tuple(t["shape"]),
                    "models": tuple(ref(m) for m in t["models"]),
                    "model_params": tuple(t["model_params"]),
                    "base": ref(t["base"]),
                }
            )
            for t in d.pop("tensors")
        ]
        return cls(tensors=tensors, **d)

    @property
    def nbytes(self) -> int:
        from darwin_stream import dtypes

        total = 0
        for t in self.tensors:
            n = 1
            for s in t.shape:
                n *= s
            total += n * dtypes.itemsize(t.dtype)
        return total


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed < 2**31 that depends only on the manifest seed and the tensor's name,
    so random methods (dare_*) give the same child on every run and every chunking."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def layer_t(index: int, length: int) -> float:
    """Where output layer `index` of a slice of `length` layers sits on a gradient (mergekit: t = 1 for
    a one-layer slice). Tensors outside the layers (embeddings, final norm, lm_head) use t = 0."""
    return index / (length - 1) if length > 1 else 1.0
