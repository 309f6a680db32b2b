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
from dataclasses import dataclass

import torch

HI_BINS = 1 << 15  # |x| has sign bit 0, so its top 16 bits are < 2**15
LO_BINS = 1 << 16
NOTHING = 0x7FFFFFFF  # a key above every non-NaN magnitude: "keep nothing"

Located = tuple[int, int]  # (top bin, 1-based rank inside it)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like |x|: the float32 bit pattern with the sign bit cleared.

    Cleared by abs (which only clears the sign bit, NaN's too), 7x cheaper than an integer and
    with the constant (measured: 0.08 against 0.58 ns an element)."""
    return x.to(torch.float32).abs().view(torch.int32)


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


# --- exact windows: a rank range kept exactly, ties broken by position ----------------------------
#
# mergekit keeps exactly k elements (ties: `torch.argsort`/`topk` of the whole tensor), choosing among
# elements equal to the threshold in an order its sort leaves undefined (measured: not stable on CPU,
# torch 2.13). A threshold alone keeps every tied element: with bf16 task vectors, whose values are
# quantised, that kept up to a few percent more than k, which moves the density, the L1 rescale and
# sce's weights. A window keeps exactly mergekit's count: the elements strictly inside the two
# boundary keys, and of the elements equal to a boundary key the first ones in flat (row-major) order.
# That order needs, per boundary key, how many tied elements precede each row: one streaming pass
# of per-row counts (`row_counts`), made only for a key whose tied elements are split.


@dataclass(frozen=True)
class TieGroup:
    """The elements equal to one boundary key: keep those whose tie rank (0-based, in flat order)
    lies in [start, stop). `prefix[r]`: tied elements in the rows before row r, once counted."""

    key: int
    start: int
    stop: int
    count: int
    prefix: torch.Tensor | None = None

    @property
    def split(self) -> bool:
        """Some of the tied elements are kept and some are not: their order matters."""
        return max(self.start, 0) < min(self.stop, self.count) and not (self.start <= 0 and self.stop >= self.count)

    def keeps_all(self) -> bool:
        return self.start <= 0 and self.stop >= self.count

    def add_ranked(self, keep: torch.Tensor, keys: torch.Tensor, offset: int, row_elems: int) -> None:
        """Set `keep` where a chunk starting at flat `offset` holds tied elements of rank [start, stop)."""
        assert self.prefix is not None, "a split tie group needs its row counts"
        rows = max(1, keys.numel() // max(row_elems, 1))
        r0 = offset // max(row_elems, 1)
        before, after = self.prefix[r0 : r0 + rows], self.prefix[r0 + 1 : r0 + rows + 1]
        held = after > before
        whole = held & (before >= self.start) & (after <= self.stop)
        some = held & (before < self.stop) & (after > self.start) & ~whole
        flat_keep, flat_keys = keep.view(rows, -1), keys.reshape(rows, -1)
        if bool(whole.any()):
            idx = torch.nonzero(whole).reshape(-1)
            a, b = int(idx[0]), int(idx[-1]) + 1  # rows between two whole rows are whole or hold none
            flat_keep[a:b] |= flat_keys[a:b] == self.key
        for r in torch.nonzero(some).reshape(-1).tolist():
            eq = flat_keys[r] == self.key
            j = torch.cumsum(eq, 0) - 1 + int(before[r])
            flat_keep[r] |= eq & (j >= self.start) & (j < self.stop)

@dataclass(frozen=True)
class Window:
    """Keep exactly the elements of descending ranks (skip, skip + take]: keys strictly between the
    boundary keys, and the chosen part of each boundary key's tie group (`groups`, one or two)."""

    lo: int  # the key at rank skip + take (the smallest kept)
    hi: int | None  # the key at rank skip + 1 (None: skip == 0, nothing dropped from the top)
    groups: tuple[TieGroup, ...]

    @property
    def split(self) -> bool:
        return any(g.split for g in self.groups)

    @property
    def ranked(self) -> bool:
        """Whether every split group has its row counts (pass 3, or the gathered bin, gave them)."""
        return all(g.prefix is not None for g in self.groups if g.split)

    def keep(self, keys: torch.Tensor, offset: int, row_elems: int) -> torch.Tensor:
        """Which elements of a chunk (its magnitude keys, from flat `offset`) the window keeps.

        A boundary group kept whole widens a strict comparison to an inclusive one. A split group's
        per-row prefix counts say which rows keep all their tied elements (a contiguous range,
        compared row-slice by row-slice) and which keep some (at most two in the tensor, ranked by a
        cumulative count of that row alone): before, every element was ranked, one int64 cumulative
        count and four comparisons over each block, a third of ties' blend."""
        whole = {g.key for g in self.groups if g.keeps_all()}
        keep = keys >= self.lo if self.lo in whole else keys > self.lo
        if self.hi is not None:
            keep &= keys <= self.hi if self.hi in whole else keys < self.hi
        for g in self.groups:
            if g.split:
                g.add_ranked(keep, keys, offset, row_elems)
        return keep

    def kept_sum(self, hi_sums: torch.Tensor, lo_hists: dict[int, torch.Tensor]) -> float:
        """Exact float64 sum of the kept magnitudes (for the L1 rescale), from the histograms."""

        def at_or_above(key: int) -> float:
            return total_at_or_above(key, hi_sums, lo_hists.get(key >> 16, torch.zeros(1)))

        def value(key: int) -> float:
            return float(key_values(torch.tensor([key], dtype=torch.int32))[0])

        inside = at_or_above(self.lo) - self.groups[-1].count * value(self.lo) if self.groups else at_or_above(self.lo)
        if self.hi is not None:
            inside -= at_or_above(self.hi)
        if self.hi == self.lo:
            inside = 0.0
        kept = sum(max(0, min(g.stop, g.count) - max(g.start, 0)) * value(g.key) for g in self.groups)
        return inside + kept


def window_ranks(skip: int, take: int) -> list[int]:
    """The descending ranks whose keys bound a window: rank skip + 1 (when skip > 0) and skip + take."""
    return ([skip + 1] if skip > 0 else []) + [skip + take]


def make_window(skip: int, take: int, counts: torch.Tensor, located: Sequence[Located | None],
                lo: dict[int, torch.Tensor]) -> Window:
    """The window of ranks (skip, skip + take] from pass 1's top-bin counts and pass 2's low
    histograms (`located` from `RadixSelect.first(counts, window_ranks(skip, take))`)."""
    ranks = window_ranks(skip, take)
    found = []
    for rank, loc in zip(ranks, located, strict=True):
        assert loc is not None
        b, r = loc
        low, r2 = locate(lo[b], r)
        key = (b << 16) | low
        found.append((key, rank - r2, int(lo[b][low])))  # (key, elements above it, elements equal)
    groups: dict[int, TieGroup] = {}
    for key, above, count in found:
        groups[key] = TieGroup(key=key, start=skip - above, stop=skip + take - above, count=count)
    lo_key = found[-1][0]
    hi_key = found[0][0] if skip > 0 else None
    ordered = tuple(groups[k] for k in sorted(groups, reverse=True))  # hi first, then lo
    return Window(lo=lo_key, hi=hi_key, groups=ordered)


@dataclass(frozen=True)
class RowCounts:
    """A pass's partial: per row from `row0`, how many elements equal each split group's key."""

    row0: int
    counts: torch.Tensor  # (rows, groups) int64


def row_counts(keys: torch.Tensor, window: Window, offset: int, row_elems: int) -> RowCounts:
    split = [g for g in window.groups if g.split]
    rows = max(1, keys.numel() // max(row_elems, 1))
    flat = keys.reshape(rows, -1)
    counts = torch.stack([(flat == g.key).sum(1) for g in split], dim=1) if split else torch.zeros((rows, 0), dtype=torch.int64)
    return RowCounts(offset // max(row_elems, 1), counts)


def combine_rows(parts: Sequence[RowCounts]) -> RowCounts:
    """Row counts of several chunks, in row order (chunks are row-aligned and disjoint)."""
    ordered = sorted(parts, key=lambda p: p.row0)
    return RowCounts(ordered[0].row0, torch.cat([p.counts for p in ordered]))


def with_prefixes(window: Window, rows: RowCounts) -> Window:
    """The window with each split group's per-row prefix counts, from the whole tensor's row counts."""
    assert rows.row0 == 0
    out, i = [], 0
    for g in window.groups:
        if not g.split:
            out.append(g)
            continue
        prefix = torch.zeros(rows.counts.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(rows.counts[:, i], 0, out=prefix[1:])
        out.append(TieGroup(key=g.key, start=g.start, stop=g.stop, count=g.count, prefix=prefix))
        i += 1
    return Window(lo=window.lo, hi=window.hi, groups=tuple(out))


# --- small bins: pass 2 gathers the bin's elements, and pass 3 has nothing left to count ---------
#
# The window's boundary bins usually hold a small share of the tensor (a top bin is a bf16-sized
# interval of magnitudes: 0.3% of a 3072x1024 task vector's elements for ties' threshold). Pass 2 then
# gathers each element of the bin, its low 16 bits and its row, instead of a histogram: the low
# histogram follows, and so do the per-row counts of the tied elements a window splits, so pass 3
# reads nothing (it was a third of ties' statistic). A bin above MEMBER_LIMIT elements keeps the
# histogram and the third pass, so that a partial stays as small as a histogram.

MEMBER_LIMIT = 1 << 16  # elements of one bin gathered (12 bytes each), at most: 768 KiB, a histogram's size


@dataclass(frozen=True)
class Members:
    """The elements of one top bin in a chunk (or the tensor): low 16 bits and rows, in flat order."""

    lows: torch.Tensor  # int64
    rows: torch.Tensor  # int64, rows of the whole tensor
    total_rows: int


def gathers(counts: torch.Tensor, bins: Sequence[int]) -> bool:
    """Whether pass 2 gathers the elements of `bins` (each small enough) rather than histograms them."""
    return all(int(counts[b]) <= MEMBER_LIMIT for b in bins)


def bin_members(keys: torch.Tensor, bins: Sequence[int], offset: int, row_elems: int,
                total_rows: int) -> dict[int, Members]:
    """Pass 2 partial, gathering: the elements of each of `bins` in a chunk starting at flat `offset`."""
    k = keys.reshape(-1)
    hi = k >> 16
    out = {}
    for b in bins:
        idx = torch.nonzero(hi == b).reshape(-1)
        rows = (idx + offset) // max(row_elems, 1)
        out[b] = Members((k[idx] & 0xFFFF).to(torch.int64), rows, total_rows)
    return out


def combine_members(parts: Sequence[dict[int, Members]]) -> dict[int, Members]:
    """Members of several chunks (what is made of them counts them: their order does not matter)."""
    out = {}
    for b in parts[0]:
        ms = [p[b] for p in parts]
        out[b] = Members(torch.cat([m.lows for m in ms]), torch.cat([m.rows for m in ms]), ms[0].total_rows)
    return out


def members_histograms(members: dict[int, Members]) -> dict[int, torch.Tensor]:
    """Pass 2's low histograms, from the gathered elements."""
    return {b: torch.bincount(m.lows, minlength=LO_BINS) for b, m in members.items()}


def members_prefixes(window: Window, members: dict[int, Members]) -> Window:
    """The window with each split group's per-row prefix counts, from the gathered elements: what
    pass 3's row counts give, without reading the tensor again."""
    split = [g for g in window.groups if g.split]
    if not split:
        return window
    cols = []
    for g in split:
        m = members[g.key >> 16]
        cols.append(torch.bincount(m.rows[m.lows == (g.key & 0xFFFF)], minlength=m.total_rows))
    return with_prefixes(window, RowCounts(0, torch.stack(cols, dim=1)))
