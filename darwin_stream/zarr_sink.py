"""A zarr child written chunk by chunk: each chunk one task's rows, as an object or a file.

`--format zarr` into `s3://bucket/prefix` makes a copy store (docs/store.md) without a local copy
of the child (`ZarrSink`); into a local directory, the store is built in place in `.<name>.partial`
and renamed when complete (`LocalZarrSink`, at the end of this module), with no safetensors copy
staged first. Each array is chunked by the engine's rows per task (`task_rows`, the same
`engine.chunk_rows` the graph is built with), so every task writes exactly one chunk object and no
object is shared by two tasks: nothing waits for another task, and no part is ever a fragment.
A chunk is uncompressed little-endian bytes (zarr's `bytes` codec), so its object is the task's
rows as they are; a tensor's short last chunk is padded with zeros (the fill value) to the full
chunk shape, as zarr-python stores an edge chunk and requires it back.

A chunk of up to one part (`object_sink.part_size_for`, 8 MiB) is one PUT when its task ends; a
bigger one is a multipart upload of fixed parts, each sent as soon as it is full. So a task holds
one part, and one more on its way out: `object_sink.waiting_bytes(part, workers, distributed=True)`
is what `api.merge` sets aside from the budget.

The bucket conventions are object_sink's (child_marker): while the merge runs, a journal beside the
child (`.<name>.partial/darwin-journal.json`) holds the plan's fingerprint, the part size and the
rows per chunk, and readers refuse a location with a journal and no marker. `finish` checks that
every chunk is in (one listing), then writes every array's and group's zarr.json, the inherited
files as `aux/` arrays, the root zarr.json with the `darwin_stream` index (`complete: true`) and
the marker `.darwin-complete` last, and removes the journal. Before the root is written the prefix
is no store at all, so plain zarr readers see nothing either.

Checksums: tasks run in any order, so each hashes its own chunk; a tensor of one chunk records the
sha256 of its bytes, as ingest does, and a tensor of several records `sha256-chunks` (the sha256 of
its chunks' digests, `store.layout.TensorHash`), which export and store parents verify alike.

Resume: a re-run with the same fingerprint, part size and rows per chunk lists the prefix: a chunk
object at its full size is done (`is_done`, so its task is skipped), and an open multipart upload
of a chunk keeps its parts (ListParts); only the rest is uploaded. The chunks a killed run made are
read back once at the end, for their digests (`stats.read_back_bytes`). Anything else (a changed
plan or parent, another budget or worker count, which changes the chunks) clears the prefix and
starts again: the marker and root go first, then open uploads are aborted and objects deleted,
under a journal marked `clearing` so that a run killed while clearing is never resumed from what
was left. Object stores have no rename, so `--overwrite` of an existing store clears it at the
start: from then on it is refused as incomplete, until this merge completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from darwin_stream import child_marker, dtypes, engine, outputs, pool
from darwin_stream.bucket import BucketPrefix, _stats_for, _why
from darwin_stream.child_writer import (
    INDEX_NAME,
    STAGE_BYTES,
    Layout,
    StagedSpan,
    _changed,
    _digest,
    layout,
    plan_fingerprint,
    staging_buffer,
)
from darwin_stream.errors import OutputError, StorageError
from darwin_stream.identity import plan_identities
from darwin_stream.object_sink import part_size_for
from darwin_stream.plan import Plan
from darwin_stream.store import layout as zlayout
from darwin_stream.store.api import aux_problem, is_store

JOURNAL_FORMAT = "zarr"


def task_rows(plan: Plan, budget: int, workers: int) -> dict[str, int]:
    """Rows per chunk of every array: the engine's rows per task under this budget."""
    return {tp.name: engine.chunk_rows(plan, tp, budget, workers) for tp in plan.tensors}


def part_bytes(plan: Plan) -> int:
    """The part size for a zarr child: 8 MiB, unless a chunk could need over 10,000 parts (a
    chunk is at most its tensor, padded by under one chunk: twice the largest tensor)."""
    biggest = max((math.prod(t.shape) * dtypes.itemsize(t.dtype) for t in plan.tensors), default=0)
    return part_size_for(2 * biggest)


