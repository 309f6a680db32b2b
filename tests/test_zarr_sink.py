"""A zarr child written straight into a bucket (zarr_sink.ZarrSink), against a real moto S3 server.

Parts are 8 KiB through the sink's internal knob, with moto's minimum part lowered to match, so
chunks of more than one part go up as real multipart uploads. A 280 KiB budget (and 2 workers,
whatever the machine) splits the larger tensors of the tiny parents into several tasks: several
chunks, padded last chunks, and `sha256-chunks` checksums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from darwin_stream import child_writer, engine, merge, object_sink, zarr_sink
from darwin_stream.cli import main
from darwin_stream.errors import DarwinError, OutputError
from tests import s3_server as moto_s3
from tests.helpers import local_merge
from tests.s3_server import S3Server

pytestmark = pytest.mark.s3

MANIFEST = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.3\ndtype: bfloat16\n"
BUDGET = 280 * 1024  # with 2 workers: 22 tensors split, 14 of them ending in a short chunk
WORKERS = 2
PART = 8 * 1024


@pytest.fixture(scope="module", autouse=True)
def small_parts(s3_server):
    """8 KiB parts (the server's minimum lowered to match, for this module only): the tiny parents'
    chunks (up to 27 KiB under this budget) go up as multipart uploads of several parts."""
    import moto.s3.models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(object_sink.PART_ENV, str(PART))
        mp.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", PART)
        mp.setattr(engine, "worker_count", lambda client=None: WORKERS)  # the chunks follow the workers
        yield


@pytest.fixture(scope="module")
def local_child(tiny_parents, tmp_path_factory):
    """The same merge as a local safetensors child: what every exported bucket child must equal."""
    return local_merge(tmp_path_factory.mktemp("local"), MANIFEST, tiny_parents, memory_budget=BUDGET)


def exported(url: str, opts: dict, out: Path) -> dict[str, bytes]:
    """The store exported to a local checkpoint (`store.export_store`, which takes the options)."""
    from darwin_stream.store import export_store

    export_store(url, out, storage_options=opts)
    return {f.name: f.read_bytes() for f in out.iterdir()}


def files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in d.iterdir()}


def no_local_staging(monkeypatch) -> None:
    """Any local copy of the child fails the test: a temporary directory, or the local writer."""
    def refuse(*a, **k):
        raise AssertionError("a zarr child into a bucket must not stage anything locally")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    monkeypatch.setattr(child_writer.ChildWriter, "__init__", refuse)


def chunk_objects(server: S3Server, prefix: str) -> dict[str, int]:
    r = server.client.list_objects_v2(Bucket=moto_s3.BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for o in r.get("Contents", []) if "/c/" in o["Key"] or
            o["Key"].endswith("/c")}


@pytest.fixture(scope="module")
def bucket_child(s3_server, local_child):
    """One complete zarr child in the bucket, merged with no local staging at all."""
    manifest, _ = local_child
    with pytest.MonkeyPatch.context() as mp:
        no_local_staging(mp)
        report = merge(manifest, "s3://darwin/z/child.zarr", memory_budget=BUDGET, out_format="zarr",
                       storage_options=s3_server.opts)
    return report


def test_the_bucket_child_exports_to_the_local_child_bit_for_bit(s3_server, local_child, bucket_child, tmp_path):
    _, local = local_child
    report = bucket_child
    assert report.format == "zarr" and report.out == "s3://darwin/z/child.zarr"
    got = exported("s3://darwin/z/child.zarr", s3_server.opts, tmp_path / "out")
    want = files(local)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    # Every tensor byte went up once, plus the padding of short last chunks and the small metadata.
    chunks = chunk_objects(s3_server, "z/child.zarr")
    tensors = sum(s.nbytes for s in child_writer.layout(report_plan(local_child), 2**62).slots.values())
    assert tensors <= sum(chunks.values()) < 1.1 * tensors
    assert report.uploads["bytes_uploaded"] < sum(chunks.values()) + sum(map(len, want.values())) - len(
        want["model.safetensors"]) + 200_000
    assert report.uploads["spilled_bytes"] == 0 and report.uploads["resumed_parts"] == 0
    big = [k for k, size in chunks.items() if size > PART]
    assert big and report.uploads["parts"] > report.chunks  # chunks of several parts: multipart uploads
    assert report.uploads["peak_waiting"] <= object_sink.waiting_bytes(PART, engine.worker_count(), distributed=True)
    assert not s3_server.uploads("z/child.zarr/") and not s3_server.keys("z/.child.zarr.partial/")


def report_plan(local_child):
    from darwin_stream.api import load_plan

    return load_plan(local_child[0])


def test_tensors_of_several_chunks_are_padded_and_checksummed_by_chunk(s3_server, local_child, bucket_child):
    import zarr

    from darwin_stream.pool import open_parent
    from darwin_stream.store import open_store

    _, local = local_child
    group = open_store("s3://darwin/z/child.zarr", storage_options=s3_server.opts)
    index = group.attrs["darwin_stream"]["tensors"]
    split = [n for n, e in index.items() if e["checksum"].startswith("sha256-chunks:")]
    assert split, "the small budget must split some tensor into several chunks"
    got, want = open_parent("s3://darwin/z/child.zarr", storage_options=s3_server.opts), open_parent(local)
    for name in want.tensors:  # a store parent reads (and checks) every tensor as the local child has it
        assert raw(got.read(name)) == raw(want.read(name)), name
    objects = chunk_objects(s3_server, "z/child.zarr")
    edges = 0
    for name in split:
        arr = group[index[name]["path"]]
        assert isinstance(arr, zarr.Array) and arr.chunks[0] < arr.shape[0]
        last = -(-arr.shape[0] // arr.chunks[0]) - 1
        full = arr.chunks[0] * arr.nbytes // arr.shape[0]
        assert objects[f"{index[name]['path']}/c/{last}/0"] == full  # an edge chunk is stored at full size
        edges += arr.shape[0] % arr.chunks[0] != 0
    assert edges, "some split tensor must end in a short, padded chunk"


def raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_corrupt_chunk_fails_its_tensor_checksum(s3_server, local_child, bucket_child, tmp_path, capsys):
    from darwin_stream.store import open_store

    group = open_store("s3://darwin/z/child.zarr", storage_options=s3_server.opts)
    index = group.attrs["darwin_stream"]["tensors"]
    name = next(n for n, e in index.items() if e["checksum"].startswith("sha256-chunks:"))
    # A copy of the child, with one byte of the second chunk of a split tensor flipped.
    keys = s3_server.keys("z/child.zarr/")
    for k in keys:
        body = s3_server.get(k)
        if k == f"z/child.zarr/{index[name]['path']}/c/1/0":
            body = bytes([body[0] ^ 1]) + body[1:]
        s3_server.client.put_object(Bucket=moto_s3.BUCKET, Key="z/corrupt.zarr/" + k[len("z/child.zarr/"):],
                                    Body=body)
    from darwin_stream.errors import StoreError
    from darwin_stream.store import export_store

    with pytest.raises(StoreError, match=rf"tensor {name!r} does not match its checksum"):
        export_store("s3://darwin/z/corrupt.zarr", tmp_path / "out", storage_options=s3_server.opts)


def test_the_bucket_child_is_a_merge_parent(s3_server, local_child, bucket_child, tiny_parents, tmp_path):
    father, _ = tiny_parents
    _, local = local_child
    children = {}
    for label, parent in (("store", "s3://darwin/z/child.zarr"), ("local", str(local))):
        m = tmp_path / f"{label}.yaml"
        m.write_text(MANIFEST.format(a=father, b=parent) + "darwin:\n  storage_options: "
                     + json.dumps(s3_server.opts) + "\n")
        children[label] = Path(merge(m, tmp_path / label, memory_budget=2**20).out)
    assert files(children["store"])["model.safetensors"] == files(children["local"])["model.safetensors"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from darwin_stream import engine, zarr_sink
    from darwin_stream.cli import main

    engine.worker_count = lambda client=None: 2  # as in the test process: the same chunks

    after = int(os.environ["KILL_AFTER_PARTS"])
    send = zarr_sink.ChunkObject._send

    def dying(self):
        if self.sink.stats.parts >= after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a killed merge
        return send(self)

    zarr_sink.ChunkObject._send = dying
    sys.exit(main(sys.argv[1:]))
""")


