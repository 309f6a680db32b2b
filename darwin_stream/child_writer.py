"""Streaming safetensors writer: shard headers come from the plan, chunks are written in place.

Every shard is created at its final size with its header already written, so a merge task can
write its rows at a known offset and drop them. No shard is ever buffered in memory, and tasks
on different threads (or dask workers sharing the filesystem) write without coordination.

Rows go to the disk with O_DIRECT where the filesystem allows it (see `Span`): a child is written
once and not read back by the merge, and through the page cache the kernel's copy, dirty-page
throttling and the eviction of the parents' cached pages cost more CPU than the blend itself.

The child is assembled in a sibling directory `.<name>.partial` and renamed to its final name only
when complete. A journal of finished chunks there lets an interrupted merge resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from darwin_stream import dtypes, outputs, pool
from darwin_stream.errors import OutputError, StorageError
from darwin_stream.identity import plan_identities
from darwin_stream.plan import Plan
from darwin_stream.threads import PerThread

_ALIGN = 8
PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffers (a multiple of any block size in use)
STAGE_BYTES = 4 * 2**20  # largest staging buffer: enough for the disk, small beside any budget
# A staging buffer at least this large goes out in the background (`Flusher`), with a second one
# filling meanwhile; smaller ones, under budgets of a few MiB per worker, are written as before.
BACKGROUND_MIN = 2**20


def staging_buffers(stage: int) -> int:
    """How many staging buffers of `stage` bytes a worker holds: 2 when it writes in the background."""
    return 2 if stage >= BACKGROUND_MIN else 1
_O_DIRECT = getattr(os, "O_DIRECT", 0)
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Slot:
    """Where one tensor of the child goes: its shard file and byte offset."""

    name: str
    shard: str  # file name inside the child directory
    offset: int  # absolute byte offset of the tensor's first element in the shard
    nbytes: int
    row_bytes: int


@dataclass(frozen=True)
class Layout:
    shards: dict[str, tuple[bytes, int]]  # file name -> (header bytes incl. 8-byte length, total size)
    slots: dict[str, Slot]

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.shards.values())


def _tensor_nbytes(shape: tuple[int, ...], code: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtypes.itemsize(code)


def layout(plan: Plan, shard_size: int) -> Layout:
    """Assign tensors to shards in plan order, no shard over `shard_size` unless one tensor is."""
    groups: list[list] = [[]]
    size = 0
    for t in plan.tensors:
        n = _tensor_nbytes(t.shape, t.dtype)
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    if not groups[-1]:
        groups.pop()
    single = len(groups) == 1
    shards: dict[str, tuple[bytes, int]] = {}
    slots: dict[str, Slot] = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if single else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        pos = 0
        for t in group:
            n = _tensor_nbytes(t.shape, t.dtype)
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)
        head = len(raw).to_bytes(8, "little") + raw
        shards[fname] = (head, len(head) + pos)
        for t in group:
            start, end = header[t.name]["data_offsets"]
            rows = t.shape[0] if t.shape else 1
            slots[t.name] = Slot(t.name, fname, len(head) + start, end - start, (end - start) // max(rows, 1))
    return Layout(shards, slots)


def _digest(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=16).hexdigest()


def plan_fingerprint(plan: Plan, layout: Layout, identities: dict[str, str]) -> dict[str, str]:
    """What a partial child's chunks depend on, part by part, so a resume never mixes two children.

    It covers the plan's tensors (sources, methods, resolved parameters, dtypes), the shard layout
    (which `shard_size` decides: a journalled chunk is a byte range of one shard), and each parent's
    content (`identity.parent_identity`). It leaves out what does not change a byte of the weights:
    the manifest's text and comments, notes, and run options (memory budget, device, direct_io).
    The budget and worker count change the chunking, which the journal records per chunk extent.
    """
    d = json.loads(plan.to_json())
    for key in ("manifest", "notes", "options"):
        d.pop(key, None)
    parts = {"plan": _digest(d), "layout": _digest({k: [v[0].hex(), v[1]] for k, v in layout.shards.items()})}
    parts.update({f"parent {k}": identities.get(k, "") for k in plan.parents})
    return parts


def _changed(old: dict, new: dict, plan: Plan) -> str:
    """Which part of a partial child's fingerprint changed, in words for the report's notes."""
    if not isinstance(old, dict):
        return "it was made by another version of darwin-stream"
    parents = [k.split(" ", 1)[1] for k in new if k.startswith("parent ") and old.get(k) != new[k]]
    if parents:
        return "parent " + ", ".join(f"{plan.parents[k]}" for k in parents) + " changed since it was made"
    if old.get("plan") != new["plan"]:
        return "it was made from a different plan"
    return "its shard layout differs (another shard_size)"


def staging_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned buffer of at least `nbytes` (anonymous memory: what O_DIRECT needs)."""
    return mmap.mmap(-1, max(2 * PAGE, -(-nbytes // PAGE) * PAGE))


class StagedSpan:
    """Rows that arrive in order, staged in a page-aligned buffer and handed on by `_flush` when it
    is full (and at the end). The bucket sinks' spans (object_sink.PartSpan, zarr_sink.ChunkSpan)
    differ in where they hand the bytes, not in how they stage them; `Span` below keeps partial
    pages for O_DIRECT and stages its own way."""

    buf: mmap.mmap
    view: memoryview
    fill: int

    def _left(self) -> int:
        """Bytes the span may still take."""
        raise NotImplementedError

    def _label(self) -> str:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def reserve(self, nbytes: int) -> memoryview:
        """The next `nbytes` of the span, to fill before the next call to `reserve` or the end."""
        if nbytes > self._left():
            raise AssertionError(f"{self._label()}: write past the end of the span")
        if self.fill + nbytes > len(self.buf):
            self._flush()
        if nbytes > len(self.buf):
            self.view.release()
            self.buf = staging_buffer(nbytes)
            self.view = memoryview(self.buf)
        view = self.view[self.fill : self.fill + nbytes]
        self.fill += nbytes
        return view

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes already in the child's dtype (a passthrough copy)."""
        data = memoryview(data).cast("B")
        step = max(4096, len(self.buf) // 2)
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            self.reserve(len(piece))[:] = piece


class Flusher:
    """One worker thread's second staging buffer and the thread that writes it out.

    A span's whole pages used to go out with a synchronous O_DIRECT `pwrite`, during which the
    worker neither blended nor read: on the 4B geometry, cold, a linear merge took 1.43x the
    physical floor (dd reading the parents while another dd writes the child; medians of 3), and
    its CPU time was not the reason (11 s per core against an 18 s floor). Now a full buffer is
    handed to this thread and the worker fills the other one, so each worker keeps one write in
    flight while it computes: 1.03x. Asking the kernel to read a task's rows ahead as well
    (POSIX_FADV_WILLNEED) then made it slower (1.24x), and is not done. At
    most one write is pending: a worker waits for it before it hands on the next buffer, and a span
    waits for it before it ends (its chunk is journalled as done only once its bytes are written).
    """

    def __init__(self) -> None:
        self.spare: mmap.mmap | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def buffer(self, nbytes: int) -> mmap.mmap:
        if self.spare is None or len(self.spare) < nbytes:
            self.spare = staging_buffer(nbytes)
        return self.spare

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="darwin-flush")
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Block until the pending write is done; raise its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool, self.spare = None, None


_flushers: PerThread[Flusher] = PerThread(Flusher)


def release_flushers() -> None:
    """Stop every thread's flusher and drop its buffer (engine.release_scratch, at a merge's end)."""
    for f in _flushers.values():
        f.close()
    _flushers.clear()


class Span:
    """One task's rows of one tensor, which arrive in order, on their way to the shard.

    Rows are staged in a page-aligned buffer whose byte `i` belongs at file offset `base + i`, with
    `base` a page boundary, so that every whole page can go out with O_DIRECT: no copy into the page
    cache and no writeback later. The partial pages at either end of the span, which the
    neighbouring tensors share, go through the page cache with `pwrite`, which is safe for writers
    of disjoint bytes. The caller owns the buffer (one per thread, reused from task to task); the span
    outgrows it only for a single write larger than the buffer. With `background` (the default), a
    full buffer is written by the thread's `Flusher` while the rows go on into its spare buffer.
    """

    def __init__(self, path: Path, offset: int, end: int, *, direct: bool, buffer: mmap.mmap | None = None,
                 background: bool = True):
        self.path, self.start, self.end = path, offset, end
        self.buf = buffer if buffer is not None else staging_buffer(min(end - offset + PAGE, STAGE_BYTES))
        self.view = memoryview(self.buf)
        self._given = self.buf  # the caller's: it must not stay the flusher's spare after the span
        self.flusher = _flushers.get() if background and staging_buffers(len(self.buf)) == 2 else None
        self.fd = os.open(path, os.O_WRONLY)
        self.dfd: int | None = None
        if direct:
            with contextlib.suppress(OSError):  # refused: whole pages go through the cache as well
                self.dfd = os.open(path, os.O_WRONLY | _O_DIRECT)
        self.base = offset - offset % PAGE
        self.lead = self.fill = offset % PAGE  # buf[:lead] belongs to the neighbour before us

    @property
    def position(self) -> int:
        """File offset of the next byte to come."""
        return self.base + self.fill

    @property
    def written(self) -> int:
        return self.position - self.start

    def reserve(self, nbytes: int) -> memoryview:
        """The next `nbytes` of the span, to fill before the next call to `reserve` or `close`."""
        if self.position + nbytes > self.end:
            raise AssertionError(f"{self.path.name}: write past the end of the tensor")
        if self.fill + nbytes > len(self.buf):
            self._flush(final=False)
        if self.fill + nbytes > len(self.buf):
            bigger = staging_buffer(self.fill + nbytes)
            bigger[: self.fill] = self.view[: self.fill]
            self.view.release()
            self.buf, self.view = bigger, memoryview(bigger)
        view = self.view[self.fill : self.fill + nbytes]
        self.fill += nbytes
        return view

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        step = max(PAGE, len(self.buf) // 2)
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            self.reserve(len(piece))[:] = piece

    def _flush(self, final: bool) -> None:
        lo = self.lead
        hi = self.fill if final else self.fill - self.fill % PAGE
        if hi <= lo:
            return
        first = min(hi, -(-lo // PAGE) * PAGE)  # end of a partial first page
        last = max(first, hi - hi % PAGE)  # start of a partial last page
        view, base = self.view, self.base

        def write() -> None:
            self._pwrite(self.fd, view, base, lo, first)
            self._pwrite(self.dfd, view, base, first, last)
            self._pwrite(self.fd, view, base, last, hi)

        if final or self.flusher is None:
            if self.flusher is not None:
                self.flusher.wait()
            write()
            return
        keep = self.fill - hi
        spare = self.flusher.buffer(len(self.buf))
        self.flusher.submit(write)  # waits for the write before, which used `spare`
        spare[:keep] = self.buf[hi : self.fill]
        self.flusher.spare = self.buf  # in flight now; the next flush writes `spare` and gets it back
        self.buf, self.view = spare, memoryview(spare)
        self.base += hi
        self.lead, self.fill = 0, keep

    def _pwrite(self, fd: int | None, view: memoryview, base: int, lo: int, hi: int) -> None:
        fd = self.fd if fd is None else fd
        while lo < hi:
            try:
                n = os.pwrite(fd, view[lo:hi], base + lo)
            except OSError as e:
                if fd == self.fd:  # a full disk, a quota: name the file, which pwrite's error does not
                    raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from None
                fd = self.fd  # the filesystem refused a direct write after all: go through the cache
                continue
            lo += n

    def close(self, flush: bool = True) -> None:
        try:
            if flush:
                self._flush(final=True)
        finally:
            if self.flusher is not None:
                try:
                    if flush:
                        self.flusher.wait()
                    else:  # failing already: that error is the one to report
                        with contextlib.suppress(Exception):
                            self.flusher.wait()
                finally:
                    if self.flusher.spare is self._given:
                        self.flusher.spare = self.buf
            self.view.release()
            os.close(self.fd)
            if self.dfd is not None:
                os.close(self.dfd)

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(flush=exc_type is None)


class ChildWriter:
    """A child checkpoint under construction in `.<name>.partial`, next to its final path.

    The output is resolved first (a symlinked OUT_DIR is written at its target and the link kept).
    The caller holds the output's lock (`outputs.OutputLock`, taken by `api.merge`) and has checked
    that no output path is an input. `identities` are the parents' content digests
    (`identity.plan_identities`); by default they are computed from the parent pool's parents. When a
    stale partial child is discarded, `restarted` says why, for the report's notes.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Plan, shard_size: int, *, overwrite: bool = False,
                 direct: bool = True, identities: dict[str, str] | None = None, extra_bytes: int = 0):
        self.paths = outputs.output_paths(out_dir)
        self.final = self.paths.final
        if self.final.exists() and not overwrite and (not self.final.is_dir() or any(self.final.iterdir())):
            raise OutputError(f"output {self.final} already exists (use --overwrite to replace it)")
        self.tmp = self.paths.tmp
        self.layout = layout(plan, shard_size)
        ids = identities if identities is not None else plan_identities(plan, pool.get_parent)
        self.fingerprint = plan_fingerprint(plan, self.layout, ids)
        self.done: set[tuple[str, int, int]] = set()
        self.restarted: str | None = None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._prepare(plan, extra_bytes)
        self.direct = direct and self._direct_supported()

    def __getstate__(self) -> dict:
        # Tasks on dask.distributed workers carry the writer: it holds paths only, no open files.
        return {**self.__dict__, "done": set()}

    def _reuse(self, plan: Plan) -> bool:
        """Whether the partial child in `tmp` was made from this very plan, layout and parents."""
        stamp = self.tmp / outputs.STAMP
        if not stamp.is_file():
            return False
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
        if old == self.fingerprint:
            return True
        self.restarted = (f"discarded the partial child in {self.tmp}: {_changed(old, self.fingerprint, plan)}; "
                          "the merge restarted from scratch")
        return False

    def _prepare(self, plan: Plan, extra_bytes: int) -> None:
        reuse = self.tmp.is_dir() and not self.tmp.is_symlink() and self._reuse(plan)
        have = 0  # bytes the partial child already holds on disk (its shards are sparse until written)
        for fname in self.layout.shards if reuse else ():
            with contextlib.suppress(OSError):
                have += os.stat(self.tmp / fname).st_blocks * 512
        outputs.check_free_space(self.final.parent, self.layout.nbytes + extra_bytes - have,
                                 f"the child ({self.final.name})")
        journal = self.tmp / ".darwin-journal"
        if reuse:
            if journal.exists():
                for line in journal.read_text().splitlines():
                    parts = line.rsplit(" ", 2)
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        self.done.add((parts[0], int(parts[1]), int(parts[2])))
        else:
            outputs.clear_temporary(self.tmp)
            self.tmp.mkdir(parents=True)
            (self.tmp / outputs.STAMP).write_text(json.dumps(self.fingerprint))
        for fname, (head, size) in self.layout.shards.items():
            fd = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                os.pwrite(fd, head, 0)
            finally:
                os.close(fd)

    def is_done(self, name: str, start_row: int, stop_row: int) -> bool:
        """Whether a killed run of this plan already wrote rows [start_row, stop_row) of `name`."""
        return (name, start_row, stop_row) in self.done

    def _direct_supported(self) -> bool:
        """Whether the shards' filesystem takes O_DIRECT (some refuse it at open, others at the first
        write, which `Span` handles)."""
        if not _O_DIRECT or not self.layout.shards:
            return False
        try:
            os.close(os.open(self.tmp / next(iter(self.layout.shards)), os.O_WRONLY | _O_DIRECT))
        except OSError:
            return False
        return True

    def span(self, name: str, start_row: int, buffer: mmap.mmap | None = None) -> Span:
        """Where a task writes its rows of `name` from `start_row` on, in order, staged in `buffer`."""
        slot = self.layout.slots[name]
        return Span(self.tmp / slot.shard, slot.offset + start_row * slot.row_bytes, slot.offset + slot.nbytes,
                    direct=self.direct, buffer=buffer)

    def mark_done(self, name: str, start_row: int, stop_row: int) -> None:
        # One O_APPEND write per line: atomic, so threads and workers need no lock. The extent is
        # recorded, not just the start: another budget or worker count chunks a tensor differently.
        fd = os.open(self.tmp / ".darwin-journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {start_row} {stop_row}\n".encode())
        finally:
            os.close(fd)

    def write_file(self, name: str, data: bytes) -> None:
        """An inherited file of the child; never one of its weights files or the writer's own."""
        if "/" in name or "\\" in name or name.startswith(".") or name in self.layout.shards or name == INDEX_NAME:
            raise OutputError(f"output {self.final}: refusing to write an inherited file named {name!r}")
        path = self.tmp / name
        path.write_bytes(data)
        mode = getattr(data, "mode", None)  # sources.AuxBytes: no wider than the parent's own file
        if mode is not None:
            os.chmod(path, mode & path.stat().st_mode & 0o777)

    def finish(self, index_metadata: dict | None = None) -> Path:
        """fsync, write the index, drop the journal and rename into place."""
        for fname in self.layout.shards:
            fd = os.open(self.tmp / fname, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if len(self.layout.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.layout.slots.values()), **(index_metadata or {})},
                "weight_map": {s.name: s.shard for s in self.layout.slots.values()},
            }
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.tmp / ".darwin-journal").unlink(missing_ok=True)
        (self.tmp / outputs.STAMP).unlink(missing_ok=True)
        if self.final.exists() or self.final.is_symlink():
            trash = self.paths.old
            outputs.remove(trash)
            self.final.rename(trash)
            self.tmp.rename(self.final)
            outputs.remove(trash)
        else:
            self.tmp.rename(self.final)
        return self.final