@dataclass(frozen=True)
class ArrayPlan:
    """One tensor of the child as a zarr array: where it goes and how it is chunked."""

    name: str
    path: str  # in the store: layers/<i>/<rest> or other/<name>
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    rows: int  # rows per chunk (the engine's rows per task)
    row_bytes: int

    @property
    def total_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def chunks(self) -> int:
        return 0 if math.prod(self.shape) == 0 else -(-self.total_rows // self.rows)

    @property
    def chunk_bytes(self) -> int:
        """A chunk object's size: full chunk shape, the last one padded."""
        return self.rows * self.row_bytes

    def chunk_shape(self) -> tuple[int, ...]:
        return (self.rows, *(max(1, s) for s in self.shape[1:])) if self.shape else ()

    def key(self, i: int) -> str:
        """zarr v3's default chunk key, `/`-separated; other dimensions are one chunk each."""
        return f"{self.path}/c" if not self.shape else f"{self.path}/c/{i}" + "/0" * (len(self.shape) - 1)

    def data_bytes(self, i: int) -> int:
        """The tensor's bytes in chunk `i` (the rest of the object is padding)."""
        return (min(self.rows, self.total_rows - i * self.rows)) * self.row_bytes


# Chunk digests counted in this process per run id (on a dask.distributed worker, every copy of
# the run's sink adds here); the client folds them in with `take_digests`, as with upload counts.
_worker_digests: dict[str, dict[str, bytes]] = {}
_digests_lock = threading.Lock()


def _digests_for(run_id: str) -> dict[str, bytes]:
    with _digests_lock:
        return _worker_digests.setdefault(run_id, {})


def take_digests(run_id: str) -> dict[str, bytes]:
    """This process's chunk digests for run `run_id`, forgotten once taken (run on every worker)."""
    with _digests_lock:
        return _worker_digests.pop(run_id, {})


class ZarrChild:
    """What both zarr sinks share: the arrays and their chunks, which chunks are in, their digests,
    the inherited files, and the store's documents. Subclasses make the chunks (`_chunk`)."""

    direct = False  # no O_DIRECT: a chunk is one whole object or file
    where_name: str  # the output, for messages

    def _plan_arrays(self, plan: Plan, rows: dict[str, int], identities: dict[str, str] | None) -> None:
        self.layout = layout(plan, 2**62)  # one shard: only the tensors' row bytes matter here
        paths = zlayout.store_paths([t.name for t in plan.tensors])
        self.arrays: dict[str, ArrayPlan] = {}
        for t in plan.tensors:
            problem = zlayout.name_problem(t.name)
            if problem:
                raise OutputError(f"output {self.where_name}: tensor name {t.name!r} {problem}")
            slot = self.layout.slots[t.name]
            self.arrays[t.name] = ArrayPlan(t.name, paths[t.name], t.dtype, tuple(t.shape),
                                            max(1, min(rows[t.name], t.shape[0] if t.shape else 1)),
                                            max(slot.row_bytes, 1) if t.shape else slot.nbytes)
        self.where = {a.key(i): (a, i) for a in self.arrays.values() for i in range(a.chunks)}
        ids = identities if identities is not None else plan_identities(plan, pool.get_parent)
        self.fingerprint = {**plan_fingerprint(plan, self.layout, ids),
                            "chunks": _digest({n: a.rows for n, a in self.arrays.items()})}
        self.done: set[tuple[str, int, int]] = set()
        self.restarted: str | None = None
        self.files: dict[str, bytes] = {}
        self.chunks_in: set[str] = set()  # chunks a killed run completed

    def _chunk(self, key: str, size: int) -> ChunkObject | LocalChunk:
        raise NotImplementedError

    def is_done(self, name: str, start_row: int, stop_row: int) -> bool:
        """Whether the chunk of rows [start_row, stop_row) of `name` is already in."""
        a = self.arrays[name]
        done = start_row % a.rows == 0 and a.key(start_row // a.rows) in self.chunks_in
        if done:
            self.done.add((name, start_row, stop_row))
        return done

    def span(self, name: str, start_row: int, buffer: mmap.mmap | None = None) -> ChunkSpan:
        a = self.arrays[name]
        if start_row % a.rows:
            raise AssertionError(f"{name}: a task starts at row {start_row}, inside a chunk of {a.rows} rows")
        i = start_row // a.rows
        return ChunkSpan(self._chunk(a.key(i), a.chunk_bytes), a.data_bytes(i), buffer)

    def mark_done(self, name: str, start_row: int, stop_row: int) -> None:
        """Nothing to record here: a chunk is recorded when its span completes it (`chunk_written`)."""

    def write_file(self, name: str, data: bytes) -> None:
        """An inherited file, held until `finish` (config, tokenizer, card: a few MiB at most)."""
        problem = aux_problem(name) or ("is the index" if name == INDEX_NAME else None)
        if problem:
            raise OutputError(f"output {self.where_name}: refusing to write an inherited file named {name!r} ({problem})")
        self.files[name] = bytes(data)

    def documents(self, digests: dict[str, bytes], source: str) -> tuple[dict[str, bytes], bytes]:
        """Every array's and group's zarr.json and the aux objects, and the root zarr.json (last)."""
        meta = root_index(self.arrays, digests, sorted(self.files), source)
        docs = {f"{a.path}/zarr.json": zlayout.array_metadata(
                    a.shape, a.code, a.chunk_shape(), {"name": a.name, "dtype": a.code, "complete": True,
                                                       "checksum": meta["tensors"][a.name]["checksum"]})
                for a in self.arrays.values()}
        groups = {"layers", "other", "aux"} | {a.path.rsplit("/", 1)[0] for a in self.arrays.values()}
        docs.update({f"{g}/zarr.json": zlayout.group_metadata() for g in groups})
        blobs = {k: json.dumps(v).encode() for k, v in docs.items()}
        for name, data in self.files.items():
            blobs[f"{zlayout.AUX_PREFIX}{name}/zarr.json"] = json.dumps(zlayout.aux_metadata(name, len(data))).encode()
            if data:
                blobs[f"{zlayout.AUX_PREFIX}{name}/c/0"] = data
        return blobs, json.dumps(zlayout.group_metadata({zlayout.ROOT_ATTR: meta})).encode()


def root_index(arrays: dict[str, ArrayPlan], digests: dict[str, bytes], aux: list[str], source: str) -> dict:
    """The root's `darwin_stream` attribute: a copy store's index, each tensor's checksum from its
    chunks' digests (one chunk: its sha256, as ingest records; several: `sha256-chunks`)."""
    tensors = {}
    for a in arrays.values():
        ds = [digests[a.key(i)] for i in range(a.chunks)]
        if len(ds) == 1:
            checksum = f"{zlayout.CHECKSUM_ALGO}:{ds[0].hex()}"
        elif ds:
            checksum = zlayout.chunked_checksum(ds, a.chunk_bytes)
        else:
            checksum = f"{zlayout.CHECKSUM_ALGO}:{hashlib.sha256(b'').hexdigest()}"
        tensors[a.name] = {"path": a.path, "dtype": a.code, "shape": list(a.shape), "checksum": checksum}
    return {"format": zlayout.FORMAT_VERSION, "mode": "copy", "source": source, "complete": True,
            "checksum_algorithm": zlayout.CHECKSUM_ALGO, "tensors": tensors, "aux": aux, "compressor": None}


class ZarrSink(BucketPrefix, ZarrChild):
    """A zarr child under construction at `s3://bucket/prefix`; implements `sink.ChildSink`."""

    def __init__(self, url: str, plan: Plan, rows: dict[str, int], *, overwrite: bool = False,
                 identities: dict[str, str] | None = None, storage_options: dict | None = None,
                 part_size: int | None = None, distributed: bool = False):
        super().__init__(url, storage_options)
        self.where_name = self.url
        self.distributed = distributed  # tasks run in other processes: their digests come back by take_digests
        self._plan_arrays(plan, rows, identities)
        self.part = part_size or part_bytes(plan)
        self.partial: dict[str, tuple[str, dict[int, str]]] = {}  # chunk key -> (upload id, part -> ETag)
        self.digests = _digests_for(self.run_id)
        self._waiting = 0
        self._prepare(overwrite, plan)

    def __getstate__(self) -> dict:
        """What a dask.distributed worker gets: names, geometry, what is in; no client, no lock."""
        if not self.distributed:
            raise OutputError(f"output {self.url}: make this sink with distributed=True to run its tasks "
                              "in other processes (their chunk digests must come back)")
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_lock", "stats", "digests", "files")}
        state["layout"] = Layout({s: (b"", size) for s, (_, size) in self.layout.shards.items()}, self.layout.slots)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs, self._lock, self.files = None, threading.Lock(), {}
        self.stats = _stats_for(self.run_id)  # shared by every copy of this run's sink in the process
        self.digests = _digests_for(self.run_id)
        self.done, self._waiting = set(), 0

    # --- preparing and resuming -------------------------------------------------------------------

    def _prepare(self, overwrite: bool, plan: Plan) -> None:
        existing = self._listing(self.key + "/")  # the first request: credentials and bucket fail here
        journal = self._read_journal()
        marker = f"{self.key}/{child_marker.MARKER}"
        ours = journal is not None and marker not in existing
        if existing and not overwrite and not ours:
            raise OutputError(f"output {self.url} already exists (use --overwrite to replace it)")
        if journal is not None and self._resumable(journal):
            self._resume(existing)
            return
        if journal is not None:
            self.restarted = (f"discarded the partial child at {self.url}: {self._why_changed(journal, plan)}; "
                              "the merge restarted from scratch")
        self._clear(existing)
        self._write_journal("writing")

    def _resumable(self, journal: dict) -> bool:
        return (journal.get("format") == JOURNAL_FORMAT and journal.get("state") == "writing"
                and journal.get("fingerprint") == self.fingerprint and journal.get("part_bytes") == self.part)

    def _why_changed(self, journal: dict, plan: Plan) -> str:
        old = journal.get("fingerprint")
        if journal.get("format") != JOURNAL_FORMAT:
            return "it was not a zarr child"
        if journal.get("state") != "writing":
            return "it was being cleared"
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "chunks"} == {
                k: v for k, v in self.fingerprint.items() if k != "chunks"}:
            if old.get("chunks") != self.fingerprint["chunks"]:
                return "its chunks differ (the rows per task follow --memory-budget and the worker count)"
            return "its part size differs"
        return _changed(old, self.fingerprint, plan)

    def _write_journal(self, state: str) -> None:
        body = {"version": 1, "format": JOURNAL_FORMAT, "state": state, "fingerprint": self.fingerprint,
                "part_bytes": self.part}
        self._put_object(self.journal_key, json.dumps(body).encode())

    def _open_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload open under the prefix."""
        found, kw = [], {}
        while True:
            r = self._call("list_multipart_uploads", Prefix=self.key + "/", **kw)
            found += [(u["Key"], u["UploadId"]) for u in r.get("Uploads", [])]
            if not r.get("IsTruncated"):
                return found
            kw = {"KeyMarker": r.get("NextKeyMarker", ""), "UploadIdMarker": r.get("NextUploadIdMarker", "")}

    def _clear(self, existing: dict[str, int]) -> None:
        """Remove whatever is under the prefix: a child being replaced, or a stale partial one."""
        uploads = self._open_uploads()
        if not existing and not uploads:
            return
        self._write_journal("clearing")  # a run killed from here on clears again
        first = [k for k in (f"{self.key}/{child_marker.MARKER}", f"{self.key}/zarr.json") if k in existing]
        self._delete_keys(first)  # what was there stops being readable before anything else goes
        for key, upload in uploads:
            self._call("abort_multipart_upload", Key=key, UploadId=upload, missing_ok=True)
        self._delete_keys([k for k in existing if k not in first])

    def _resume(self, existing: dict[str, int]) -> None:
        prefix = self.key + "/"
        for key, (a, _) in self.where.items():
            if existing.get(prefix + key) == a.chunk_bytes:
                self.chunks_in.add(key)
        for full, upload in self._open_uploads():
            key = full[len(prefix):]
            if key in self.where and key not in self.chunks_in and key not in self.partial:
                self.partial[key] = (upload, self._list_parts(full, upload, self.where[key][0].chunk_bytes))
            else:  # a duplicate, or a chunk that was completed after all
                self._call("abort_multipart_upload", Key=full, UploadId=upload, missing_ok=True)
        # Counted in parts, as `stats.parts` counts them: a chunk of one part is one PUT.
        whole = sum(-(-self.where[k][0].chunk_bytes // self.part) for k in self.chunks_in)
        self.stats.resumed_parts = whole + sum(len(p) for _, p in self.partial.values())

    def _list_parts(self, full: str, upload: str, size: int) -> dict[int, str]:
        """The parts of a chunk's open upload that are in at their planned sizes."""
        etags: dict[int, str] = {}
        marker = 0
        while True:
            r = self._call("list_parts", Key=full, UploadId=upload, PartNumberMarker=marker, missing_ok=True)
            for p in (r or {}).get("Parts", []):
                n = int(p["PartNumber"])
                if n >= 1 and p.get("Size") == min(self.part, size - (n - 1) * self.part):
                    etags[n] = p["ETag"]
            if r is None or not r.get("IsTruncated"):
                return etags
            marker = int(r["NextPartNumberMarker"])

    def _chunk(self, key: str, size: int) -> ChunkObject:
        return ChunkObject(self, key, size)

    # --- chunks -----------------------------------------------------------------------------------

    def hold(self, nbytes: int) -> None:
        with self._lock:
            self._waiting += nbytes
            self.stats.peak_waiting = max(self.stats.peak_waiting, self._waiting)

    def chunk_written(self, key: str, digest: bytes) -> None:
        with self._lock:
            self.digests[key] = digest

    def absorb(self, per_worker_stats: Iterable[dict[str, int]], per_worker_digests: Iterable[dict[str, bytes]]) -> None:
        """Add the workers' counts (`bucket.take_stats`) and chunk digests (`take_digests`) to this run's."""
        for counts in per_worker_stats:
            self.stats.add(counts)
        for digests in per_worker_digests:
            self.digests.update(digests)

    # --- completion -------------------------------------------------------------------------------

    def finish(self, index_metadata: dict | None = None) -> str:
        """Check every chunk is in, write the metadata (the root last), then the marker; drop the journal."""
        prefix = self.key + "/"
        listing = self._listing(prefix)
        missing = [k for k, (a, _) in self.where.items() if listing.get(prefix + k) != a.chunk_bytes]
        if missing:
            raise OutputError(f"output {self.url}: {len(missing)} chunk(s) never arrived, e.g. {missing[0]}")
        for key in self.where:
            if key not in self.digests:  # completed by a killed run: read back for its digest
                self.digests[key] = self._read_back(key)
        blobs, root = self.documents(self.digests, self.url)
        ours = {*self.where, *blobs, "zarr.json", child_marker.MARKER}
        stale = [k for k in listing if k[len(prefix):] not in ours]
        self._put_many(blobs)
        self._delete_keys(stale)  # a killed finish's leftovers this child does not have
        self._put_object(f"{prefix}zarr.json", root)
        self._put_object(f"{prefix}{child_marker.MARKER}", json.dumps({"darwin_stream": 1, "format": "zarr"}).encode())
        self._call("delete_object", Key=self.journal_key)
        return self.url

    def _read_back(self, key: str) -> bytes:
        a, i = self.where[key]
        n = a.data_bytes(i)
        self._count()
        try:
            data = self.fs.cat_file(f"{self.bucket}/{self.key}/{key}", start=0, end=n)
        except Exception as e:  # as in _call
            raise OutputError(f"output {self.url}: cannot read back chunk {key} ({_why(e)})") from None
        with self._lock:
            self.stats.read_back_bytes += len(data)
        if len(data) != n:
            raise OutputError(f"output {self.url}: chunk {key} changed under this merge")
        return hashlib.sha256(data).digest()

    def _put_many(self, blobs: dict[str, bytes]) -> None:
        """Small objects, put concurrently (s3fs batches them): one request each."""
        self._count(len(blobs), sum(len(b) for b in blobs.values()))
        try:
            self.fs.pipe({f"{self.bucket}/{self.key}/{k}": v for k, v in blobs.items()})
        except Exception as e:  # as in _call
            raise OutputError(f"output {self.url}: cannot write (put_object: {_why(e)})") from None


class ChunkObject:
    """One chunk object on its way into the bucket, its bytes arriving in order.

    A chunk of up to one part is one PUT, at `close`; a bigger one a multipart upload whose parts
    go out as they fill (parts a killed run left in its open upload are kept, their bytes dropped).
    """

    def __init__(self, sink: ZarrSink, key: str, size: int):
        self.sink, self.key, self.size = sink, key, size
        self.full = f"{sink.key}/{key}"
        self.single = size <= sink.part
        upload, etags = sink.partial.get(key, (None, {}))
        self.upload: str | None = upload
        self.etags = dict(etags)
        self.buf: bytearray | None = None
        self.filled = self.index = self.received = 0

    def add(self, data: memoryview) -> None:
        while len(data):
            length = min(self.sink.part, self.size - self.index * self.sink.part)
            if self.buf is None:
                self.buf = bytearray(length)
                self.sink.hold(length)
            take = min(length - self.filled, len(data))
            if take <= 0:
                raise AssertionError(f"{self.key}: bytes past the end of the chunk")
            self.buf[self.filled : self.filled + take] = data[:take]
            self.filled += take
            self.received += take
            data = data[take:]
            if self.filled == length:
                self._send()

    def pad(self) -> None:
        """Zeros (the fill value) up to the full chunk shape."""
        zeros = bytes(min(self.sink.part, self.size - self.received))
        while self.received < self.size:
            self.add(memoryview(zeros)[: self.size - self.received])

    def _send(self) -> None:
        assert self.buf is not None
        sink, n = self.sink, self.index + 1
        try:
            if self.single:
                sink._put_object(self.full, bytes(self.buf))
                with sink._lock:
                    sink.stats.parts += 1
            elif n not in self.etags:
                if self.upload is None:
                    self.upload = sink._call("create_multipart_upload", Key=self.full)["UploadId"]
                r = sink._call("upload_part", Key=self.full, UploadId=self.upload, PartNumber=n, Body=bytes(self.buf))
                self.etags[n] = r["ETag"]
                with sink._lock:
                    sink.stats.parts += 1
                    sink.stats.bytes_uploaded += len(self.buf)
        finally:
            self.release()
        self.index, self.filled = self.index + 1, 0

    def close(self) -> None:
        if self.received != self.size:
            raise AssertionError(f"{self.key}: {self.received} of {self.size} bytes")
        if not self.single:
            parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self.etags.items())]
            self.sink._call("complete_multipart_upload", Key=self.full, UploadId=self.upload,
                            MultipartUpload={"Parts": parts})

    def release(self) -> None:
        if self.buf is not None:
            with self.sink._lock:
                self.sink._waiting -= len(self.buf)
            self.buf = None


