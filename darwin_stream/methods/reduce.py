"""Reductions that statistics share: combining partials, and float64 Gram matrices."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


def sum_tree(parts: Sequence[Any]) -> Any:
    """Combine partials: tensors are summed, anything else (parameters, flags) is taken from the first
    part. Dicts, lists, tuples and dataclasses are combined field by field."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        out = first.clone()
        for p in parts[1:]:
            out += p
        return out
    if isinstance(first, dict):
        return {k: sum_tree([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(sum_tree([p[i] for p in parts]) for i in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {f.name: sum_tree([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        return dataclasses.replace(first, **fields)
    return first


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 Gram matrix of the flattened vectors."""
    flat = [v.reshape(-1).to(torch.float64) for v in vectors]
    k = len(flat)
    g = torch.empty((k, k), dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = flat[i] @ flat[j]
    return g
