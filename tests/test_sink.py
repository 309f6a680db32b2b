"""The child sink protocol: the engine writes through it alone, and both sinks implement it.

A fake in-memory sink driven by `engine.run` must produce the local writer's shards byte for byte,
and the object sink's part logic (out-of-order byte ranges, the parts they complete, what waits) is
checked against a fake S3 client that records requests; tests/test_object_sink.py runs it on moto.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from darwin_stream import engine
from darwin_stream.child_writer import ChildWriter, layout
from darwin_stream.object_sink import ObjectSink, PartSpan, waiting_bytes
from darwin_stream.plan import Plan, SourceRef, TensorPlan
from darwin_stream.sink import ChildSink


def _plan(dirs: list[str], shapes: dict) -> Plan:
    tensors = [TensorPlan(name=n, shape=s, dtype="BF16", method="linear",
                          models=(SourceRef("a", n), SourceRef("b", n)),
                          model_params=({"weight": 0.6}, {"weight": 0.4})) for n, s in shapes.items()]
    return Plan(parents={"a": dirs[0], "b": dirs[1]}, tensors=tensors, config_from="a", tokenizer_from="a")


class MemorySpan:
    def __init__(self, shard: bytearray, offset: int):
        self.shard, self.start, self.pos = shard, offset, offset
        self.pending: list[tuple[int, memoryview]] = []

    @property
    def written(self) -> int:
        return self.pos - self.start

    def reserve(self, nbytes: int) -> memoryview:
        view = memoryview(bytearray(nbytes))
        self.pending.append((self.pos, view))
        self.pos += nbytes
        return view

    def write(self, data) -> None:
        self.reserve(len(memoryview(data).cast("B")))[:] = memoryview(data).cast("B")

    def __enter__(self) -> MemorySpan:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            for pos, view in self.pending:
                self.shard[pos : pos + len(view)] = view


class MemorySink:
    """The smallest ChildSink: shards in memory."""

    direct = False
    restarted = None

    def __init__(self, plan: Plan, shard_size: int):
        self.layout = layout(plan, shard_size)
        self.shards = {name: bytearray(head) + bytearray(size - len(head))
                       for name, (head, size) in self.layout.shards.items()}
        self.done: set = set()
        self.files: dict[str, bytes] = {}

    def is_done(self, name, start_row, stop_row) -> bool:
        return False

    def span(self, name, start_row, buffer=None) -> MemorySpan:
        slot = self.layout.slots[name]
        return MemorySpan(self.shards[slot.shard], slot.offset + start_row * slot.row_bytes)

    def mark_done(self, name, start_row, stop_row) -> None:
        self.done.add((name, start_row, stop_row))

    def write_file(self, name, data) -> None:
        self.files[name] = data

    def finish(self, index_metadata=None) -> str:
        return "memory"


def test_the_engine_needs_only_the_protocol(pair, tmp_path):
    dirs, shapes = pair
    plan = _plan(dirs, shapes)
    fake = MemorySink(plan, 60_000)
    assert isinstance(fake, ChildSink)
    stats = engine.run(plan, fake, budget=40_000)
    assert stats.chunks > len(shapes)  # the big tensor was split into several tasks
    writer = ChildWriter(tmp_path / "child", plan, shard_size=60_000)
    assert isinstance(writer, ChildSink)
    engine.run(plan, writer, budget=40_000)
    final = Path(writer.finish())
    for name, data in fake.shards.items():
        assert bytes(data) == (final / name).read_bytes(), name


class FakeS3:
    """What ObjectSink asks of s3fs (`call_s3`, `cat_file`), recorded; parts kept per upload."""

    def __init__(self):
        self.calls: list[str] = []
        self.parts: dict[str, dict[int, bytes]] = {}
        self.objects: dict[str, bytes] = {}

    def call_s3(self, method: str, Bucket: str, **kw):
        self.calls.append(method)
        if method == "list_objects_v2":
            return {"Contents": [{"Key": k} for k in self.objects if k.startswith(kw["Prefix"])]}
        if method == "create_multipart_upload":
            upload = f"u{len(self.parts)}"
            self.parts[upload] = {}
            return {"UploadId": upload}
        if method == "upload_part":
            self.parts[kw["UploadId"]][kw["PartNumber"]] = kw["Body"]
            return {"ETag": f"e{kw['PartNumber']}"}
        if method == "put_object":
            self.objects[kw["Key"]] = kw["Body"]
            return {}
        if method == "complete_multipart_upload":
            parts = self.parts.pop(kw["UploadId"])
            self.objects[kw["Key"]] = b"".join(parts[p["PartNumber"]] for p in kw["MultipartUpload"]["Parts"])
            return {}
        if method == "delete_object":
            self.objects.pop(kw["Key"], None)
            return {}
        raise AssertionError(method)

    def cat_file(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        key = path.split("/", 1)[1]
        if key not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[key][start:end]


def test_parts_go_out_as_soon_as_their_bytes_are_in_whatever_the_order(pair, monkeypatch):
    import fsspec.core

    dirs, shapes = pair
    plan = _plan(dirs, shapes)
    s3 = FakeS3()
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (s3, url[len("s3://"):]))
    part = 4096
    sink = ObjectSink("s3://bucket/child", plan, 10**9, part_size=part, identities={"a": "x", "b": "y"})
    (shard, (head, size)), = sink.layout.shards.items()
    want = bytearray(size)
    want[: len(head)] = head
    rng = random.Random(0)
    pieces = []  # the shard's tensor bytes in ranges of random lengths, then shuffled
    pos = len(head)
    while pos < size:
        n = min(size - pos, rng.randrange(1, 3 * part))
        pieces.append((pos, bytes(rng.randrange(256) for _ in range(n))))
        pos += n
    rng.shuffle(pieces)
    covered = bytearray(size)  # 1 where the sink has been given the byte
    covered[: len(head)] = b"\x01" * len(head)
    for pos, data in pieces:
        want[pos : pos + len(data)] = data
        covered[pos : pos + len(data)] = b"\x01" * len(data)
        sink.put(shard, pos, memoryview(data))
        full = {i + 1 for i in range(-(-size // part)) if all(covered[i * part : (i + 1) * part])}
        assert set(sink.etags[shard]) == full  # uploaded exactly when complete, not before, not later
    assert sink.stats.parts == -(-size // part) and not sink._buffers and sink._waiting == 0
    assert 0 < sink.stats.peak_waiting <= size
    assert s3.calls.count("upload_part") == -(-size // part)
    uploads = next(iter(s3.parts.values()))
    assert all(len(uploads[n]) == part for n in range(1, len(uploads)))  # every part full but the last
    assert sink.finish() == "s3://bucket/child"
    assert s3.objects["child/" + shard] == bytes(want)
    assert s3.calls[-2:] == ["put_object", "delete_object"]  # the marker, then the journal's removal
    assert list(s3.objects)[-1] == "child/.darwin-complete"


def test_a_span_stages_rows_and_hands_them_over_in_order():
    got = []

    class Recorder:
        def put(self, shard, offset, data, within=(0, 0)):
            got.append((offset, bytes(data)))

    span = PartSpan(Recorder(), "s", 100, 100 + 10_000, buffer=None)
    with span:
        span.write(bytes(range(256)) * 39)
        span.reserve(16)[:] = b"x" * 16
    assert b"".join(d for _, d in got) == bytes(range(256)) * 39 + b"x" * 16
    assert [o for o, _ in got] == sorted(o for o, _ in got) and got[0][0] == 100
    with pytest.raises(AssertionError, match="past the end"), PartSpan(Recorder(), "s", 0, 8, None) as small:
        small.reserve(9)


def test_shared_parts_past_the_reserve_go_through_the_bucket_and_the_budget_holds(pair, monkeypatch):
    """Tasks that run far out of byte order would keep every shared part waiting; past the reserve
    (one own part per worker, `workers + 2` shared ones) their bytes are spilled as fragment
    objects and read back, so memory stays bounded and the child is the same."""
    import fsspec.core

    dirs, shapes = pair
    plan = _plan(dirs, shapes)
    s3 = FakeS3()
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (s3, url[len("s3://"):]))
    part = 4096
    sink = ObjectSink("s3://bucket/child", plan, 10**9, part_size=part, workers=1, identities={"a": "x"})
    (shard, (head, size)), = sink.layout.shards.items()
    want = bytearray(size)
    want[: len(head)] = head
    rng = random.Random(1)
    tasks = []  # "tasks" of 1000 bytes (none holds a whole part), run in a shuffled order
    for pos in range(len(head), size, 1000):
        tasks.append((pos, bytes(rng.randrange(256) for _ in range(min(1000, size - pos)))))
    rng.shuffle(tasks)
    for pos, data in tasks:
        want[pos : pos + len(data)] = data
        sink.put(shard, pos, memoryview(data), (pos, pos + len(data)))
        assert sink._waiting <= waiting_bytes(part, 1)
    assert sink.stats.spilled_bytes > 0 and sink.stats.peak_waiting <= waiting_bytes(part, 1)
    assert sink.stats.parts == -(-size // part) and not sink._fragments
    assert not [k for k in s3.objects if "/fragments/" in k]  # read back and deleted
    sink.finish()
    assert s3.objects["child/" + shard] == bytes(want)


def _headers_only_parents(root: Path, geometry: str) -> list[Path]:
    """The benchmark's parents of `geometry` as their headers over sparse files: what planning and
    the shard layout read, with no tensor bytes on disk."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench

    geom, out = bench.GEOMETRIES[geometry], []
    for name in "ab":
        d = root / name
        d.mkdir(parents=True)
        weight_map = {}
        for i, entries in enumerate(bench.shard_plan(geom)):
            f = d / f"model-{i + 1:05d}.safetensors"
            head = bench.safetensors_header(entries)
            with open(f, "wb") as fh:
                fh.write(head)
                fh.truncate(len(head) + sum(2 * engine._numel(shape) for _, shape in entries))
            weight_map.update({n: f.name for n, _ in entries})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(geom.config()))
        out.append(d)
    (root / "merge.yaml").write_text(bench.manifest_text("linear", out))
    return out