class ChunkSpan(StagedSpan):
    """One task's rows: one chunk, staged in the thread's buffer, then into the chunk's parts.

    Rows arrive in order (`reserve`, `write`), as in `object_sink.PartSpan`; leaving the span
    without an exception pads the chunk, completes its object and records its digest.
    """

    def __init__(self, chunk: ChunkObject | LocalChunk, nbytes: int, buffer: mmap.mmap | None):
        self.chunk, self.nbytes = chunk, nbytes
        self.buf = buffer if buffer is not None else staging_buffer(min(max(nbytes, 1), STAGE_BYTES))
        self.view = memoryview(self.buf)
        self.sent = self.fill = 0
        self.hash = hashlib.sha256()

    @property
    def written(self) -> int:
        return self.sent + self.fill

    def _left(self) -> int:
        return self.nbytes - self.written

    def _label(self) -> str:
        return self.chunk.key

    def _flush(self) -> None:
        if self.fill:
            piece = self.view[: self.fill]
            self.hash.update(piece)
            self.chunk.add(piece)
            self.sent += self.fill
            self.fill = 0

    def __enter__(self) -> ChunkSpan:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._flush()
                if self.sent != self.nbytes:
                    raise AssertionError(f"{self.chunk.key}: a task wrote {self.sent} of its chunk's {self.nbytes} bytes")
                self.chunk.pad()
                self.chunk.close()
                self.chunk.sink.chunk_written(self.chunk.key, self.hash.digest())
        finally:
            self.chunk.release()
            self.view.release()


