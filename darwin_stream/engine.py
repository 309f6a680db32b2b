"""Plan -> dask graph of row-chunk tasks, each bounded in memory, that blend and write the child.

A task reads the same rows of every input, blends them with the tensor's method and writes the rows
to their final place in the child's shard. Nothing but a chunk ever lives in memory, so the peak is
`workers x chunk bytes`, which `chunk_rows` keeps under the memory budget.

Methods that need a statistic of the whole tensor (slerp, ties, model_stock, ...) get it from a
streaming pass over the tensor's chunks, run as one task that the tensor's blend tasks depend on.
When a tensor fits in one chunk, the statistic is computed on that chunk inside its blend task, so
the parents are read once.

`iter_tensors` yields whole child tensors with the same functions: this is what the vLLM worker feeds
to a live engine, so a child bred in place equals the child merged to disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask.threaded
import torch

from darwin_stream import dtypes, methods
from darwin_stream.errors import DarwinError
from darwin_stream.plan import Plan, SourceRef, TensorPlan
from darwin_stream.sources import Parent, open_parent

DEFAULT_BUDGET = 2**30

_parents: dict[str, Parent] = {}
_parents_lock = threading.Lock()


def get_parent(spec: str) -> Parent:
    """One open Parent per spec per process: tasks carry specs, not file handles, so they pickle."""
    with _parents_lock:
        p = _parents.get(spec)
        if p is None:
            p = _parents[spec] = open_parent(spec)
        return p


def release_parents() -> None:
    with _parents_lock:
        for p in _parents.values():
            close = getattr(p, "close", None)
            if close:
                close()
        _parents.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _row_elems(shape: tuple[int, ...]) -> int:
    return _numel(shape[1:]) if shape else 1


def bytes_per_row(plan: Plan, tp: TensorPlan) -> int:
    """Bytes one row of this tensor holds in flight: raw reads, float32 copies, temporaries, output."""
    inputs = tp.sources()
    raw = sum(dtypes.itemsize(get_parent_info(plan, s).dtype) for s in inputs)
    f32 = 4 * len(inputs)
    temps = 4 * (len(inputs) + 3)  # a method's own intermediates (deltas, masks, accumulators)
    out = 4 + dtypes.itemsize(tp.dtype)
    return _row_elems(tp.shape) * (raw + f32 + temps + out)


def get_parent_info(plan: Plan, ref: SourceRef):
    return get_parent(plan.parents[ref.parent]).info(ref.tensor)


def chunk_rows(plan: Plan, tp: TensorPlan, budget: int, workers: int) -> int:
    """Rows per task so that `workers` tasks in flight stay within `budget` bytes."""
    if len(tp.shape) <= 1:
        return _rows(tp.shape)  # norms and biases: small, and some statistics want them whole
    per_worker = budget // max(workers, 1)
    return max(1, min(_rows(tp.shape), per_worker // max(bytes_per_row(plan, tp), 1)))


def predicted_peak(plan: Plan, budget: int, workers: int) -> int:
    """Largest bytes in flight the schedule allows, for `plan` to print next to the budget."""
    worst = 0
    for tp in plan.tensors:
        rows = chunk_rows(plan, tp, budget, workers)
        worst = max(worst, rows * bytes_per_row(plan, tp))
    return worst * max(workers, 1)


# --- reading and blending one chunk ------------------------------------------------------------


def read_source(plan: Plan, ref: SourceRef, start: int, stop: int, device: str) -> torch.Tensor:
    """Rows [start, stop) of an input, zero-padded to `ref.pad_to`, as float32 on `device`."""
    parent = get_parent(plan.parents[ref.parent])
    info = parent.info(ref.tensor)
    have = _rows(info.shape)
    got = parent.read_rows(ref.tensor, min(start, have), min(stop, have)) if start < have else None
    if ref.pad_to is None or tuple(ref.pad_to) == tuple(info.shape):
        assert got is not None
        return got.to(device=device, dtype=torch.float32)
    out = torch.zeros((stop - start, *ref.pad_to[1:]), dtype=torch.float32, device=device)
    if got is not None and got.numel():
        index = (slice(0, got.shape[0]), *(slice(0, s) for s in info.shape[1:]))
        out[index] = got.to(device=device, dtype=torch.float32)
    return out


def make_chunk(plan: Plan, tp: TensorPlan, start: int, stop: int, device: str) -> methods.Chunk:
    base = read_source(plan, tp.base, start, stop, device) if tp.base else None
    models = [read_source(plan, m, start, stop, device) for m in tp.models]
    return methods.Chunk(
        models=models,
        model_params=tp.model_params,
        params=tp.params,
        base=base,
        offset=start * _row_elems(tp.shape),
        numel=_numel(tp.shape),
        shape=tp.shape,
        seed=tp.seed,
    )


def _is_copy(plan: Plan, tp: TensorPlan) -> bool:
    """A passthrough whose bytes can go to the child unchanged."""
    if tp.method != "passthrough" or tp.base or len(tp.models) != 1 or tp.models[0].pad_to:
        return False
    if float(tp.params.get("scale", 1.0)) != 1.0 or float(tp.model_params[0].get("scale", 1.0) if tp.model_params else 1.0) != 1.0:
        return False
    return get_parent_info(plan, tp.models[0]).dtype == tp.dtype


def tensor_statistic(plan: Plan, tp: TensorPlan, rows: int, device: str) -> Any:
    """All passes of the method's statistic, streamed over the tensor's chunks."""
    method = methods.get(tp.method)
    total = _rows(tp.shape)
    return methods.run_statistic(
        method, lambda: (make_chunk(plan, tp, s, min(s + rows, total), device) for s in range(0, total, rows))
    )


def blend_rows(plan: Plan, tp: TensorPlan, start: int, stop: int, state: Any, device: str) -> torch.Tensor:
    """The child's rows [start, stop) of `tp`, in the child's dtype, on the CPU."""
    if _is_copy(plan, tp):
        return get_parent(plan.parents[tp.models[0].parent]).read_rows(tp.models[0].tensor, start, stop)
    method = methods.get(tp.method)
    chunk = make_chunk(plan, tp, start, stop, device)
    if method.statistic is not None and state is None:
        # The whole tensor is this one chunk: its statistic needs no second read.
        assert start == 0 and stop == _rows(tp.shape)
        state = methods.run_statistic(method, lambda: [chunk])
    out = method.blend(chunk, state)
    return out.to(dtype=dtypes.to_torch(tp.dtype)).to("cpu").reshape((stop - start, *tp.shape[1:]) if tp.shape else ())


def iter_tensors(plan: Plan, *, device: str = "cpu", workers: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every child tensor, whole, in plan order: what an inference engine loads in place.

    The next `workers` tensors are blended in threads while the consumer (vLLM copying weights into
    its parameters) takes the current one, so breeding in place runs as parallel as a disk merge.
    At most `workers + 1` whole tensors are alive at once.
    """
    check_device(device)
    bound_allocator()
    workers = workers or os.cpu_count() or 1

    def one(tp: TensorPlan) -> torch.Tensor:
        with _naming(tp):
            return blend_rows(plan, tp, 0, _rows(tp.shape), None, device)

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


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DarwinError("--device cuda: no CUDA device is available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise DarwinError(f"device: expected cpu or cuda, got {device!r}")


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
        raise DarwinError(f"{tp.name}: {tp.method}: {e}") from None


def _write_task(plan: Plan, tp: TensorPlan, start: int, stop: int, state: Any, device: str, writer, progress) -> int:
    with _naming(tp):
        rows = blend_rows(plan, tp, start, stop, state, device)
    data = _as_bytes(rows)
    writer.write_rows(tp.name, start, data)
    writer.mark_done(tp.name, start)
    if progress:
        progress(len(data))
    return len(data)


def _stat_task(plan: Plan, tp: TensorPlan, rows: int, device: str) -> Any:
    with _naming(tp):
        return tensor_statistic(plan, tp, rows, device)


def build_graph(plan: Plan, writer, *, budget: int, workers: int, device: str, progress=None) -> tuple[dict, list]:
    """A dask task graph: per layer, per tensor, per row chunk, one read-blend-write task."""
    graph: dict = {}
    outputs: list = []
    for tp in plan.tensors:
        total = _rows(tp.shape)
        rows = chunk_rows(plan, tp, budget, workers)
        starts = [s for s in range(0, total, rows) if (tp.name, s) not in writer.done]
        if not starts:
            continue
        layer = "other" if tp.layer is None else f"layer-{tp.layer}"
        state_key = None
        if total > rows and methods.get(tp.method).statistic is not None and not _is_copy(plan, tp):
            state_key = (f"stat-{layer}", tp.name)
            graph[state_key] = (_stat_task, plan, tp, rows, device)
        for s in starts:
            key = (f"blend-{layer}", tp.name, s)
            graph[key] = (_write_task, plan, tp, s, min(s + rows, total), state_key, device, writer, progress)
            outputs.append(key)
    return graph, outputs


@dataclass
class RunStats:
    bytes_read: int
    bytes_written: int
    chunks: int
    skipped_chunks: int


def worker_count(client=None) -> int:
    """Tasks in flight at once: one per core, or one per thread of a distributed cluster."""
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return os.cpu_count() or 1


def bytes_to_read(plan: Plan) -> int:
    total = 0
    for tp in plan.tensors:
        for ref in tp.sources():
            total += get_parent_info(plan, ref).nbytes
    return total


def run(plan: Plan, writer, *, budget: int = DEFAULT_BUDGET, client=None, device: str = "cpu",
        progress: Callable[[int], None] | None = None) -> RunStats:
    """Execute the plan into `writer` with dask: threads by default, a distributed Client if given."""
    check_device(device)
    bound_allocator()
    for tp in plan.tensors:
        for ref in tp.sources():
            get_parent_info(plan, ref)  # fail fast, by name, before any task runs
    workers = worker_count(client)
    before = len(writer.done)
    if client is not None:
        # Workers live in other processes: progress is reported here, as their chunks complete.
        from distributed import as_completed

        graph, outputs = build_graph(plan, writer, budget=budget, workers=workers, device=device)
        results = []
        for future in as_completed(client.get(graph, outputs, sync=False)):
            n = future.result()
            results.append(n)
            if progress:
                progress(n)
    else:
        graph, outputs = build_graph(plan, writer, budget=budget, workers=workers, device=device, progress=progress)
        with _single_threaded_torch():
            results = dask.threaded.get(graph, outputs, num_workers=workers)
    written = sum(results)
    return RunStats(bytes_to_read(plan), written, len(outputs), before)


_M_MMAP_THRESHOLD = -3


@functools.cache
def bound_allocator() -> None:
    """Make glibc hand chunk-sized buffers back to the OS as soon as they are freed.

    glibc raises its mmap threshold each time a large block is freed, after which chunk buffers come
    from the heap and stay there: measured, a merge under an 8 MiB budget then held 140 MiB more than
    its plan. A fixed threshold (which also turns the adjustment off) keeps the peak at the budget.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


@contextlib.contextmanager
def _single_threaded_torch():
    """dask runs one task per core; torch's own thread pool on top would oversubscribe them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
