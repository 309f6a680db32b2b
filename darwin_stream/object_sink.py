"""A child written straight into an S3 bucket: each shard one multipart upload, the marker last.

The shard layout is planned before any task runs (`child_writer.layout`), so every byte of the child has
a known place. Each shard's bytes are cut into fixed parts of `part_bytes` (the last one shorter),
and part `i` is uploaded as part number `i + 1` of the shard's multipart upload as soon as all its
bytes have been produced. Tasks fill their byte ranges in any order, so a part that straddles two
tasks waits in memory for the second one. Those buffers are bounded (`waiting_bytes`, which
`api.merge` sets aside from the memory budget): one part of its own per worker, and shared parts up
to `workers + 6`. dask runs ready tasks in key order, which follows the layout only roughly (a
statistic's passes make a tensor's blends ready late, and under a small budget a tensor is many
chunks: the test parents under 1 MiB spill 0.4 of 1.3 MiB, under 2 MiB nothing). So once the
shared reserve is full, a part's next bytes are put as a fragment object beside the child instead,
and read back when the part is complete: the budget holds, at the cost of those bytes going up
twice and down once (`stats.spilled_bytes`, and a note in the report).

On a dask.distributed cluster (`distributed=True`) the sink goes to the workers as names, upload
ids and slots (`__getstate__`), and no part waits for a task in another process: a worker uploads
the parts inside one task's rows, every piece of a shared part is a fragment object, and `finish`,
in the client process, lists the uploaded parts and uploads the others from their fragments.

Nothing is visible under the child's name until the end (`finish`): uploads are completed only
when every part of every shard is in, then the inherited files and the index are written, and the
completion marker (`child_marker.MARKER`) last. While the child is being made, a small JSON journal
beside it (`child_marker.journal_path`) holds the plan's fingerprint, the part size and the upload
ids; readers refuse a location with a journal and no marker.

Resume: a re-run with the same fingerprint and part size lists each upload's parts (ListParts) and
uploads only the missing ones; `is_done` tells the engine which row chunks lie wholly in uploaded
parts, and bytes that fall in an uploaded part are dropped. A changed plan, layout or parent aborts
the old uploads and starts again. A failure (credentials, a missing bucket, a dropped connection)
is one `OutputError` naming the URL; the open uploads are kept for the re-run to resume (they are
invisible, but a bucket is billed for them until a re-run completes or aborts them).
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Iterable
from typing import Any

from darwin_stream import child_marker, pool

# UploadStats and take_stats are re-exported: api.merge folds a cluster's counts in through them.
from darwin_stream.bucket import JOURNAL_LIMIT, BucketPrefix, UploadStats, _stats_for, _why, take_stats  # noqa: F401
from darwin_stream.child_writer import (
    INDEX_NAME,
    STAGE_BYTES,
    Layout,
    StagedSpan,
    _changed,
    layout,
    plan_fingerprint,
    staging_buffer,
)
from darwin_stream.errors import OutputError
from darwin_stream.identity import plan_identities
from darwin_stream.plan import Plan

MIN_PART = 5 * 2**20  # S3's smallest part, except a multipart upload's last
MAX_PARTS = 10_000  # S3's largest part number
# 8 MiB, the AWS CLI's and boto3's default chunk: 10,000 of them cover a 78 GiB shard (the default
# shard is 5 GB), and a part waiting for its second task costs little beside any budget.
DEFAULT_PART = 8 * 2**20
# Internal knob, for tests against a local server whose minimum part is lowered (moto's
# S3_UPLOAD_PART_MIN_SIZE): real S3 refuses parts under MIN_PART with EntityTooSmall.
PART_ENV = "DARWIN_STREAM_S3_PART_BYTES"


def part_bytes(lay: Layout) -> int:
    """The part size for this layout: 8 MiB, or more when a shard would need over 10,000 parts."""
    return part_size_for(max((size for _, size in lay.shards.values()), default=0))


def part_size_for(biggest: int) -> int:
    """The part size for objects of at most `biggest` bytes (see `part_bytes`)."""
    knob = os.environ.get(PART_ENV)
    base = int(knob) if knob else DEFAULT_PART
    need = -(-biggest // MAX_PARTS)
    return base if need <= base else -(-need // 2**20) * 2**20  # whole MiB, 10,000 parts at most


def waiting_bytes(part: int, workers: int, *, distributed: bool = False) -> int:
    """Memory set aside for parts that wait for their other bytes.

    A task's own whole parts go out as it writes them; what waits are the parts it shares with the
    tasks before and after it: one boundary per task in flight as they walk the shard, plus a few
    left open by a jump in the order tasks run in. dask starts with the final norm and the
    embedding, whose row chunks it runs in the string order of their keys (98304 before 16384
    before 147456), and whose boundaries with the layers close last. So one own part per worker is
    always allowed, and shared parts up to `workers + 6`; past that their pieces are spilled
    (`ObjectSink.put`). The total is a bound, and `stats.peak_waiting` what a run held. Measured on
    the 0.6B pair with 8 MiB parts (docs/benchmarks.md, "Scaling"): up to 7.1, 8.1 and 11.1 parts
    waited at the peak with 1, 2 and 4 workers (linear; slerp 6, 6 and 10), where the old
    `2 x workers + 4` set aside 6, 8 and 12, and every 1-worker linear merge spilled a part.

    On a dask.distributed cluster (`distributed`), shared parts never wait: a worker process holds
    one own part per thread, and the copy of a piece on its way out as a fragment.
    """
    if distributed:
        return 2 * max(workers, 1) * part
    return (2 * max(workers, 1) + 6) * part


def is_url(out: str | os.PathLike) -> bool:
    """Whether an output is a URL a sink other than the local writer takes."""
    s = os.fspath(out)
    return "://" in s and not s.startswith("file://")


class ObjectSink(BucketPrefix):
    """A child under construction at `s3://bucket/prefix`; implements `sink.ChildSink`."""

    direct = False  # nothing here goes through a page cache

    def __init__(self, url: str, plan: Plan, shard_size: int, *, overwrite: bool = False,
                 identities: dict[str, str] | None = None, storage_options: dict | None = None,
                 part_size: int | None = None, workers: int | None = None, distributed: bool = False):
        super().__init__(url, storage_options)
        self.distributed = distributed  # tasks run in other processes (dask.distributed): see __getstate__
        self.layout = layout(plan, shard_size)
        self.part = part_size or part_bytes(self.layout)
        ids = identities if identities is not None else plan_identities(plan, pool.get_parent)
        self.fingerprint = plan_fingerprint(plan, self.layout, ids)
        self.done: set[tuple[str, int, int]] = set()
        self.restarted: str | None = None
        self.files: dict[str, bytes] = {}
        self.uploads: dict[str, str] = {}  # shard -> upload id
        self.etags: dict[str, dict[int, str]] = {s: {} for s in self.layout.shards}  # shard -> part number -> ETag
        self._buffers: dict[tuple[str, int], bytearray] = {}
        self._filled: dict[tuple[str, int], int] = {}
        self._waiting = 0
        # Waiting buffers: one own part per worker, and shared ones up to the rest of the reserve
        # (waiting_bytes); without `workers`, no limit.
        self._shared_limit = None if workers is None else waiting_bytes(self.part, workers) - workers * self.part
        self._shared = 0
        self._own: dict[tuple[str, int], bool] = {}
        self.fragments = f"{child_marker.partial_prefix(self.key)}/fragments"  # spilled part pieces
        self._fragments: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        self._old: list[str] = []  # keys of a child being replaced, removed once the new one is in
        self._prepare(plan, overwrite)

    def __getstate__(self) -> dict:
        """What a dask.distributed worker gets: names, ids and the slots, no buffers, no client.

        Parts that straddle two tasks are assembled in one process's memory, so only a sink made
        `distributed` (which puts those pieces in the bucket instead) may leave its process. The
        layout goes without its shard headers (the client process wrote them); the parts already
        in go as part numbers, so that a resumed run's workers skip their bytes too.
        """
        if not self.distributed:
            raise OutputError(f"output {self.url}: this sink assembles shared parts in memory; "
                              "make it with distributed=True to run its tasks in other processes")
        from darwin_stream.child_writer import Layout

        shards = {s: (b"", size) for s, (_, size) in self.layout.shards.items()}
        return {"url": self.url, "bucket": self.bucket, "key": self.key, "part": self.part, "run_id": self.run_id,
                "storage_options": self.storage_options, "fragments": self.fragments, "uploads": self.uploads,
                "layout": Layout(shards, self.layout.slots),
                "uploaded": {s: sorted(e) for s, e in self.etags.items()}}

    def __setstate__(self, state: dict) -> None:
        uploaded = state.pop("uploaded")
        self.__dict__.update(state)
        self.distributed, self._fs, self._lock = True, None, threading.Lock()
        self.etags = {s: dict.fromkeys(nums, "") for s, nums in uploaded.items()}
        self.stats = _stats_for(self.run_id)  # shared by every copy of this run's sink in the process
        self.done, self.restarted, self.files = set(), None, {}
        self._waiting = 0

    # --- preparing and resuming -------------------------------------------------------------------

    def _prepare(self, plan: Plan, overwrite: bool) -> None:
        existing = self._keys(self.key + "/")  # the first request: credentials and bucket fail here
        journal = self._read_journal()
        ours = journal is not None and f"{self.key}/{child_marker.MARKER}" not in existing
        if existing and not overwrite and not ours:
            raise OutputError(f"output {self.url} already exists (use --overwrite to replace it)")
        self._old = existing
        resumable = journal is not None and self._resumable(journal)
        # A killed run's spilled pieces: on one process its parts are redone (their other bytes were
        # in its memory); on a cluster they are the parts' bytes, read back by `finish`.
        for key in self._keys(self.fragments + "/") if journal is not None and not (resumable and self.distributed) else ():
            self._call("delete_object", Key=key)
        if resumable:
            self.uploads = dict(journal["uploads"])
            for shard in self.layout.shards:
                if not self._list_parts(shard):
                    self._start_upload(shard)  # its upload is gone (completed or aborted): redo it
            self._write_journal()
        else:
            if journal is not None:
                self._abort(journal.get("uploads"))
                why = (_changed(journal.get("fingerprint"), self.fingerprint, plan)
                       if journal.get("fingerprint") != self.fingerprint else "its part size differs")
                self.restarted = f"discarded the partial child at {self.url}: {why}; the merge restarted from scratch"
            for shard in self.layout.shards:
                self._start_upload(shard)
            self._write_journal()
        self.stats.resumed_parts = sum(len(e) for e in self.etags.values())
        for shard, (head, _) in self.layout.shards.items():
            if self.distributed:  # the header's parts go out, or as fragments, now: no part waits here
                pending: dict = {}
                self.put(shard, 0, memoryview(head), (0, len(head)), pending)
                self.flush_pending(pending)
            else:
                self.put(shard, 0, memoryview(head))

    def _resumable(self, journal: dict) -> bool:
        uploads = journal.get("uploads")
        return (journal.get("fingerprint") == self.fingerprint and journal.get("part_bytes") == self.part
                and isinstance(uploads, dict) and set(uploads) == set(self.layout.shards)
                and all(isinstance(u, str) for u in uploads.values()))

    def _write_journal(self) -> None:
        body = json.dumps({"version": 1, "fingerprint": self.fingerprint, "part_bytes": self.part,
                           "uploads": self.uploads}).encode()
        self._put_object(self.journal_key, body)

    def _start_upload(self, shard: str) -> None:
        r = self._call("create_multipart_upload", Key=f"{self.key}/{shard}")
        self.uploads[shard] = r["UploadId"]
        self.etags[shard] = {}

    def _list_parts(self, shard: str) -> bool:
        """Record the parts of `shard`'s upload that are in, at their planned sizes; False if it is gone."""
        size = self.layout.shards[shard][1]
        marker = 0
        while True:
            r = self._call("list_parts", Key=f"{self.key}/{shard}", UploadId=self.uploads[shard],
                           PartNumberMarker=marker, missing_ok=True)
            if r is None:
                return False
            for p in r.get("Parts", []):
                n = int(p["PartNumber"])
                if n >= 1 and p.get("Size") == min(self.part, size - (n - 1) * self.part):
                    self.etags[shard][n] = p["ETag"]
            if not r.get("IsTruncated"):
                return True
            marker = int(r["NextPartNumberMarker"])

    def _abort(self, uploads: Any) -> None:
        """Abort a stale run's uploads; one already gone (or not ours to name) is no matter."""
        for shard, upload in (uploads or {}).items() if isinstance(uploads, dict) else ():
            if isinstance(shard, str) and isinstance(upload, str) and "/" not in shard:
                self._call("abort_multipart_upload", Key=f"{self.key}/{shard}", UploadId=upload, missing_ok=True)

    # --- the ChildSink protocol -------------------------------------------------------------------

    def _parts(self, shard: str, lo: int, hi: int) -> range:
        return range(lo // self.part, (hi - 1) // self.part + 1) if hi > lo else range(0)

    def is_done(self, name: str, start_row: int, stop_row: int) -> bool:
        """Whether every part holding rows [start_row, stop_row) of `name` is already uploaded."""
        slot = self.layout.slots[name]
        lo = slot.offset + start_row * slot.row_bytes
        hi = min(slot.offset + slot.nbytes, slot.offset + stop_row * slot.row_bytes)
        parts = self._parts(slot.shard, lo, hi)
        done = len(parts) > 0 and all(i + 1 in self.etags[slot.shard] for i in parts)
        if done:
            self.done.add((name, start_row, stop_row))
        return done

    def span(self, name: str, start_row: int, buffer: mmap.mmap | None = None) -> PartSpan:
        slot = self.layout.slots[name]
        return PartSpan(self, slot.shard, slot.offset + start_row * slot.row_bytes, slot.offset + slot.nbytes, buffer)

    def mark_done(self, name: str, start_row: int, stop_row: int) -> None:
        """Nothing to record: the uploaded parts themselves say what is done (ListParts)."""

    def write_file(self, name: str, data: bytes) -> None:
        """An inherited file, held until `finish` (config, tokenizer, card: a few MiB at most)."""
        if ("/" in name or "\\" in name or name.startswith(".") or name in self.layout.shards
                or name == INDEX_NAME):
            raise OutputError(f"output {self.url}: refusing to write an inherited file named {name!r}")
        self.files[name] = bytes(data)

    # --- parts ------------------------------------------------------------------------------------

    def put(self, shard: str, offset: int, data: memoryview, within: tuple[int, int] = (0, 0),
            pending: dict | None = None) -> None:
        """Bytes `data` of `shard` at `offset`, into the parts they fall in; full parts go out.

        `within` is the byte range of the task writing them. A part inside it is the task's own:
        it is filled and sent by this one thread, so it always gets a buffer (one per worker at a
        time). A part shared with other tasks gets one while the shared buffers fit in their
        share of `reserve`; past it, its bytes are put in the bucket as a fragment object instead,
        fetched back when the part is complete.

        A `distributed` sink keeps no part that other tasks share: see `_put_apart`.
        """
        if self.distributed:
            return self._put_apart(shard, offset, data, within, pending if pending is not None else {})
        size = self.layout.shards[shard][1]
        end = offset + len(data)
        for i in self._parts(shard, offset, end):
            if i + 1 in self.etags[shard]:
                continue  # uploaded by the interrupted run: these bytes are already in the bucket
            p0 = i * self.part
            length = min(self.part, size - p0)
            lo, hi = max(offset, p0), min(end, p0 + length)
            piece, key = data[lo - offset : hi - offset], (shard, i)
            own = within[0] <= p0 and p0 + length <= within[1]
            with self._lock:
                buf = self._buffers.get(key)
                if buf is None and (own or self._shared_limit is None or self._shared + length <= self._shared_limit):
                    buf = self._buffers[key] = bytearray(length)
                    self._waiting += length
                    self._shared += 0 if own else length
                    self._own[key] = own
                    self.stats.peak_waiting = max(self.stats.peak_waiting, self._waiting)
            if buf is not None:
                buf[lo - p0 : hi - p0] = piece  # disjoint ranges: no lock needed
            else:
                self._spill(key, lo - p0, piece)
            with self._lock:
                filled = self._filled[key] = self._filled.get(key, 0) + hi - lo
                full = filled == length
                if full:
                    del self._filled[key]
                    buf, fragments = self._buffers.pop(key, None), self._fragments.pop(key, [])
                    own = self._own.pop(key, True)
            if full:
                self._complete_part(shard, i, length, buf, fragments, shared=not own)

    def _spill(self, key: tuple[str, int], lo: int, piece: memoryview) -> None:
        shard, i = key
        fkey = f"{self.fragments}/{shard}/{i + 1}-{lo}"  # named by its place: a re-run puts the same bytes there
        self._put_object(fkey, bytes(piece))
        with self._lock:
            if not self.distributed:
                self._fragments.setdefault(key, []).append((lo, lo + len(piece), fkey))
            self.stats.spilled_bytes += len(piece)

    # --- parts on a cluster -----------------------------------------------------------------------

    def _put_apart(self, shard: str, offset: int, data: memoryview, within: tuple[int, int], pending: dict) -> None:
        """`put` for tasks spread over processes, which share no memory.

        A part wholly inside the task's range (from its first byte to its tensor's end) is filled
        in the span's own `pending` buffer, in row order, and uploaded by this worker when full;
        what the task's rows leave of it at the end (`flush_pending`), and every piece of a part
        that begins before the task or runs past its tensor, is put as a fragment object, which
        `finish` (in the client process) reads back to upload that part. So a worker holds one
        part per thread, and no part is ever torn: each is uploaded whole, by one process.
        """
        size = self.layout.shards[shard][1]
        end = offset + len(data)
        for i in self._parts(shard, offset, end):
            if i + 1 in self.etags[shard]:
                continue  # uploaded by the interrupted run
            p0 = i * self.part
            length = min(self.part, size - p0)
            lo, hi = max(offset, p0), min(end, p0 + length)
            piece = data[lo - offset : hi - offset]
            if not (within[0] <= p0 and p0 + length <= within[1]):
                self._spill((shard, i), lo - p0, piece)
                continue
            entry = pending.get((shard, i))
            if entry is None:
                entry = pending[(shard, i)] = [bytearray(length), 0]
                with self._lock:
                    self._waiting += length
                    self.stats.peak_waiting = max(self.stats.peak_waiting, self._waiting)
            buf = entry[0]
            assert entry[1] == lo - p0, "a task's own part is filled in order"
            buf[lo - p0 : hi - p0] = piece
            entry[1] = hi - p0
            if entry[1] == length:
                del pending[(shard, i)]
                try:
                    self._upload(shard, i, buf)
                finally:
                    with self._lock:
                        self._waiting -= length

    def flush_pending(self, pending: dict) -> None:
        """A span's own parts its rows did not fill (the next task holds the rest): as fragments."""
        for (shard, i), (buf, filled) in list(pending.items()):
            del pending[(shard, i)]
            try:
                if filled:
                    self._spill((shard, i), 0, memoryview(buf)[:filled])
            finally:
                with self._lock:
                    self._waiting -= len(buf)

    def drop_pending(self, pending: dict) -> None:
        """A span that failed: its buffers go, nothing of them is put."""
        with self._lock:
            self._waiting -= sum(len(b) for b, _ in pending.values())
        pending.clear()

    def _parts_from_fragments(self) -> None:
        """In `finish` on a cluster: upload every part the workers left as fragments.

        The parts the workers uploaded are listed (ListParts); each missing part is rebuilt from
        its fragments, one part in memory at a time, and uploaded. Fragments of a killed run count:
        they are named by their place, and a re-run's for the same place hold the same bytes.
        """
        for shard in self.layout.shards:
            self.etags[shard] = {}
            self._list_parts(shard)
        keys = self._keys(self.fragments + "/")
        found: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for fkey in keys:
            shard, _, name = fkey[len(self.fragments) + 1 :].rpartition("/")
            n, _, lo = name.partition("-")
            if shard in self.layout.shards and n.isdigit() and lo.isdigit():
                found.setdefault((shard, int(n)), []).append((int(lo), fkey))
        for (shard, n), pieces in sorted(found.items()):
            size = self.layout.shards[shard][1]
            length = min(self.part, size - (n - 1) * self.part)
            if n in self.etags[shard] or length <= 0:
                continue
            buf, covered = bytearray(length), 0
            for lo, fkey in sorted(pieces):
                got = self._read_fragment(fkey, length - lo)
                buf[lo : lo + len(got)] = got
                covered = max(covered, lo + len(got)) if lo <= covered else covered
            if covered == length:
                self._upload(shard, n - 1, buf)
        self._delete_keys(keys)

    def _read_fragment(self, fkey: str, most: int) -> bytes:
        with self._lock:
            self.stats.requests += 1
        try:
            got = self.fs.cat_file(f"{self.bucket}/{fkey}", start=0, end=most + 1)
        except Exception as e:  # as in _call
            raise OutputError(f"output {self.url}: cannot write (reading back a part's fragment: {_why(e)})") from None
        if len(got) > most:
            raise OutputError(f"output {self.url}: fragment {fkey} runs past its part")
        return got

    def absorb(self, per_worker: Iterable[dict[str, int]]) -> None:
        """Add the workers' counts (`take_stats`) to this run's."""
        for counts in per_worker:
            self.stats.add(counts)

    def _complete_part(self, shard: str, i: int, length: int, buf: bytearray | None, fragments: list, *,
                       shared: bool) -> None:
        """Upload a part whose every byte is in: its buffer, with any spilled fragments put back."""
        owned = buf is not None
        try:
            if buf is None:
                buf = bytearray(length)  # every byte of it was spilled
            for lo, hi, fkey in fragments:
                with self._lock:
                    self.stats.requests += 1
                try:
                    got = self.fs.cat_file(f"{self.bucket}/{fkey}")
                except Exception as e:  # as in _call
                    raise OutputError(f"output {self.url}: cannot write (reading back a part's fragment: {_why(e)})") from None
                if len(got) != hi - lo:
                    raise OutputError(f"output {self.url}: fragment {fkey} changed under this merge")
                buf[lo:hi] = got
            self._upload(shard, i, buf)
            for _, _, fkey in fragments:
                self._call("delete_object", Key=fkey)
        finally:
            if owned:
                with self._lock:
                    self._waiting -= length
                    self._shared -= length if shared else 0

    def _upload(self, shard: str, i: int, buf: bytearray) -> None:
        r = self._call("upload_part", Key=f"{self.key}/{shard}", UploadId=self.uploads[shard],
                       PartNumber=i + 1, Body=bytes(buf))
        with self._lock:
            self.etags[shard][i + 1] = r["ETag"]
            self.stats.parts += 1
            self.stats.bytes_uploaded += len(buf)

    # --- completion -------------------------------------------------------------------------------

    def finish(self, index_metadata: dict | None = None) -> str:
        """Complete every upload, write the files and the index, then the marker; drop the journal."""
        if self.distributed:
            self._parts_from_fragments()
        for shard, (_, size) in self.layout.shards.items():
            missing = [i for i in range(-(-size // self.part)) if i + 1 not in self.etags[shard]]
            if missing:
                raise AssertionError(f"{shard}: parts {missing[:5]} were never produced")
        marker = f"{self.key}/{child_marker.MARKER}"
        if marker in self._old:
            self._call("delete_object", Key=marker)  # the child being replaced stops being readable
        for shard in self.layout.shards:
            parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self.etags[shard].items())]
            self._call("complete_multipart_upload", Key=f"{self.key}/{shard}", UploadId=self.uploads[shard],
                       MultipartUpload={"Parts": parts})
        files = dict(self.files)
        if len(self.layout.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.layout.slots.values()), **(index_metadata or {})},
                     "weight_map": {s.name: s.shard for s in self.layout.slots.values()}}
            files[INDEX_NAME] = json.dumps(index, indent=2).encode()
        for name, data in files.items():
            self._put_object(f"{self.key}/{name}", data)
        keep = {f"{self.key}/{n}" for n in [*self.layout.shards, *files]}
        for key in self._old:
            if key not in keep and key != marker:
                self._call("delete_object", Key=key)  # a file of the replaced child this one lacks
        sizes = {s: size for s, (_, size) in self.layout.shards.items()}
        self._put_object(marker, json.dumps({"darwin_stream": 1, "shards": sizes}).encode())
        self._call("delete_object", Key=self.journal_key)
        return self.url