# --- a local zarr child -------------------------------------------------------------------------

JOURNAL = ".darwin-journal"  # in the partial store: one line per finished chunk, `<key> <sha256 hex>`


class LocalChunk:
    """One chunk file of a local zarr child, its bytes arriving in order; padded by extending it."""

    def __init__(self, sink: LocalZarrSink, key: str, size: int):
        self.sink, self.key, self.size = sink, key, size
        self.path = sink.tmp / key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.received = 0

    def add(self, data: memoryview) -> None:
        assert self.fd is not None
        try:
            while len(data):
                n = os.write(self.fd, data)
                data, self.received = data[n:], self.received + n
        except OSError as e:  # a full disk, a quota: name the file
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from None

    def pad(self) -> None:
        """Zeros (the fill value) up to the full chunk shape: the file is extended, sparse."""
        assert self.fd is not None
        os.ftruncate(self.fd, self.size)
        self.received = self.size

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalZarrSink(ZarrChild):
    """A zarr child in a local directory, chunk files written in place by the tasks; implements
    `sink.ChildSink`. It is built in `.<name>.partial` and renamed into place when complete, as
    `child_writer.ChildWriter` builds a safetensors child: no safetensors copy is staged first
    (which cost the disk twice the child and wrote it twice). A finished chunk's digest is a line
    of the journal there, so a resumed run (or `finish`, after tasks on other processes of a
    cluster sharing the filesystem) knows it without reading the chunk back. The caller holds the
    output's lock (`outputs.lock`) and has checked that no output path is an input.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Plan, rows: dict[str, int], *, overwrite: bool = False,
                 identities: dict[str, str] | None = None):
        self.paths = outputs.output_paths(out_dir)
        self.final, self.tmp = self.paths.final, self.paths.tmp
        self.where_name = str(self.final)
        if (self.final.exists() or self.final.is_symlink()) and not overwrite:
            raise OutputError(f"output {self.final} already exists (use --overwrite to replace it)")
        self._plan_arrays(plan, rows, identities)
        self._lock = threading.Lock()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._prepare(plan)

    def __getstate__(self) -> dict:
        # Tasks on dask.distributed workers carry the sink: paths and geometry only, no lock.
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "files")} | {"done": set()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self.files = threading.Lock(), {}

    def _prepare(self, plan: Plan) -> None:
        stamp = self.tmp / outputs.STAMP
        old = None
        if self.tmp.is_dir() and not self.tmp.is_symlink() and stamp.is_file():
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(stamp.read_text())
        if old == self.fingerprint:
            self.chunks_in = set(self._journal())
        else:
            if old is not None:
                self.restarted = (f"discarded the partial child in {self.tmp}: {_changed(old, self.fingerprint, plan)}"
                                  "; the merge restarted from scratch")
            if is_store(self.tmp):  # a partial store of an earlier version, made by `store.ingest`
                outputs.remove(self.tmp)
            else:
                outputs.clear_temporary(self.tmp)  # refuses a directory that is not ours
        need = sum(a.chunk_bytes for k, (a, _) in self.where.items() if k not in self.chunks_in)
        outputs.check_free_space(self.final.parent, need + sum(len(d) for d in self.files.values()),
                                 f"the child ({self.final.name})")
        if old != self.fingerprint:
            self.tmp.mkdir(parents=True)
            stamp.write_text(json.dumps(self.fingerprint))

    def _journal(self) -> dict[str, bytes]:
        """Chunks the journal records as finished, with their digests, whose files are whole."""
        found: dict[str, bytes] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (self.tmp / JOURNAL).read_text().splitlines():
                key, _, digest = line.rpartition(" ")
                entry = self.where.get(key)
                if entry is not None and len(digest) == 64:
                    with contextlib.suppress(OSError, ValueError):
                        if os.stat(self.tmp / key).st_size == entry[0].chunk_bytes:
                            found[key] = bytes.fromhex(digest)
        return found

    def _chunk(self, key: str, size: int) -> LocalChunk:
        return LocalChunk(self, key, size)

    def hold(self, nbytes: int) -> None:
        """Nothing waits: a chunk's bytes go from the staging buffer into its file."""

    def chunk_written(self, key: str, digest: bytes) -> None:
        # One O_APPEND write per line: atomic, so threads and workers need no lock.
        fd = os.open(self.tmp / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{key} {digest.hex()}\n".encode())
        finally:
            os.close(fd)

    def finish(self, index_metadata: dict | None = None) -> Path:
        """Check every chunk is in, write the metadata (the root last), rename into place."""
        digests = self._journal()
        missing = [k for k in self.where if k not in digests]
        if missing:
            raise OutputError(f"output {self.final}: {len(missing)} chunk(s) never written, e.g. {missing[0]}")
        for key in self.where:  # on the disk before the store can appear under its name
            fd = os.open(self.tmp / key, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        blobs, root = self.documents(digests, str(self.final))
        for key, data in [*blobs.items(), ("zarr.json", root)]:
            path = self.tmp / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (self.tmp / JOURNAL).unlink(missing_ok=True)
        (self.tmp / outputs.STAMP).unlink(missing_ok=True)
        if self.final.exists() or self.final.is_symlink():
            outputs.remove(self.paths.old)
            self.final.rename(self.paths.old)
            self.tmp.rename(self.final)
            outputs.remove(self.paths.old)
        else:
            self.tmp.rename(self.final)
        return self.final