def test_the_reserve_holds_what_a_one_worker_merge_of_the_0_6b_pair_leaves_waiting(tmp_path, monkeypatch):
    """Measured in the scaling benchmark (docs/benchmarks.md): a 1-worker linear merge of the 0.6B
    pair into a bucket held 7.1 parts of 8 MiB waiting at once, over the 6 that `2 x workers + 4`
    set aside, and spilled one. Replayed here: the merge's blends in the order dask runs them (one
    worker: always the same), each writing zeros for its rows through the sink's spans. With the old
    reserve the replay holds 51.3 MB at the peak and spills 8.35 MB, as the benchmark's run did."""
    import dask.threaded
    import fsspec.core

    from darwin_stream import api
    from darwin_stream.child_writer import staging_buffer
    from darwin_stream.object_sink import DEFAULT_PART

    _headers_only_parents(tmp_path, "0.6b")
    plan = api.load_plan(str(tmp_path / "merge.yaml"))
    s3 = FakeS3()
    upload = s3.call_s3

    def bodiless(method, Bucket, **kw):  # the part's size is all this test needs of it
        if method == "upload_part":
            kw["Body"] = b""
        return upload(method, Bucket, **kw)

    s3.call_s3 = bodiless
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (s3, url[len("s3://"):]))
    sink = ObjectSink("s3://bucket/child", plan, 5 * 10**9, part_size=DEFAULT_PART, workers=1,
                      identities={k: "x" for k in plan.parents})
    zeros, stage = memoryview(bytes(engine.CHUNK_CAP)), staging_buffer(4 * 2**20)

    def blend(task, state, writer, progress):
        with writer.span(task.tp.name, task.start, stage) as span:
            span.write(zeros[: (task.stop - task.start) * writer.layout.slots[task.tp.name].row_bytes])
        return 0

    budget = 2**30 - waiting_bytes(DEFAULT_PART, 1)
    graph, outputs = engine.build_graph(plan, sink, budget=budget, workers=1, device="cpu")
    graph = {k: (blend, *v[1:]) if isinstance(v, tuple) and v and v[0] is engine._write_task else v
             for k, v in graph.items()}
    dask.threaded.get(graph, outputs, num_workers=1)
    assert sink.stats.peak_waiting > (2 * 1 + 4) * DEFAULT_PART  # what the old reserve did not hold
    assert sink.stats.spilled_bytes == 0 and sink.stats.peak_waiting <= waiting_bytes(DEFAULT_PART, 1)