class PartSpan(StagedSpan):
    """One task's rows of one tensor, staged in the thread's buffer and handed to the sink's parts.

    Rows arrive in order (`reserve`, `write`), like `export.Span`; when the staging buffer is full
    (and at the end) its bytes are copied into the parts they belong to.
    """

    def __init__(self, sink: ObjectSink, shard: str, offset: int, end: int, buffer: mmap.mmap | None):
        self.sink, self.shard, self.start, self.end = sink, shard, offset, end
        self.buf = buffer if buffer is not None else staging_buffer(min(end - offset, STAGE_BYTES))
        self.view = memoryview(self.buf)
        self.base, self.fill = offset, 0
        # A distributed sink's own parts, filling (ObjectSink._put_apart); None for one process.
        self.pending: dict | None = {} if getattr(sink, "distributed", False) else None

    @property
    def written(self) -> int:
        return self.base + self.fill - self.start

    def _left(self) -> int:
        return self.end - self.base - self.fill

    def _label(self) -> str:
        return self.shard

    def _flush(self) -> None:
        if self.fill:
            if self.pending is None:
                self.sink.put(self.shard, self.base, self.view[: self.fill], (self.start, self.end))
            else:
                self.sink.put(self.shard, self.base, self.view[: self.fill], (self.start, self.end), self.pending)
            self.base += self.fill
            self.fill = 0

    def __enter__(self) -> PartSpan:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._flush()
                if self.pending is not None:
                    self.sink.flush_pending(self.pending)
        finally:
            if self.pending is not None:
                self.sink.drop_pending(self.pending)
            self.view.release()
