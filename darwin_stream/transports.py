"""Byte transports: how a safetensors parent's shard bytes are read, below the parent pool.

A `SafetensorsParent` knows where each tensor lies (file, offset, length); a `Transport` fetches
those bytes. Two exist:

  * `MemoryMap`: local shards, memory-mapped once per shard; a read is a zero-copy view of the page
    cache. It is the merge's hot path: through the zarr reference view the same reads cost 50-120%
    more (docs/benchmarks.md, "Read path"), so nothing is put between a task and the map.
  * `RangedReads`: shards behind an fsspec URL (s3://, memory://, file://), one ranged request per
    read, counted (requests, bytes) so that the bytes fetched can be set against the bytes needed.

Store parents (store/parent.py) read zarr chunks through zarr's own fsspec store, not through a
transport; what they share with safetensors parents is the `Parent` interface the pool hands out.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from typing import TYPE_CHECKING, Protocol

from darwin_stream.errors import SourceError

if TYPE_CHECKING:
    import fsspec


class Transport(Protocol):
    """Where a parent's shard bytes come from."""

    @property
    def is_local(self) -> bool:
        """True for local files (read by memory-map, identified by stat)."""
        ...

    def read(self, file: str, offset: int, nbytes: int) -> memoryview | bytearray:
        """Bytes [offset, offset + nbytes) of `file`, exactly `nbytes` of them, or a SourceError."""
        ...

    def close(self) -> None:
        """Release maps and handles; a later read opens them again."""
        ...


class MemoryMap:
    """Local shards, mapped read-only and copy-on-write: a read is a view of the page cache.

    `sizes` holds, per shard, the size its header says it has: a shard shortened since the parent
    was opened is refused before its missing pages are touched (a read past the end of a mapping
    is a SIGBUS, which kills the process).
    """

    is_local = True

    def __init__(self, spec: str, sizes: dict[str, int]):
        self.spec = spec
        self._sizes = sizes
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()

    def _map(self, file: str) -> tuple[mmap.mmap, int]:
        got = self._maps.get(file)
        if got is None:
            with self._lock:
                got = self._maps.get(file)
                if got is None:
                    try:
                        # Read-only file, copy-on-write map (MAP_PRIVATE): the parent on disk can never
                        # change, pages stay shared with the page cache, and tensors over the map are
                        # writable (no torch warning), where a write would only copy that page.
                        fd = os.open(file, os.O_RDONLY)
                        try:
                            self._check_size(file, fd)
                            m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                        except BaseException:
                            os.close(fd)
                            raise
                    except OSError as e:
                        raise SourceError(f"parent {self.spec}: cannot read {file} ({e.strerror})") from None
                    got = self._maps[file] = (m, fd)  # the fd is kept: `_check_size` asks it before each read
        return got

    def _check_size(self, file: str, fd: int) -> None:
        size = os.fstat(fd).st_size
        want = self._sizes.get(file, 0)
        if size < want:
            raise SourceError(
                f"parent {self.spec}: shard {file} was truncated while in use ({size} bytes, its header needs {want})"
            )

    def read(self, file: str, offset: int, nbytes: int) -> memoryview:
        m, fd = self._map(file)
        self._check_size(file, fd)  # one fstat: microseconds per task
        return memoryview(m)[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap and close every shard. A map some tensor still views stays until it is freed."""
        with self._lock:
            maps, self._maps = self._maps, {}
        for m, fd in maps.values():
            with contextlib.suppress(BufferError):
                m.close()
            with contextlib.suppress(OSError):
                os.close(fd)


class RangedReads:
    """Shards behind an fsspec filesystem, one ranged request per read (never a whole shard)."""

    is_local = False

    def __init__(self, spec: str, fs: fsspec.AbstractFileSystem):
        self.spec = spec
        self.fs = fs
        self.requests = 0  # ranged requests made, and the bytes they returned
        self.bytes_read = 0
        self._lock = threading.Lock()

    def read(self, file: str, offset: int, nbytes: int) -> bytearray:
        if not nbytes:
            return bytearray()
        try:
            buf = bytearray(self.fs.cat_file(file, start=offset, end=offset + nbytes))
        except OSError as e:
            raise SourceError(f"parent {self.spec}: cannot read {file} ({e})") from None
        with self._lock:
            self.requests += 1
            self.bytes_read += len(buf)
        if len(buf) != nbytes:
            raise SourceError(f"parent {self.spec}: truncated shard {file} (short read at byte {offset})")
        return buf

    def close(self) -> None:
        """Nothing is held between reads: the filesystem keeps its own connections."""