def one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_killed_merge_resumes_uploading_only_the_missing_chunks(s3_server, local_child, bucket_child, tmp_path,
                                                                   capsys, monkeypatch):
    import fsspec.config

    from darwin_stream.pool import open_parent

    manifest, local = local_child
    url = "s3://darwin/z/killed.zarr"
    args = ["merge", str(manifest), url, "--format", "zarr", "--memory-budget", str(BUDGET),
            "--storage-options", json.dumps(s3_server.opts), "--quiet"]
    env = {**os.environ, "KILL_AFTER_PARTS": "12", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert chunk_objects(s3_server, "z/killed.zarr") and s3_server.keys("z/.killed.zarr.partial/")
    assert "z/killed.zarr/zarr.json" not in s3_server.keys("z/killed.zarr/")  # no store yet

    # Until the merge is finished, the store is refused as a parent and by export, in one line.
    with pytest.raises(DarwinError, match="incomplete darwin-stream child"):
        open_parent(url, storage_options=s3_server.opts)
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.opts)
    err = one_line_error(capsys, ["export", url, str(tmp_path / "never")])
    assert url in err and "incomplete" in err, err
    assert not (tmp_path / "never").exists()
    monkeypatch.delitem(fsspec.config.conf, "s3")

    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    up, whole = report["uploads"], bucket_child.uploads
    assert up["resumed_parts"] >= 12 and up["parts"] > 0  # the killed run's chunks are kept ...
    assert up["parts"] + up["resumed_parts"] == whole["parts"]  # ... and only the others uploaded again
    assert report["resumed_chunks"] > 0 and up["read_back_bytes"] > 0
    assert up["bytes_uploaded"] < whole["bytes_uploaded"]
    got = exported(url, s3_server.opts, tmp_path / "out")
    assert got == files(local)
    assert not s3_server.uploads("z/killed.zarr/") and not s3_server.keys("z/.killed.zarr.partial/")


