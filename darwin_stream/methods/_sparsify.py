"""Exact streaming order statistics and chunking-independent randomness for the sparsifying methods.

Magnitudes are ranked by the bit patterns of their float32 values: for non-negative floats the
integer order of the bits is the value order, so the k-th largest magnitude of a tensor can be found
exactly with two histogram passes (top 16 bits, then the low 16 bits inside one top bin), whatever
the chunking. Randomness is a counter-based hash of (seed, model, flat element index), so a chunk
draws the same numbers as the whole tensor would at the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

HI_BINS = 1 << 15  # |x| has sign bit 0, so its top 16 bits are < 2**15
LO_BINS = 1 << 16
NOTHING = 0x7FFFFFFF  # a key above every non-NaN magnitude: "keep nothing"

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like |x|: the float32 bit pattern with the sign bit cleared."""
    return x.to(torch.float32).view(torch.int32) & 0x7FFFFFFF


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 magnitudes that `keys` encode, as float64 for exact-ish sums."""
    return keys.view(torch.float32).to(torch.float64)


def hi_histogram(keys: torch.Tensor, with_sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass 1 partial: counts (and float64 sums of magnitudes) per top-16-bit bin."""
    hi = (keys >> 16).reshape(-1)
    counts = torch.bincount(hi, minlength=HI_BINS)
    sums = torch.bincount(hi, weights=key_values(keys).reshape(-1), minlength=HI_BINS) if with_sums else None
    return counts, sums


def lo_histogram(keys: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """Pass 2 partial: counts per low-16-bit value among the keys whose top bits are `hi_bin`."""
    k = keys.reshape(-1)
    inside = k[(k >> 16) == hi_bin]
    return torch.bincount(inside & 0xFFFF, minlength=LO_BINS)


def locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest (1-based) element, and its 1-based rank inside that bin."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int(torch.nonzero(at_or_above >= k).max())
    return b, k - int(at_or_above[b] - counts[b])


def total_at_or_above(key: int, hi_sums: torch.Tensor, lo_counts: torch.Tensor) -> float:
    """Exact (float64) sum of the magnitudes whose keys are >= key, given the histograms of key's bin."""
    if key >= NOTHING:
        return 0.0
    hi, lo = key >> 16, key & 0xFFFF
    in_bin = torch.arange(lo, LO_BINS, dtype=torch.int64) | (hi << 16)
    values = key_values(in_bin.to(torch.int32))
    return float(hi_sums[hi + 1 :].sum()) + float((lo_counts[lo:].to(torch.float64) * values).sum())


class RadixSelect:
    """Exact k-th largest magnitude(s) of one tensor in two streaming passes.

    Usage per pass: pass 1 partial = `hi_histogram`, combined by summing; `first(counts, ks)` picks the
    top bins; pass 2 partial = `lo_histogram` for each of `bins`; `second(lo)` gives the threshold keys.
    """

    @staticmethod
    def first(counts: torch.Tensor, ks: Sequence[int]) -> list[tuple[int, int] | None]:
        return [None if k <= 0 else locate(counts, k) for k in ks]

    @staticmethod
    def bins(located: Sequence[tuple[int, int] | None]) -> list[int]:
        return sorted({loc[0] for loc in located if loc is not None})

    @staticmethod
    def second(located: Sequence[tuple[int, int] | None], lo: dict[int, torch.Tensor]) -> list[int]:
        keys = []
        for loc in located:
            if loc is None:
                keys.append(NOTHING)
                continue
            b, rank = loc
            low, _ = locate(lo[b], rank)
            keys.append((b << 16) | low)
        return keys


def sum_tree(parts: Sequence[Any]) -> Any:
    """Combine partials: tensors are summed, anything else (parameters, flags) is taken from the first part."""
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
    return first


def _mix64(x: int) -> int:
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without int64 overflow: split x into 16-bit halves.
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_bits(seed: int, model: int, offset: int, n: int) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for flat elements offset..offset+n of one model's tensor."""
    key = _mix64(_mix64(seed) ^ _mix64(model + 0x9E3779B97F4A7C15))
    idx = torch.arange(offset, offset + n, dtype=torch.int64)
    h = _lowbias32((idx & _M32) ^ (key & _M32))
    return _lowbias32(h ^ (idx >> 32) ^ (key >> 32))


def keep_mask(seed: int, model: int, offset: int, shape: Sequence[int], density: float) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask for a chunk, identical however the tensor is chunked."""
    n = 1
    for s in shape:
        n *= s
    threshold = round(min(max(density, 0.0), 1.0) * 2**32)
    return (uniform_bits(seed, model, offset, n) < threshold).reshape(tuple(shape))
