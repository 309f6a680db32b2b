"""Exact streamed order statistics of signed float32 values (quantiles, k-th largest).

`_sparsify` ranks magnitudes, whose bit patterns already order like their values. A signed value
needs its bits remapped first: flipping every bit of a negative float and only the sign bit of a
positive one gives unsigned 32-bit keys that order like the floats (-0.0 just below +0.0). The two
radix passes are then those of `_sparsify.RadixSelect`, over 2^16 top bins instead of 2^15.
"""

from __future__ import annotations

import torch

BINS = 1 << 16
_SIGN = 1 << 31


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered like the float32 values of `x`."""
    bits = x.to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= _SIGN, 0xFFFFFFFF - bits, bits + _SIGN)


def key_value(key: int) -> float:
    """The float32 value a key stands for."""
    bits = key - _SIGN if key >= _SIGN else 0xFFFFFFFF - key
    signed = bits - (1 << 32) if bits >= _SIGN else bits
    return float(torch.tensor([signed], dtype=torch.int32).view(torch.float32))


def hi_counts(keys: torch.Tensor) -> torch.Tensor:
    """Pass 1 partial: counts per top-16-bit bin."""
    return torch.bincount(keys >> 16, minlength=BINS)


def lo_counts(keys: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """Pass 2 partial: counts per low-16-bit value among the keys in top bin `hi_bin`."""
    return torch.bincount(keys[(keys >> 16) == hi_bin] & 0xFFFF, minlength=BINS)


def quantile_ranks(n: int, qs: list[float]) -> list[int]:
    """1-based ranks, largest first, of mergekit's quantiles `sorted[int(q * (n - 1))]`.

    The index is computed as mergekit does (a float32 product, truncated), so that it is the same
    element for every n."""
    idx = (torch.tensor(qs, dtype=torch.float32) * (n - 1)).long().tolist()
    return [n - i for i in idx]