def test_a_changed_plan_clears_the_partial_child(s3_server, local_child, tiny_parents, tmp_path, monkeypatch):
    manifest, local = local_child
    calls = {"n": 0}
    send = zarr_sink.ChunkObject._send

    def failing(self):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OutputError("injected: connection lost")
        return send(self)

    monkeypatch.setattr(zarr_sink.ChunkObject, "_send", failing)
    father, mother = tiny_parents
    other = tmp_path / "other.yaml"
    other.write_text(MANIFEST.format(a=father, b=mother).replace("t: 0.3", "t: 0.7"))
    url = "s3://darwin/z/changed.zarr"
    with pytest.raises(OutputError, match="injected"):
        merge(other, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    assert chunk_objects(s3_server, "z/changed.zarr")
    monkeypatch.setattr(zarr_sink.ChunkObject, "_send", send)
    report = merge(manifest, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    assert report.uploads["resumed_parts"] == 0 and report.uploads["read_back_bytes"] == 0
    assert any("restarted from scratch" in n and "different plan" in n for n in report.notes), report.notes
    assert exported(url, s3_server.opts, tmp_path / "out") == files(local)
    assert not s3_server.uploads("z/changed.zarr/")


def test_an_existing_store_is_refused_then_replaced(s3_server, local_child, bucket_child, tmp_path):
    manifest, local = local_child
    url = "s3://darwin/z/again.zarr"
    merge(manifest, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    with pytest.raises(OutputError, match="already exists"):
        merge(manifest, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    s3_server.client.put_object(Bucket=moto_s3.BUCKET, Key="z/again.zarr/stale.txt", Body=b"old")
    merge(manifest, url, memory_budget=2 * BUDGET, out_format="zarr", overwrite=True,
          storage_options=s3_server.opts)
    assert "z/again.zarr/stale.txt" not in s3_server.keys("z/again.zarr/")
    assert exported(url, s3_server.opts, tmp_path / "out") == files(local)


def test_wrong_credentials_are_one_line_and_write_nothing(s3_server, local_child, capsys, monkeypatch):
    import moto.settings

    manifest, _ = local_child
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on
    opts = moto_s3.options(s3_server.endpoint, key="wrong", secret="wrong")
    err = one_line_error(capsys, ["merge", str(manifest), "s3://darwin/z/creds.zarr", "--format", "zarr",
                                  "--memory-budget", "1MiB", "--storage-options", json.dumps(opts), "--quiet"])
    assert "s3://darwin/z/creds.zarr" in err and "cannot write" in err, err
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert not s3_server.keys("z/creds.zarr") and not s3_server.keys("z/.creds.zarr.partial/")


def test_a_missing_bucket_is_one_line(s3_server, local_child, capsys):
    manifest, _ = local_child
    err = one_line_error(capsys, ["merge", str(manifest), "s3://no-such-bucket/child.zarr", "--format", "zarr",
                                  "--memory-budget", "1MiB", "--storage-options", json.dumps(s3_server.opts),
                                  "--quiet"])
    assert "s3://no-such-bucket/child.zarr" in err and "no-such-bucket" in err and "exists" in err, err


def test_chunks_are_the_engine_tasks(local_child):
    """Each task writes one whole chunk: the sink's rows per chunk are the graph's rows per task."""
    plan = report_plan(local_child)
    rows = zarr_sink.task_rows(plan, BUDGET, WORKERS)
    for tp in plan.tensors:
        total = tp.shape[0] if tp.shape else 1
        n = -(-total // rows[tp.name])
        assert n * rows[tp.name] - total < n, tp.name  # even tasks: padding under one row per task
    assert any(rows[tp.name] < (tp.shape[0] if tp.shape else 1) for tp in plan.tensors)


@pytest.mark.slow  # a LocalCluster of 2 worker processes: ~10 s to start
def test_a_cluster_writes_the_threaded_zarr_child(s3_server, local_child, bucket_child, tmp_path):
    """Workers upload their own chunks and send their digests back: the same objects, bit for bit."""
    from distributed import Client, LocalCluster

    manifest, local = local_child
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        report = merge(manifest, "s3://darwin/z/cluster.zarr", client=client, memory_budget=BUDGET, out_format="zarr",
                       storage_options=s3_server.opts)
    threaded, clustered = chunk_objects(s3_server, "z/child.zarr"), chunk_objects(s3_server, "z/cluster.zarr")
    assert clustered == threaded
    for key in threaded:
        assert s3_server.get(f"z/cluster.zarr/{key}") == s3_server.get(f"z/child.zarr/{key}"), key
    assert report.uploads["parts"] == bucket_child.uploads["parts"]  # the workers' counts, folded in
    assert report.uploads["read_back_bytes"] == 0  # and their chunks' digests: nothing read back
    assert exported("s3://darwin/z/cluster.zarr", s3_server.opts, tmp_path / "out") == files(local)


def test_an_open_chunk_upload_keeps_its_parts(s3_server, local_child, bucket_child, tmp_path, monkeypatch):
    """A failure inside a chunk of several parts leaves its multipart upload open; the re-run lists
    its parts (ListParts) and uploads only the others."""
    manifest, local = local_child
    send = zarr_sink.ChunkObject._send

    def failing(self):
        if not self.single and self.index == 1:
            raise OutputError("injected: connection lost after a chunk's first part")
        return send(self)

    monkeypatch.setattr(zarr_sink.ChunkObject, "_send", failing)
    url = "s3://darwin/z/open.zarr"
    with pytest.raises(OutputError, match="injected"):
        merge(manifest, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    open_uploads = s3_server.uploads("z/open.zarr/")
    assert open_uploads  # the chunk's upload, with its first part in
    monkeypatch.setattr(zarr_sink.ChunkObject, "_send", send)
    sent: list[tuple[str, int]] = []
    call = zarr_sink.ZarrSink._call

    def recording(self, method, **kw):
        if method == "upload_part":
            sent.append((kw["Key"], kw["PartNumber"]))
        return call(self, method, **kw)

    monkeypatch.setattr(zarr_sink.ZarrSink, "_call", recording)
    report = merge(manifest, url, memory_budget=BUDGET, out_format="zarr", storage_options=s3_server.opts)
    for u in open_uploads:  # the open chunk's first part is not sent again, its second is
        assert (u["Key"], 1) not in sent and (u["Key"], 2) in sent, (u["Key"], sent)
    up = report.uploads
    assert up["resumed_parts"] >= len(open_uploads) and up["parts"] + up["resumed_parts"] == bucket_child.uploads["parts"]
    assert not s3_server.uploads("z/open.zarr/")  # completed (or aborted), none left open
    assert exported(url, s3_server.opts, tmp_path / "out") == files(local)
