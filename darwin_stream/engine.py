"""Plan -> dask graph of row-chunk tasks, each bounded in memory, that blend and write the child.

A task reads the same rows of every input once (zero-copy for local shards), then walks them in row
blocks: each block is upcast into this thread's scratch buffers, blended with the tensor's method and
written to its final place in the child's shard. The peak is `workers x (raw rows + one block of
scratch)`, which `chunk_rows` and `block_rows` keep under the memory budget; no block allocates
anything chunk-sized, which is what keeps the kernel from faulting in fresh pages all merge long.

Methods that need a statistic of the whole tensor (slerp, ties, model_stock, ...) get it from
streaming passes: one partial task per chunk, folded by one task per pass, which the tensor's blend
tasks depend on. When a tensor is one task, its statistic is computed inside that task.

`iter_tensors` yields whole child tensors with the same functions: this is what the vLLM worker feeds
to a live engine, so a child bred in place equals the child merged to disk.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import mmap
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dask.threaded
import torch

from darwin_stream import dtypes, methods, pool, reread, row_gather
from darwin_stream.child_writer import PAGE, STAGE_BYTES, release_flushers, staging_buffer, staging_buffers
from darwin_stream.errors import BudgetError, DarwinError, OptionError, PlanError, SourceError
from darwin_stream.plan import Plan, SourceRef, TensorPlan, human_bytes
from darwin_stream.sink import ChildSink
from darwin_stream.sources import Parent
from darwin_stream.threads import PerThread, torch_threads

DEFAULT_BUDGET = 2**30


def get_parent(spec: str) -> Parent:
    """The open parent of `spec` in this process, from the parent pool: tasks carry specs, not
    file handles, so they pickle, and each process (a dask worker too) opens a parent once."""
    return pool.get_parent(spec)


def release_parents() -> None:
    """Close this process's parents (the next read opens them afresh, as they now are)."""
    pool.release_default()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _row_elems(shape: tuple[int, ...]) -> int:
    return _numel(shape[1:]) if shape else 1


def _block_shape(shape: tuple[int, ...], r0: int, r1: int) -> tuple[int, ...]:
    """Shape of rows [r0, r1) of a tensor of `shape` (a 0-d tensor is its own single row)."""
    return (r1 - r0, *shape[1:]) if shape else ()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-d view, one row per row of the tensor, so that row ranges can be sliced."""
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def get_parent_info(plan: Plan, ref: SourceRef):
    return get_parent(plan.parents[ref.parent]).info(ref.tensor)


# --- sizing: blocks and chunks under the budget -----------------------------------------------

# Largest block of elements a blend works on at once. Methods that compute in place get big blocks
# (few Python calls per tensor); the others allocate temporaries for every block, kept small enough
# to be recycled by the heap instead of being mapped afresh (MMAP_THRESHOLD) each time. 2^17, not
# 2^15: at 2^15 a block's Python and dispatch costs and the statistics' per-block histograms (2^15
# and 2^16 bins, folded block by block) outweighed its elements, and a 2^16-bin int64 histogram
# (512 KiB) was mapped afresh each time; ties' kernels took 0.123 s per 3072x1024 tensor, 0.068 s at
# 2^17, breadcrumbs_ties' 0.244 s and 0.108 s (tools/bench_kernels.py, CPU time).
INPLACE_BLOCK = 2**18
HEAP_BLOCK = 2**17
MMAP_THRESHOLD = 4 * HEAP_BLOCK * 4  # bytes: an int64/float64 temporary of a heap block stays below it
CHUNK_CAP = 64 * 2**20  # raw input bytes per task: enough to amortise a task, small enough to balance


def _inputs_itemsize(plan: Plan, tp: TensorPlan) -> int:
    """Raw bytes per element a task holds for its inputs. A gathered input (a re-indexed vocabulary)
    is a float32 copy plus one source range read at a time, where a stored one is a view."""
    return sum(dtypes.itemsize(get_parent_info(plan, s).dtype) + (4 if s.rows else 0) for s in tp.sources())


def block_bytes_per_elem(plan: Plan, tp: TensorPlan) -> int:
    """Scratch and temporaries one element of a block costs: float32 (or float64, for a statistic)
    copies of every input and the result, plus a method's own intermediates. The child-dtype copy
    goes into the writer's staging buffers, counted per worker by `_share`."""
    n = len(tp.sources())
    method = methods.get(tp.method)
    stat = method.statistic
    fill = 4 * n + (stat.dtype.itemsize * n if stat and stat.dtype != torch.float32 else 0)
    return fill + 4 + method.temp_bytes(n)


