"""What the engine needs of the place a child is written: the child sink protocol.

Four sinks implement it: `child_writer.ChildWriter` (local files, O_DIRECT, atomic rename),
`object_sink.ObjectSink` (an S3 bucket: one multipart upload per shard, a completion marker last),
and for a zarr child `zarr_sink.ZarrSink` (one chunk object per task in a bucket, its root last)
and `zarr_sink.LocalZarrSink` (one chunk file per task, renamed into place).
The engine and `api.merge` type against these Protocols only, so a test can drive the engine with a
fake and a new destination is one new class.

The contract, as the engine uses it (`engine._write_task`, `engine.build_graph`, `engine.run`):
  * `layout` is the child's planned shard layout (`child_writer.layout`): every tensor's byte range is
    known before any task runs, so tasks write without coordinating;
  * `is_done(name, start, stop)` says a resumed run may skip that row chunk;
  * `span(name, start_row, buffer)` takes one task's rows of one tensor, in row order, staged in
    the thread's `buffer`; leaving the span without an exception commits them;
  * `mark_done(name, start, stop)` records a finished chunk (for a resume);
  * `write_file(name, data)` adds an inherited file (config, tokenizer, model card);
  * `finish()` makes the child visible under its final name, complete, and returns that name.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from darwin_stream.child_writer import Layout


class RowSpan(Protocol):
    """One task's rows of one tensor on their way into the child, in row order."""

    @property
    def written(self) -> int:
        """Bytes taken so far (the engine checks that blocks arrive in order)."""
        ...

    def reserve(self, nbytes: int) -> memoryview:
        """The next `nbytes` of the span, to fill before the next call to `reserve` or the end."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes already in the child's dtype (a passthrough copy)."""
        ...

    def __enter__(self) -> RowSpan: ...

    def __exit__(self, exc_type: object, *exc: object) -> None: ...


@runtime_checkable
class ChildSink(Protocol):
    """A child under construction; see the module docstring for what each call promises."""

    layout: Layout
    done: set[tuple[str, int, int]]  # chunks a killed run of this plan finished (resumed, not redone)
    restarted: str | None  # why a stale partial child was discarded, for the report's notes
    direct: bool  # whole pages went out with O_DIRECT (local files only)

    def is_done(self, name: str, start_row: int, stop_row: int) -> bool: ...

    def span(self, name: str, start_row: int, buffer: mmap.mmap | None = None) -> RowSpan: ...

    def mark_done(self, name: str, start_row: int, stop_row: int) -> None: ...

    def write_file(self, name: str, data: bytes) -> None: ...

    def finish(self, index_metadata: dict | None = None) -> str | os.PathLike: ...
