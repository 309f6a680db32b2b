"""Counter-based random masks: the same numbers for an element however the tensor is chunked.

A draw is a hash of (seed, model, flat element index), so a chunk draws the same numbers as the
whole tensor would at the same positions, and a breed in place draws what a merge to disk draws.
Used by dare_* (Bernoulli keep masks) and della (MagPrune's rank-dependent keep probabilities).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from darwin_stream.threads import PerThread

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def mix64(x: int) -> int:
    """splitmix64's finaliser: a 64-bit key from a seed or a model index."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mul32_split(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without int64 overflow: split x into 16-bit halves.
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mul32_wrapping(x: torch.Tensor, c: int) -> torch.Tensor:
    # x, c < 2**32: the int64 product wraps past 2**63, but its low 32 bits are the product's.
    return (x * c) & _M32


def _wraps() -> bool:
    """Whether torch's int64 multiply wraps on overflow (it does on every CPU build measured)."""
    x = torch.tensor([0xFFFFFFFF, 0xDEADBEEF, 1], dtype=torch.int64)
    return _mul32_wrapping(x, 0x846CA68B).tolist() == [(int(v) * 0x846CA68B) & _M32 for v in x]


# The wrapping product is 4x cheaper (measured: 0.10 s against 0.40 s per 2^22 elements), and the
# masks are most of dare's and della's time; the split one gives the same bits where it does not wrap.
_mul32 = _mul32_wrapping if _wraps() else _mul32_split


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash over int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, model: int) -> int:
    return mix64(mix64(seed) ^ mix64(model + 0x9E3779B97F4A7C15))


def uniform_bits(seed: int, model: int, offset: int, n: int) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for flat elements offset..offset+n of one model's tensor.

    The reference form of `uniform_u32`, which draws the same bits faster."""
    key = _key(seed, model)
    idx = torch.arange(offset, offset + n, dtype=torch.int64)
    h = lowbias32((idx & _M32) ^ (key & _M32))
    return lowbias32(h ^ (idx >> 32) ^ (key >> 32))


def _lowbias32_u32(x: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 in place over uint32 (numpy's uint32 multiply wraps, its shifts are logical)."""
    np.right_shift(x, 16, out=tmp)
    x ^= tmp
    x *= np.uint32(0x7FEB352D)
    np.right_shift(x, 15, out=tmp)
    x ^= tmp
    x *= np.uint32(0x846CA68B)
    np.right_shift(x, 16, out=tmp)
    x ^= tmp


def uniform_u32(seed: int, model: int, offset: int, n: int) -> np.ndarray:
    """`uniform_bits` as a uint32 array, the same bits.

    Computed in numpy's uint32, where the 32-bit hash needs no masking and no 64-bit lanes:
    1.4 ns an element against 8.7 ns for the int64 torch form (2^15 elements, one thread); the
    masks were most of dare's time. Within a run of flat indices sharing their high 32 bits
    (every tensor under 2^32 elements is one run) the hash's second input is the first's output
    xor a constant."""
    key = _key(seed, model)
    out = np.empty(n, dtype=np.uint32)
    tmp = np.empty(n, dtype=np.uint32)
    start = offset
    while start < offset + n:
        stop = min(offset + n, (start >> 32) + 1 << 32)
        x, t = out[start - offset : stop - offset], tmp[: stop - start]
        np.copyto(x, np.arange(start & _M32, ((stop - 1) & _M32) + 1, dtype=np.uint32))
        x ^= np.uint32(key & _M32)
        _lowbias32_u32(x, t)
        x ^= np.uint32(((start >> 32) ^ (key >> 32)) & _M32)
        _lowbias32_u32(x, t)
        start = stop
    return out


# A dare merge draws each mask twice, for the statistic's L1 rescale and for the blend: for a tensor
# that is one task the two come from the same thread, one after the other, so the statistic keeps its
# masks, packed (a bit an element), for the blend to take back instead of hashing again (a quarter of
# dare's time). A mask depends only on its key (seed, model, first index, count, threshold), never on
# the data, so a kept mask is always right. Each thread keeps at most MASK_CACHE_PER_ELEM bytes per
# element of the block asking (2 MiB for a 2^17-element block): declared in dare's temporaries.
MASK_CACHE_PER_ELEM = 16


class _Kept:
    """One thread's kept masks, oldest first."""

    def __init__(self) -> None:
        self.masks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.bytes = 0

    def put(self, key: tuple[int, ...], packed: np.ndarray, cap: int) -> None:
        if packed.nbytes > cap or key in self.masks:
            return
        while self.masks and self.bytes + packed.nbytes > cap:
            self.bytes -= self.masks.popitem(last=False)[1].nbytes
        self.masks[key] = packed
        self.bytes += packed.nbytes

    def take(self, key: tuple[int, ...]) -> np.ndarray | None:
        packed = self.masks.pop(key, None)
        if packed is not None:
            self.bytes -= packed.nbytes
        return packed


_kept_by_thread: PerThread[_Kept] = PerThread(_Kept)


def _kept() -> _Kept:
    return _kept_by_thread.get()


def forget_masks() -> None:
    """Drop every thread's kept masks (a merge's end: dask keeps its pool threads alive)."""
    _kept_by_thread.clear()


def keep_mask(seed: int, model: int, offset: int, shape: Sequence[int], density: float, *,
              remember: bool = False, recall: bool = False) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask for a chunk, identical however the tensor is chunked.

    `remember`: keep it for a later `recall` of the same mask on this thread (see _Kept)."""
    n = 1
    for s in shape:
        n *= s
    threshold = round(min(max(density, 0.0), 1.0) * 2**32)
    if threshold > _M32:
        return torch.ones(tuple(shape), dtype=torch.bool)
    key = (seed, model, offset, n, threshold)
    packed = _kept().take(key) if recall else None
    if packed is not None:
        bits = np.unpackbits(packed, count=n).view(np.bool_)
    else:
        bits = uniform_u32(seed, model, offset, n) < np.uint32(threshold)
        if remember:
            _kept().put(key, np.packbits(bits), MASK_CACHE_PER_ELEM * n)
    return torch.from_numpy(bits).reshape(tuple(shape))


def apply_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x *= keep` (a bool mask shaped like x), in place, as mergekit applies its masks.

    On the CPU through numpy, whose bool-to-float cast is vectorised: 0.15 ns an element against
    0.52 for torch's `mul_` by a bool tensor (2^17 elements, one thread), which every sparsified
    task vector pays once or twice."""
    if (x.device.type == "cpu" and keep.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and keep.is_contiguous()):
        xn = x.numpy()
        np.multiply(xn, keep.numpy().reshape(xn.shape), out=xn)
        return x
    return x.mul_(keep.to(x.device))