def stage_bytes(budget: int, workers: int) -> int:
    """The writer's staging buffer, per worker: an eighth of its share of the budget, 4 MiB at most."""
    per_worker = budget // max(workers, 1)
    return min(STAGE_BYTES, max(2 * PAGE, per_worker // 8 // PAGE * PAGE))


def _staging(budget: int, workers: int) -> int:
    """A worker's staging buffers: two of 1 MiB or more (one filling while the other is written
    out, child_writer.Flusher), else one."""
    stage = stage_bytes(budget, workers)
    return staging_buffers(stage) * stage


def _share(budget: int, workers: int) -> int:
    """A worker's share of the budget for rows and scratch, its staging buffers set aside."""
    return max(0, budget // max(workers, 1) - _staging(budget, workers))


def block_rows(plan: Plan, tp: TensorPlan, budget: int, workers: int) -> int:
    """Rows a blend handles at once: half of a worker's share of the budget, at least one row."""
    cap = INPLACE_BLOCK if methods.get(tp.method).inplace else HEAP_BLOCK
    elems = min(cap, _share(budget, workers) // 2 // block_bytes_per_elem(plan, tp))
    return max(1, min(_rows(tp.shape), elems // max(_row_elems(tp.shape), 1)))


def chunk_rows(plan: Plan, tp: TensorPlan, budget: int, workers: int) -> int:
    """Rows per task. A task reads its rows of every input once (zero-copy for local parents, a
    buffer for URLs and stores), then blends them block by block: the raw rows take the other half
    of a worker's share."""
    if len(tp.shape) <= 1:
        return _rows(tp.shape)  # norms and biases: small, and some statistics want them whole
    raw_row = max(1, _inputs_itemsize(plan, tp) * _row_elems(tp.shape))
    total = _rows(tp.shape)
    rows = max(1, min(total, min(_share(budget, workers) // 2, CHUNK_CAP) // raw_row))
    # As many tasks, of even size: a zarr child's chunks are a task's rows (zarr_sink), and its
    # short last chunk is stored padded to full size. The Qwen3-0.6B slerp under 1 GiB and 2
    # workers: the embedding's last task of 4480 of 16384 rows padded the child by 24.4 MB (2.0%);
    # even, 15194 rows a task, 4 rows of padding (8 KiB in the whole child).
    return -(-total // -(-total // rows))


def bytes_in_flight(plan: Plan, tp: TensorPlan, budget: int, workers: int) -> int:
    """What one task of this tensor holds at its peak: its raw rows, one block of scratch and the
    writer's staging buffers."""
    raw = chunk_rows(plan, tp, budget, workers) * _row_elems(tp.shape) * _inputs_itemsize(plan, tp)
    block = block_rows(plan, tp, budget, workers) * _row_elems(tp.shape) * block_bytes_per_elem(plan, tp)
    return raw + block + _staging(budget, workers)


def predicted_peak(plan: Plan, budget: int, workers: int) -> int:
    """Largest bytes in flight the schedule allows, for `plan` to print next to the budget."""
    worst = max((bytes_in_flight(plan, tp, budget, workers) for tp in plan.tensors), default=0)
    return worst * max(workers, 1)


def minimum_budget(plan: Plan, workers: int) -> tuple[int, str]:
    """The smallest budget `plan` runs within, and the tensor that sets it.

    Below it, one row of a tensor (its raw rows, one block of scratch and the writer's staging
    buffer, per worker) no longer fits, blocks and chunks stop shrinking at one row, and the merge
    runs over the budget regardless (measured: `--memory-budget 1KiB` on the demo ran 40 MiB over).
    `predicted_peak` only grows more slowly than the budget, so the smallest budget it fits under
    is found by bisection.
    """
    if not plan.tensors:
        return 1, ""

    def fits(budget: int) -> bool:
        return predicted_peak(plan, budget, workers) <= budget

    lo, hi = 1, max(workers, 1) * (STAGE_BYTES + 2 * PAGE)
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    worst = max(plan.tensors, key=lambda tp: bytes_in_flight(plan, tp, hi, workers))
    return hi, worst.name


def check_budget(plan: Plan, budget: int, workers: int) -> None:
    """Refuse a budget the plan cannot run within, naming the smallest one it can."""
    least, tensor = minimum_budget(plan, workers)
    if budget < least:
        raise BudgetError(
            f"memory budget {human_bytes(budget)} is below the {human_bytes(least)} this plan needs with "
            f"{workers} worker(s): one row of {tensor}, its scratch and the writer's staging buffer, per "
            f"worker; give --memory-budget {-(-least // 1024)}KiB or more")


# --- scratch ------------------------------------------------------------------------------------


class Scratch:
    """Buffers one thread reuses from block to block.

    Fresh chunk-sized temporaries are what made merges slow: every one is a new mapping whose pages
    the kernel must fault in and zero (measured: 70-80% of a merge's CPU time). Blocks are filled into
    these buffers instead, and methods that compute in place write their result into one of them.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
        self.staging: mmap.mmap | None = None

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
        n = _numel(shape)
        buf = self.buffers.get((slot, dtype, device))
        if buf is None or buf.numel() < n:
            buf = self.buffers[(slot, dtype, device)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def stage(self, nbytes: int) -> mmap.mmap:
        """The page-aligned buffer the writer stages this thread's child rows in."""
        if self.staging is None or len(self.staging) < nbytes:
            self.staging = staging_buffer(nbytes)
        return self.staging


_scratch: PerThread[Scratch] = PerThread(Scratch)


def scratch() -> Scratch:
    return _scratch.get()


def release_scratch() -> None:
    """Drop every thread's buffers (dask keeps its pool threads alive between merges)."""
    _scratch.clear()
    release_flushers()
    methods.masks.forget_masks()


# --- reading and blending ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """One input's rows [start, stop) as stored (a view of the page cache for local shards)."""

    data: torch.Tensor | None  # None: the rows lie wholly in the zero padding
    shape: tuple[int, ...]  # the stored tensor's shape
    start: int


def read_rows(plan: Plan, ref: SourceRef, start: int, stop: int) -> Rows:
    if ref.rows is not None:
        return _gathered_rows(plan, ref, start, stop)
    parent = get_parent(plan.parents[ref.parent])
    info = parent.info(ref.tensor)
    have = _rows(info.shape)
    data = parent.read_rows(ref.tensor, start, min(stop, have)) if start < have else None
    return Rows(data, tuple(info.shape), start)


def _remote_input(plan: Plan, ref: SourceRef) -> bool:
    """Whether reading this input's rows again costs a fetch (reread.is_remote of its parents)."""
    keys = {p for g in ref.rows for p, _, _ in g.terms} if ref.rows is not None else {ref.parent}
    return any(reread.is_remote(get_parent(plan.parents[k])) for k in keys)


def _gathered_rows(plan: Plan, ref: SourceRef, start: int, stop: int) -> Rows:
    """Rows [start, stop) of an input re-indexed by the plan (a child vocabulary), assembled run by run."""
    assert ref.rows is not None
    info = get_parent_info(plan, ref)
    stored = dtypes.to_torch(info.dtype)

    def dtype_of(key: str, tensor: str) -> torch.dtype:
        return dtypes.to_torch(get_parent(plan.parents[key]).info(tensor).dtype)

    def read(key: str, tensor: str, r0: int, r1: int) -> torch.Tensor:
        return get_parent(plan.parents[key]).read_rows(tensor, r0, r1)

    dtype = torch.float32 if row_gather.needs_float32(ref.rows, dtype_of, stored) else stored
    total = ref.rows[-1].row + ref.rows[-1].count if ref.rows else 0
    # A padded vocabulary's mean row is computed once per process per input (row_gather.padding_mean).
    key = (tuple(sorted(plan.parents.items())), ref.tensor, ref.rows) if ref.rows and ref.rows[-1].mean else None
    data = row_gather.gather(ref.rows, start, min(stop, total), tuple(info.shape[1:]), dtype, read, key)
    return Rows(data, (total, *info.shape[1:]), start)


def fill(dst: torch.Tensor, rows: Rows, r0: int, r1: int) -> torch.Tensor:
    """Copy rows [r0, r1) of an input into `dst` (shaped like the padded rows), converting its dtype."""
    if rows.data is None:
        return dst.zero_()
    have = _rows(rows.shape)
    lo, hi = r0 - rows.start, min(r1, have) - rows.start
    src = rows.data.reshape(dst.shape) if not rows.shape else rows.data[lo:max(lo, hi)]
    if src.shape == dst.shape:
        return dst.copy_(src)
    dst.zero_()
    if src.numel():
        dst[(slice(0, src.shape[0]), *(slice(0, s) for s in rows.shape[1:]))].copy_(src)
    return dst


def read_source(plan: Plan, ref: SourceRef, start: int, stop: int, device: str) -> torch.Tensor:
    """Rows [start, stop) of an input, zero-padded to `ref.pad_to`, as a new float32 tensor."""
    rows = read_rows(plan, ref, start, stop)
    shape = tuple(ref.pad_to or rows.shape)
    dst = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=torch.float32, device=device)
    return fill(dst, rows, start, stop)


def _is_copy(plan: Plan, tp: TensorPlan) -> bool:
    """A tensor whose method declares it its one input unchanged, and whose bytes can go to the
    child as they are: not padded, and already in the child's dtype."""
    if tp.base or len(tp.models) != 1 or tp.models[0].pad_to or tp.models[0].rows:
        return False
    if not methods.get(tp.method).is_identity(tp.params, tp.model_params):
        return False
    return get_parent_info(plan, tp.models[0]).dtype == tp.dtype


# --- finiteness ----------------------------------------------------------------------------------


def finite(t: torch.Tensor) -> bool:
    """True when a float tensor holds no NaN or Inf; integer tensors are always finite.

    Nearly free on a block already in cache: NaN and Inf propagate through a sum, so one sum
    (10 us per 2^18 float32 block, against 33 us to fill the block and 660 us for
    `isfinite().all()`) says "finite" for any real tensor. Only a sum that overflows, which
    finite weights reach only above 3e38 (float16: 65504, so it sums in float32), takes the
    exact test.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    s = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    if math.isfinite(s.item()):
        return True
    return bool(torch.isfinite(t).all())


def _refuse_parent(plan: Plan, ref: SourceRef, r0: int, r1: int) -> DarwinError:
    return SourceError(
        f"parent {plan.parents[ref.parent]}: tensor {ref.tensor!r} holds NaN or Inf (rows {r0}-{r1}); "
        "set darwin: {allow_nonfinite: true} to merge it anyway"
    )


def _refuse_child(tp: TensorPlan, r0: int, r1: int) -> DarwinError:
    return PlanError(
        f"child tensor {tp.name!r} comes out NaN or Inf ({tp.method}, rows {r0}-{r1}) from finite parents; "
        "check the method's weights and parameters"
    )


class NonFiniteBlock(Exception):
    """Raised by a sink whose child rows [r0, r1) are not finite; `Task.blend` finds out why."""

    def __init__(self, r0: int, r1: int):
        super().__init__(r0, r1)
        self.r0, self.r1 = r0, r1


def _rows_finite(rows: Rows, r0: int, r1: int) -> bool:
    """Whether an input's raw rows [r0, r1) (as stored, before any upcast) are finite."""
    if rows.data is None:
        return True
    lo, hi = r0 - rows.start, min(r1, _rows(rows.shape)) - rows.start
    return finite(rows.data if not rows.shape else rows.data[lo : max(lo, hi)])


def check_finite(plan: Plan) -> bool:
    """Whether this plan's inputs and outputs are checked for NaN/Inf (darwin.allow_nonfinite)."""
    return not (plan.options or {}).get("allow_nonfinite", False)


Inputs = tuple[Rows | None, list[Rows]]  # a task's rows of the base (if any) and of each model


@dataclass(frozen=True)
class Task:
    """One tensor's rows [start, stop), read once, walked in blocks of `block` rows."""

    plan: Plan
    tp: TensorPlan
    start: int
    stop: int
    block: int
    device: str
    stage: int  # bytes of the writer's staging buffer
    # Storage options for URL parents (pool.url_options), which a worker process must read them with;
    # kept out of the plan, which is printed and written.
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)
    # The run whose spill (reread.py) keeps remote rows that a statistic's passes and the blend read
    # again; None: every read fetches (a tensor that is one task, breeding in place).
    spill: str | None = field(default=None, repr=False, compare=False)

    def read(self, *, keep: bool = False, last: bool = False) -> Inputs:
        """The task's rows of every input. `keep`: a later task reads them again, so rows fetched
        from a remote parent are kept in the run's spill; `last`: this is their last reader, which
        takes them from the spill (fetching what is not there) and deletes them."""
        base = self._input("base", self.tp.base, keep, last) if self.tp.base else None
        return base, [self._input(f"in{i}", m, keep, last) for i, m in enumerate(self.tp.models)]

    def _input(self, slot: str, ref: SourceRef, keep: bool, last: bool) -> Rows:
        if not (self.spill and (keep or last)) or not _remote_input(self.plan, ref):
            return read_rows(self.plan, ref, self.start, self.stop)  # local: a re-read is the page cache
        spill = reread.spill(self.spill)
        if spill is None:
            return read_rows(self.plan, ref, self.start, self.stop)
        key = (self.tp.name, slot, self.plan.parents[ref.parent], ref.tensor, self.start, self.stop)
        got = spill.get(key, drop=last)
        if got is not None:
            return Rows(got[0], got[1], self.start)
        rows = read_rows(self.plan, ref, self.start, self.stop)
        if keep and not last and rows.data is not None:
            spill.put(key, rows.data, rows.shape)
        return rows

    def blocks(self, inputs: Inputs, dtype: torch.dtype, with_out: bool,
               checked: bool = False) -> Iterator[tuple[int, int, methods.Chunk]]:
        """(r0, r1, chunk) over the task's rows; the chunk's tensors are this thread's scratch.

        Each input block is checked for NaN/Inf as it lands in scratch, unless the plan allows
        them, for a method that may drop elements (ties, dare, breadcrumbs) or has a tensor-wide
        statistic (slerp, model_stock: one NaN anywhere makes the whole tensor NaN, so the chunk
        that holds it must be the one that says so). An inplace method without a statistic
        (linear, task_arithmetic, passthrough) is elementwise arithmetic, through which a NaN or
        Inf always reaches the same element of the output (0 * Inf is NaN): its inputs are looked
        at only when its output is not finite (`blend`), which halves the cost of the checks.
        `checked`: a statistic's pass has already looked at every block of these rows.
        """
        tp, buf = self.tp, scratch()
        base, models = inputs
        method = methods.get(tp.method)
        check = (check_finite(self.plan) and not checked
                 and (not method.inplace or method.statistic is not None))
        for r0 in range(self.start, self.stop, self.block):
            r1 = min(r0 + self.block, self.stop)
            shape = _block_shape(tp.shape, r0, r1)

            def filled(slot: str, rows: Rows, ref: SourceRef, shape: tuple[int, ...] = shape, r0: int = r0,
                       r1: int = r1) -> torch.Tensor:
                t = fill(buf.take(slot, shape, dtype, self.device), rows, r0, r1)
                if check and not finite(t):
                    raise _refuse_parent(self.plan, ref, r0, r1)
                return t

            yield r0, r1, methods.Chunk(
                models=[filled(f"in{i}", m, tp.models[i]) for i, m in enumerate(models)],
                model_params=tp.model_params,
                params=tp.params,
                base=filled("base", base, tp.base) if base is not None and tp.base is not None else None,
                offset=r0 * _row_elems(tp.shape),
                numel=_numel(tp.shape),
                shape=tp.shape,
                seed=tp.seed,
                out=buf.take("out", shape, dtype, self.device) if with_out else None,
            )

    def partial(self, state: Any, inputs: Inputs | None = None, *, keep: bool = False) -> Any:
        """This task's share of one pass of the method's statistic, folded over its blocks; `keep`:
        its blend runs later and reads the same rows (see `read`)."""
        stat = methods.get(self.tp.method).statistic
        assert stat is not None
        acc = None
        for _, _, chunk in self.blocks(inputs or self.read(keep=keep), stat.dtype, with_out=False):
            part = stat.partial(chunk, state)
            acc = part if acc is None else stat.combine([acc, part])
        return acc

    def statistic(self, inputs: Inputs) -> Any:
        """All passes of the statistic over rows already read, when this task is the whole tensor."""
        stat = methods.get(self.tp.method).statistic
        state = None
        for _ in range(methods.pass_count(stat, self.tp.shape, self.tp.params)):
            state = stat.finish(self.partial(state, inputs), state)
        return state

    def blend(self, state: Any, sink: Callable[[int, int, torch.Tensor], None]) -> None:
        """Blend block by block, handing each block of child rows (float32, scratch) to `sink`."""
        method = methods.get(self.tp.method)
        inputs = self.read(last=True)  # once: for URLs and stores a read is a download (or the spill's copy)
        passes = methods.pass_count(method.statistic, self.tp.shape, self.tp.params)
        if state is None and passes:
            # The whole tensor is this one task: its statistic walks the same rows first.
            assert self.start == 0 and self.stop == _rows(self.tp.shape)
            state = self.statistic(inputs)
        try:
            # A statistic's first pass checked every input block (here or in the partial tasks of
            # these rows), so the blend does not check them again: 0.15 of model_stock's 3.5 ns of
            # CPU per element (3 inputs). The child's blocks are still checked as they are written.
            for r0, r1, chunk in self.blocks(inputs, torch.float32, with_out=method.inplace, checked=passes > 0):
                sink(r0, r1, method.blend(chunk, state).reshape(_block_shape(self.tp.shape, r0, r1)))
        except NonFiniteBlock as e:
            raise self.why_not_finite(inputs, e.r0, e.r1) from None

    def why_not_finite(self, inputs: Inputs, r0: int, r1: int) -> DarwinError:
        """The error for child rows [r0, r1) that came out NaN/Inf: a parent's, if one holds them."""
        base, models = inputs
        pairs = ([(self.tp.base, base)] if self.tp.base is not None and base is not None else [])
        for ref, rows in pairs + list(zip(self.tp.models, models, strict=True)):
            if not _rows_finite(rows, r0, r1):
                return _refuse_parent(self.plan, ref, r0, r1)
        return _refuse_child(self.tp, r0, r1)


def task_plan(plan: Plan, tp: TensorPlan, shared: dict | None = None) -> Plan:
    """What a task of `tp` keeps of the plan: the specs of the parents it reads and the options.

    A task is pickled for the dask.distributed worker that runs it; with the whole plan (and the
    writer) inside, a task of the 0.6B geometry was 112 KB for a tensor plan of 0.4 KB; it is now
    0.9 KB (docs/benchmarks.md, "Task size"). The parents come from each worker's pool, by spec.

    `shared` (one dict per graph) gives tasks that read the same parents one object, which the
    graph's pickle, sent once to the scheduler, then holds once.
    """
    keys = tuple(sorted({r.parent for r in tp.sources()}))
    slim = shared.get(keys) if shared is not None else None
    if slim is None:
        slim = Plan(parents={k: plan.parents[k] for k in keys}, tensors=[], config_from="", tokenizer_from="",
                    options=dict(plan.options or {}))
        if shared is not None:
            shared[keys] = slim
    return slim


def make_task(plan: Plan, tp: TensorPlan, start: int, stop: int, device: str, budget: int, workers: int,
              shared: dict | None = None, spill: str | None = None) -> Task:
    return Task(task_plan(plan, tp, shared), tp, start, stop, block_rows(plan, tp, budget, workers), device,
                stage_bytes(budget, workers), pool.current_url_options(), spill)


def iter_tensors(plan: Plan, *, device: str = "cpu", workers: int | None = None,
                 budget: int = DEFAULT_BUDGET) -> Iterator[tuple[str, torch.Tensor]]:
    """Every child tensor, whole, in plan order: what an inference engine loads in place.

    With `workers` > 0 the next `workers` tensors are blended in threads while the consumer (vLLM
    copying weights into its parameters) takes the current one; at most `workers + 1` whole tensors
    are alive at once, plus each thread's scratch. With `workers=0` each tensor is blended in the
    consumer's own thread, one at a time, with torch's intra-op threads: inside vLLM's worker that
    is the thread its OpenMP team is bound to.
    """
    check_device(device)
    bound_allocator()
    workers = (os.cpu_count() or 1) if workers is None else workers

    check = check_finite(plan)

    def one(tp: TensorPlan) -> torch.Tensor:
        with _naming(tp):
            if _numel(tp.shape) == 0:
                return torch.empty(tp.shape, dtype=dtypes.to_torch(tp.dtype))
            if _is_copy(plan, tp):
                t = get_parent(plan.parents[tp.models[0].parent]).read(tp.models[0].tensor).clone()
                if check and not finite(t):
                    raise _refuse_parent(plan, tp.models[0], 0, _rows(tp.shape))
                return t
            out = torch.empty(tp.shape, dtype=dtypes.to_torch(tp.dtype))
            rows = _as_rows(out)

            def into(r0: int, r1: int, block: torch.Tensor) -> None:
                rows[r0:r1].copy_(_as_rows(block))
                if check and not finite(rows[r0:r1]):
                    raise NonFiniteBlock(r0, r1)

            make_task(plan, tp, 0, _rows(tp.shape), device, budget, max(workers, 1)).blend(None, into)
            return out

    try:
        if workers == 0:
            for tp in plan.tensors:
                yield tp.name, one(tp)
            return
        todo = iter(plan.tensors)
        with ThreadPoolExecutor(workers, thread_name_prefix="darwin-breed") as pool:
            pending = deque((tp.name, pool.submit(one, tp)) for tp in itertools.islice(todo, workers))
            while pending:
                name, future = pending.popleft()
                tensor = future.result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt.name, pool.submit(one, nxt)))
                yield name, tensor
    finally:
        release_scratch()


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError(f"device: expected cpu or cuda, got {device!r}")


# --- the graph ---------------------------------------------------------------------------------


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


@contextlib.contextmanager
def _naming(tp: TensorPlan):
    """A method's refusal (e.g. ties with nothing left to keep) reaches the user naming the tensor."""
    try:
        yield
    except (ValueError, ZeroDivisionError) as e:
        raise PlanError(f"{tp.name}: {tp.method}: {e}") from None


def _write_task(task: Task, state: Any, writer: ChildSink, progress) -> int:
    tp = task.tp
    pool.set_url_options(task.storage_options)  # on a worker: this merge's options for URL parents
    with writer.span(tp.name, task.start, scratch().stage(task.stage)) as span:
        check = check_finite(task.plan)
        if _is_copy(task.plan, tp):
            rows = get_parent(task.plan.parents[tp.models[0].parent]).read_rows(tp.models[0].tensor, task.start, task.stop)
            if check and not finite(rows):
                raise _refuse_parent(task.plan, tp.models[0], task.start, task.stop)
            span.write(_as_bytes(rows))
        else:
            out_dtype = dtypes.to_torch(tp.dtype)
            row_bytes = writer.layout.slots[tp.name].row_bytes

            def write(r0: int, r1: int, block: torch.Tensor) -> None:
                assert span.written == (r0 - task.start) * row_bytes, "blocks must arrive in row order"
                if block.numel():  # rounded to the child's dtype straight into the writer's staging buffer
                    dst = span.reserve(block.numel() * out_dtype.itemsize)
                    staged = torch.frombuffer(dst, dtype=out_dtype).view(block.shape).copy_(block)
                    # Checked in the child's dtype: a finite float32 result over 65504 is Inf in float16.
                    if check and not finite(staged):
                        raise NonFiniteBlock(r0, r1)

            with _naming(tp):
                task.blend(state, write)
        written = span.written
    writer.mark_done(tp.name, task.start, task.stop)
    if progress:
        progress(written)
    return written


def _partial_task(task: Task, state: Any, keep: bool) -> Any:
    pool.set_url_options(task.storage_options)
    with _naming(task.tp):
        return task.partial(state, keep=keep)


def _finish_task(tp: TensorPlan, state: Any, parts: list) -> Any:
    stat = methods.get(tp.method).statistic
    assert stat is not None
    with _naming(tp):
        return stat.finish(stat.combine(parts), state)


WRITER = "child-writer"  # the graph key of the writer, which every blend task depends on


def build_graph(plan: Plan, writer: ChildSink, *, budget: int, workers: int, device: str, progress=None,
                spill: str | None = None) -> tuple[dict, list]:
    """A dask task graph: per layer, per tensor, per row chunk, one read-blend-write task.

    A tensor split into several chunks whose method needs a statistic gets, per pass, one partial
    task per chunk (run in parallel) and a task that folds them into the next state. With `spill`
    (a run id), the rows those tasks fetch from remote parents are kept for the next passes and the
    blend of the same chunk (reread.py), except a chunk already written, which no blend reads.
    """
    graph: dict = {WRITER: writer}  # one key: shipped once per worker, not inside every task
    outputs: list = []
    shared: dict = {}
    for tp in plan.tensors:
        if _numel(tp.shape) == 0:
            continue  # nothing to read or write: its header entry is the whole tensor
        total = _rows(tp.shape)
        rows = chunk_rows(plan, tp, budget, workers)
        stat = methods.get(tp.method).statistic
        split = total > rows and methods.pass_count(stat, tp.shape, tp.params) > 0 and not _is_copy(plan, tp)
        tasks = [make_task(plan, tp, s, min(s + rows, total), device, budget, workers, shared, spill if split else None)
                 for s in range(0, total, rows)]
        todo = [t for t in tasks if not writer.is_done(tp.name, t.start, t.stop)]
        if not todo:
            continue
        # Zero-padded: dask runs ready tasks in key order, and `layer-10` before `layer-2` left a
        # bucket child's parts waiting for tasks far away in the shard (24 layers, 2 workers, 64 KiB
        # parts: 6 parts waited at once, 170 KiB spilled; padded, 5 and none; object_sink).
        layer = "other" if tp.layer is None else f"layer-{tp.layer:05d}"
        state_key = None
        if split:
            blended = {t.start for t in todo}
            for p in range(methods.pass_count(stat, tp.shape, tp.params)):
                parts = []
                for t in tasks:
                    key = (f"stat-{layer}", tp.name, p, t.start)
                    graph[key] = (_partial_task, t, state_key, t.start in blended)
                    parts.append(key)
                graph[(f"state-{layer}", tp.name, p)] = (_finish_task, tp, state_key, parts)
                state_key = (f"state-{layer}", tp.name, p)
        for t in todo:
            key = (f"blend-{layer}", tp.name, t.start)
            graph[key] = (_write_task, t, state_key, WRITER, progress)
            outputs.append(key)
    return graph, outputs


@dataclass
class RunStats:
    bytes_read: int
    bytes_written: int
    chunks: int
    skipped_chunks: int
    spill: dict = field(default_factory=dict)  # reread.SpillStats of the run (summed over workers; peak: the largest)


def _merge_pool(workers: int) -> ThreadPoolExecutor:
    """A merge's own thread pool: dask's context-aware executor where the installed dask has one
    (2026.8 does), else a plain one, which dask's threaded scheduler also takes."""
    return getattr(dask.threaded, "ContextAwareThreadPoolExecutor", ThreadPoolExecutor)(workers)


def worker_count(client=None) -> int:
    """Tasks in flight at once in one process, which share its memory budget: one per core, or on a
    dask.distributed cluster the threads of its largest worker. The budget applies per worker
    process (each holds its own rows, scratch and staging buffers), so a cluster of 4 single-thread
    workers under a 1 GiB budget sizes its tasks as one process would, not as 4 threads sharing 1 GiB."""
    if client is not None:
        return max(1, max(client.nthreads().values(), default=1))
    return os.cpu_count() or 1


def bytes_to_read(plan: Plan) -> int:
    total = 0
    for tp in plan.tensors:
        for ref in tp.sources():
            total += get_parent_info(plan, ref).nbytes
    return total


def run(plan: Plan, writer: ChildSink, *, budget: int = DEFAULT_BUDGET, client=None, device: str = "cpu",
        progress: Callable[[int], None] | None = None) -> RunStats:
    """Execute the plan into `writer` with dask: threads by default, a distributed Client if given."""
    check_device(device)
    bound_allocator()
    for tp in plan.tensors:
        for ref in tp.sources():
            get_parent_info(plan, ref)  # fail fast, by name, before any task runs
    workers = worker_count(client)
    spill = uuid.uuid4().hex  # this run's spill of remote rows read again (reread.py), one per process
    spills = []
    if client is not None:
        # Workers live in other processes: progress is reported here, as their chunks complete.
        from distributed import as_completed

        graph, outputs = build_graph(plan, writer, budget=budget, workers=workers, device=device, spill=spill)
        results = []
        try:
            for future in as_completed(client.get(graph, outputs, sync=False)):
                n = future.result()
                results.append(n)
                if progress:
                    progress(n)
        finally:
            # Workers outlive the merge: a parent replaced before the next one must not be read
            # through this merge's maps of the old file; and each removes its spill directory.
            client.run(pool.release_default)
            client.run(release_flushers)  # each worker thread's spare staging buffer and writer thread
            spills = list(client.run(reread.close_run, spill).values())
    else:
        graph, outputs = build_graph(plan, writer, budget=budget, workers=workers, device=device, progress=progress,
                                     spill=spill)
        try:
            # A pool of this merge's own, shut down (waiting) before an error leaves: dask raises a
            # task's exception at once, while the other running tasks go on writing into the sink,
            # and a re-run in the same process raced them (a zarr child's chunk upload completed
            # by the failed run's task under the re-run that had listed it open).
            with torch_threads(1), _merge_pool(workers) as threads:
                results = dask.threaded.get(graph, outputs, num_workers=workers, pool=threads)
        finally:
            release_scratch()
            spills = [reread.close_run(spill)]
    written = sum(results)
    # Counted once the graph is built: a sink may learn what is done only when asked (ObjectSink).
    return RunStats(bytes_to_read(plan), written, len(outputs), len(writer.done), _sum_spills(spills))


def _sum_spills(spills: list[dict]) -> dict:
    total: dict = {}
    for s in spills:
        for k, v in s.items():
            total[k] = max(total.get(k, 0), v) if k == "peak_bytes" else total.get(k, 0) + v
    return total


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def bound_allocator() -> None:
    """Fix glibc's mmap threshold so that only block-sized temporaries live in the heap.

    glibc raises its mmap threshold each time a large block is freed, after which chunk-sized
    buffers come from the heap and stay there: measured, a merge under an 8 MiB budget then held
    140 MiB more than its plan. With a fixed threshold just above a heap block's temporaries, those
    are recycled by the heap (no page faults), and anything larger is a mapping returned on free.
    The trim threshold keeps the heap from being shrunk and regrown between blocks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 8 * MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class PeakMemory:
    """Samples this process's RssAnon (private memory) in a background thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.baseline = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def now() -> float:
    return time.perf_counter()
