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
import shutil
from dataclasses import dataclass
from pathlib import Path

from darwin_stream import dtypes
from darwin_stream.errors import DarwinError
from darwin_stream.plan import Plan

_ALIGN = 8
PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffers (a multiple of any block size in use)
STAGE_BYTES = 4 * 2**20  # largest staging buffer: enough for the disk, small beside any budget
_O_DIRECT = getattr(os, "O_DIRECT", 0)


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


def plan_fingerprint(plan: Plan) -> str:
    """Identifies a plan, so that a resumed merge never mixes chunks of two different plans."""
    return hashlib.blake2b(plan.to_json().encode(), digest_size=16).hexdigest()


def staging_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned buffer of at least `nbytes` (anonymous memory: what O_DIRECT needs)."""
    return mmap.mmap(-1, max(2 * PAGE, -(-nbytes // PAGE) * PAGE))


class Span:
    """One task's rows of one tensor, which arrive in order, on their way to the shard.

    Rows are staged in a page-aligned buffer whose byte `i` belongs at file offset `base + i`, with
    `base` a page boundary, so that every whole page can go out with O_DIRECT: no copy into the page
    cache and no writeback later. The partial pages at either end of the span, which the
    neighbouring tensors share, go through the page cache with `pwrite`, which is safe for writers
    of disjoint bytes. The caller owns the buffer (one per thread, reused from task to task); the span
    outgrows it only for a single write larger than the buffer.
    """

    def __init__(self, path: Path, offset: int, end: int, *, direct: bool, buffer: mmap.mmap | None = None):
        self.path, self.start, self.end = path, offset, end
        self.buf = buffer if buffer is not None else staging_buffer(min(end - offset + PAGE, STAGE_BYTES))
        self.view = memoryview(self.buf)
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
        self._pwrite(self.fd, lo, first)
        self._pwrite(self.dfd, first, last)
        self._pwrite(self.fd, last, hi)
        if not final:
            keep = self.fill - hi
            self.view[:keep] = self.view[hi : self.fill]
            self.base += hi
            self.lead, self.fill = 0, keep

    def _pwrite(self, fd: int | None, lo: int, hi: int) -> None:
        fd = self.fd if fd is None else fd
        while lo < hi:
            try:
                n = os.pwrite(fd, self.view[lo:hi], self.base + lo)
            except OSError:
                if fd == self.fd:
                    raise
                fd = self.fd  # the filesystem refused a direct write after all: go through the cache
                continue
            lo += n

    def close(self, flush: bool = True) -> None:
        try:
            if flush:
                self._flush(final=True)
        finally:
            self.view.release()
            os.close(self.fd)
            if self.dfd is not None:
                os.close(self.dfd)

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(flush=exc_type is None)


class ChildWriter:
    """A child checkpoint under construction in `.<name>.partial`, next to its final path."""

    def __init__(self, out_dir: str | os.PathLike, plan: Plan, shard_size: int, *, overwrite: bool = False,
                 direct: bool = True):
        self.final = Path(out_dir).absolute()
        if self.final.exists() and not overwrite and (not self.final.is_dir() or any(self.final.iterdir())):
            raise DarwinError(f"output {self.final} already exists (use --overwrite to replace it)")
        self.tmp = self.final.parent / f".{self.final.name}.partial"
        self.layout = layout(plan, shard_size)
        self.fingerprint = plan_fingerprint(plan)
        self.done: set[tuple[str, int]] = set()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.direct = direct and self._direct_supported()

    def __getstate__(self) -> dict:
        # Tasks on dask.distributed workers carry the writer: it holds paths only, no open files.
        return {**self.__dict__, "done": set()}

    def _prepare(self) -> None:
        stamp = self.tmp / ".darwin-plan"
        journal = self.tmp / ".darwin-journal"
        if self.tmp.exists() and stamp.exists() and stamp.read_text() == self.fingerprint:
            if journal.exists():
                for line in journal.read_text().splitlines():
                    name, _, start = line.rpartition(" ")
                    if name:
                        self.done.add((name, int(start)))
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            stamp.write_text(self.fingerprint)
        for fname, (head, size) in self.layout.shards.items():
            fd = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                os.pwrite(fd, head, 0)
            finally:
                os.close(fd)

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

    def mark_done(self, name: str, start_row: int) -> None:
        # One O_APPEND write per line: atomic, so threads and workers need no lock.
        fd = os.open(self.tmp / ".darwin-journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {start_row}\n".encode())
        finally:
            os.close(fd)

    def write_file(self, name: str, data: bytes) -> None:
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
            self.write_file("model.safetensors.index.json", json.dumps(index, indent=2).encode())
        (self.tmp / ".darwin-journal").unlink(missing_ok=True)
        (self.tmp / ".darwin-plan").unlink(missing_ok=True)
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            self.final.rename(trash)
            self.tmp.rename(self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.tmp.rename(self.final)
        return self.final
