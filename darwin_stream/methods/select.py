"""Exact streamed order statistics over float32 bit patterns (k-th largest, quantiles).

Magnitudes are ranked by the bit patterns of their float32 values: for non-negative floats the
integer order of the bits is the value order, so the k-th largest magnitude of a tensor can be found
exactly with two histogram passes (top 16 bits, then the low 16 bits inside one top bin), whatever
the chunking. A signed value needs its bits remapped first (`ordered_keys`): flipping every bit of a
negative float and only the sign bit of a positive one gives unsigned 32-bit keys that order like
the floats (-0.0 just below +0.0); their top bins number 2^16 instead of 2^15.

Used by ties and breadcrumbs (magnitudes of task vectors), sce (variances) and arcee_fusion
(signed importances).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HI_BINS = 1 << 15  # |x| has sign bit 0, so its top 16 bits are < 2**15
LO_BINS = 1 << 16
NOTHING = 0x7FFFFFFF  # a key above every non-NaN magnitude: "keep nothing"

Located = tuple[int, int]  # (top bin, 1-based rank inside it)


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


def locate(counts: torch.Tensor, k: int) -> Located:
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
    def first(counts: torch.Tensor, ks: Sequence[int]) -> list[Located | None]:
        return [None if k <= 0 else locate(counts, k) for k in ks]

    @staticmethod
    def bins(located: Sequence[Located | None]) -> list[int]:
        return sorted({loc[0] for loc in located if loc is not None})

    @staticmethod
    def second(located: Sequence[Located | None], lo: dict[int, torch.Tensor]) -> list[int]:
        keys = []
        for loc in located:
            if loc is None:
                keys.append(NOTHING)
                continue
            b, rank = loc
            low, _ = locate(lo[b], rank)
            keys.append((b << 16) | low)
        return keys


# --- signed values ---------------------------------------------------------------------------

SIGNED_BINS = 1 << 16
_SIGN = 1 << 31


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered like the float32 values of `x`."""
    bits = x.to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= _SIGN, 0xFFFFFFFF - bits, bits + _SIGN)


def key_value(key: int) -> float:
    """The float32 value a key of `ordered_keys` stands for."""
    bits = key - _SIGN if key >= _SIGN else 0xFFFFFFFF - key
    signed = bits - (1 << 32) if bits >= _SIGN else bits
    return float(torch.tensor([signed], dtype=torch.int32).view(torch.float32))


def hi_counts(keys: torch.Tensor) -> torch.Tensor:
    """Pass 1 partial over signed keys: counts per top-16-bit bin."""
    return torch.bincount(keys >> 16, minlength=SIGNED_BINS)


def lo_counts(keys: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """Pass 2 partial over signed keys: counts per low-16-bit value among the keys in top bin `hi_bin`."""
    return torch.bincount(keys[(keys >> 16) == hi_bin] & 0xFFFF, minlength=SIGNED_BINS)


def quantile_ranks(n: int, qs: list[float]) -> list[int]:
    """1-based ranks, largest first, of mergekit's quantiles `sorted[int(q * (n - 1))]`.

    The index is computed as mergekit does (a float32 product, truncated), so that it is the same
    element for every n."""
    idx = (torch.tensor(qs, dtype=torch.float32) * (n - 1)).long().tolist()
    return [n - i for i in idx]
