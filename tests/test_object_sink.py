"""A child written straight into a bucket (object_sink.ObjectSink), against a real moto S3 server.

Parts are `s3_server.PART` (64 KiB) through the sink's internal knob, and moto's minimum part size
is lowered to the same, so a short part that is not a shard's last is still refused by the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from darwin_stream import merge, object_sink
from darwin_stream.cli import main
from darwin_stream.errors import DarwinError, OutputError
from tests import s3_server as moto_s3
from tests.helpers import local_merge
from tests.s3_server import PART, Proxy, S3Server

pytestmark = pytest.mark.s3

MANIFEST = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.3\ndtype: bfloat16\n"


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setenv(object_sink.PART_ENV, str(PART))


@pytest.fixture(scope="module")
def local_child(tiny_parents, tmp_path_factory):
    """The same merge written to a local directory: what every bucket child must equal."""
    return local_merge(tmp_path_factory.mktemp("local"), MANIFEST, tiny_parents, memory_budget=2**20,
                       shard_size=2**20)


def raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def files_of(server: S3Server, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: server.get(k) for k in server.keys(prefix + "/")}


def assert_same_child(server: S3Server, prefix: str, local: Path) -> None:
    got = files_of(server, prefix)
    assert got.pop(".darwin-complete")  # the marker, the only file a local child lacks
    want = {f.name: f.read_bytes() for f in local.iterdir()}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name


def total_parts(report) -> int:
    return report.uploads["parts"] + report.uploads["resumed_parts"]


def test_a_merge_into_a_bucket_equals_the_local_merge(s3_server, local_child):
    manifest, local = local_child
    report = merge(manifest, "s3://darwin/plain", memory_budget=2**21, shard_size=2**20,
                   storage_options=s3_server.opts)
    assert report.out == "s3://darwin/plain"
    assert_same_child(s3_server, "plain", local)
    shards = [f for f in local.iterdir() if f.suffix == ".safetensors"]
    assert len(shards) > 1  # a multi-shard child: an index, several uploads
    assert report.uploads["parts"] == sum(-(-f.stat().st_size // PART) for f in shards)
    child_bytes = sum(f.stat().st_size for f in local.iterdir())
    marker = len(s3_server.get("plain/.darwin-complete"))
    journal = report.uploads["bytes_uploaded"] - child_bytes - marker
    assert report.uploads["spilled_bytes"] == 0  # the reserve held every waiting part
    assert 0 < journal < 4096  # every byte of the child went up once, plus the small journal
    assert report.uploads["peak_waiting"] <= object_sink.waiting_bytes(PART, os.cpu_count() or 1)
    assert not s3_server.uploads("plain") and not s3_server.keys(".plain.partial")


def test_parents_and_child_in_the_bucket(s3_server, tiny_parents, local_child, monkeypatch, tmp_path):
    """Parents read from the bucket, the child written into it, credentials from fsspec's config."""
    import fsspec.config
    import s3fs

    father, mother = tiny_parents
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.opts)
    for name, d in (("father", father), ("mother", mother)):
        for f in d.iterdir():
            fs.pipe_file(f"darwin/both/{name}/{f.name}", f.read_bytes())
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.opts)
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST.format(a="s3://darwin/both/father", b="s3://darwin/both/mother"))
    merge(m, "s3://darwin/both/child", memory_budget=2**20, shard_size=2**20)
    # The card names the parents by their specs, so compare it apart from the weights and configs.
    _, local = local_child
    got = files_of(s3_server, "both/child")
    for f in local.iterdir():
        if f.name != "README.md":
            assert got[f.name] == f.read_bytes(), f.name
    assert "s3://darwin/both/father" in got["README.md"].decode()


def test_an_existing_child_is_refused_then_replaced(s3_server, local_child):
    manifest, local = local_child
    merge(manifest, "s3://darwin/again", memory_budget=2**20, shard_size=2**20, storage_options=s3_server.opts)
    with pytest.raises(OutputError, match="already exists"):
        merge(manifest, "s3://darwin/again", memory_budget=2**20, storage_options=s3_server.opts)
    s3_server.client.put_object(Bucket="darwin", Key="again/stale.txt", Body=b"old")
    merge(manifest, "s3://darwin/again", memory_budget=2**20, shard_size=2**20, overwrite=True,
          storage_options=s3_server.opts)
    assert_same_child(s3_server, "again", local)  # the old child's extra file is gone


KILLER = textwrap.dedent("""
    import os, signal, sys
    from darwin_stream import object_sink
    from darwin_stream.cli import main

    after = int(os.environ["KILL_AFTER_PARTS"])
    upload = object_sink.ObjectSink._upload

    def dying(self, shard, i, buf):
        if self.stats.parts >= after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a killed merge
        return upload(self, shard, i, buf)

    object_sink.ObjectSink._upload = dying
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_merge_resumes_uploading_only_the_missing_parts(s3_server, local_child, tiny_parents, capsys):
    manifest, local = local_child
    args = ["merge", str(manifest), "s3://darwin/killed", "--memory-budget", "1MiB", "--shard-size", "1MiB",
            "--storage-options", json.dumps(s3_server.opts), "--quiet"]
    env = {**os.environ, "KILL_AFTER_PARTS": "5", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert not s3_server.keys("killed/")  # nothing visible under the child's name
    assert len(s3_server.uploads("killed/")) > 1 and s3_server.keys(".killed.partial/")

    # Until the merge is finished, the child is refused as a parent and by `score`, in one line.
    from darwin_stream.pool import open_parent
    from darwin_stream.score.backend import resolve_model

    with pytest.raises(DarwinError, match="incomplete darwin-stream child"):
        open_parent("s3://darwin/killed", storage_options=s3_server.opts)
    import fsspec.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fsspec.config.conf, "s3", s3_server.opts)
        with pytest.raises(DarwinError, match=r"completion marker \.darwin-complete is missing"):
            resolve_model("s3://darwin/killed")
        m2 = manifest.parent / "from-killed.yaml"
        m2.write_text(MANIFEST.format(a=tiny_parents[0], b="s3://darwin/killed"))
        assert main(["merge", str(m2), str(manifest.parent / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "s3://darwin/killed" in err and "incomplete" in err, err

    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    up = report["uploads"]
    assert up["resumed_parts"] >= 5 and up["parts"] > 0  # the killed run's parts are kept ...
    want_parts = sum(-(-f.stat().st_size // PART) for f in local.iterdir() if f.suffix == ".safetensors")
    assert up["parts"] + up["resumed_parts"] == want_parts  # ... and only the others uploaded again
    assert report["resumed_chunks"] > 0
    assert_same_child(s3_server, "killed", local)
    assert not s3_server.uploads("killed/") and not s3_server.keys(".killed.partial/")


def test_a_changed_plan_aborts_the_old_uploads(s3_server, local_child, tiny_parents, tmp_path, monkeypatch):
    manifest, local = local_child
    calls = {"n": 0}
    upload = object_sink.ObjectSink._upload

    def failing(self, shard, i, buf):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OutputError("injected: connection lost")
        return upload(self, shard, i, buf)

    monkeypatch.setattr(object_sink.ObjectSink, "_upload", failing)
    other = tmp_path / "other.yaml"
    father, mother = tiny_parents
    other.write_text(MANIFEST.format(a=father, b=mother).replace("t: 0.3", "t: 0.7"))
    with pytest.raises(OutputError, match="injected"):
        merge(other, "s3://darwin/changed", memory_budget=2**20, shard_size=2**20, storage_options=s3_server.opts)
    stale = {u["UploadId"] for u in s3_server.uploads("changed/")}
    assert stale
    monkeypatch.setattr(object_sink.ObjectSink, "_upload", upload)
    report = merge(manifest, "s3://darwin/changed", memory_budget=2**20, shard_size=2**20,
                   storage_options=s3_server.opts)
    assert report.uploads["resumed_parts"] == 0
    assert any("restarted from scratch" in n and "different plan" in n for n in report.notes), report.notes
    assert not stale & {u["UploadId"] for u in s3_server.uploads("changed/")}  # aborted, not left behind
    assert_same_child(s3_server, "changed", local)


def one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_wrong_credentials_are_one_line_and_write_nothing(s3_server, local_child, capsys, monkeypatch):
    import moto.settings

    manifest, _ = local_child
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on
    opts = moto_s3.options(s3_server.endpoint, key="wrong", secret="wrong")
    err = one_line_error(capsys, ["merge", str(manifest), "s3://darwin/creds", "--memory-budget", "1MiB",
                                  "--storage-options", json.dumps(opts), "--quiet"])
    assert "s3://darwin/creds" in err and "cannot write" in err, err
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert not s3_server.keys("creds/") and not s3_server.keys(".creds.partial/") and not s3_server.uploads("creds")


def test_a_missing_bucket_is_one_line(s3_server, local_child, capsys):
    manifest, _ = local_child
    err = one_line_error(capsys, ["merge", str(manifest), "s3://no-such-bucket/child", "--memory-budget", "1MiB",
                                  "--storage-options", json.dumps(s3_server.opts), "--quiet"])
    assert "s3://no-such-bucket/child" in err and "no-such-bucket" in err and "exists" in err, err


def test_a_connection_dropped_mid_upload_is_one_line_and_shows_nothing(s3_server, local_child, capsys, monkeypatch):
    import s3fs

    manifest, local = local_child
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    proxy = Proxy(port)
    upload = object_sink.ObjectSink._upload

    def dropping(self, shard, i, buf):
        if self.stats.parts >= 4:
            proxy.drop()  # every connection closed, the port refused from now on
        return upload(self, shard, i, buf)

    monkeypatch.setattr(object_sink.ObjectSink, "_upload", dropping)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    err = one_line_error(capsys, ["merge", str(manifest), "s3://darwin/dropped", "--memory-budget", "1MiB",
                                  "--shard-size", "1MiB", "--storage-options",
                                  json.dumps(s3_server.opts | {"endpoint_url": proxy.endpoint}), "--quiet"])
    # Whichever request meets the closed port says so (a part, or a spilled fragment under 1 MiB).
    assert "s3://darwin/dropped" in err and "cannot write" in err and "EndpointConnectionError" in err, err
    assert not s3_server.keys("dropped/")  # the uploads stay open, invisible, for a re-run to resume
    monkeypatch.setattr(object_sink.ObjectSink, "_upload", upload)
    report = merge(manifest, "s3://darwin/dropped", memory_budget=2**20, shard_size=2**20,
                   storage_options=s3_server.opts)
    assert report.uploads["resumed_parts"] >= 4
    assert_same_child(s3_server, "dropped", local)


def test_storage_options_from_the_manifest_stay_out_of_the_card(s3_server, tiny_parents, tmp_path):
    father, mother = tiny_parents
    m = tmp_path / "m.yaml"
    opts = s3_server.opts | {"secret": "testing"}
    m.write_text(MANIFEST.format(a=father, b=mother) + "darwin:\n  storage_options: " + json.dumps(opts) + "\n")
    merge(m, "s3://darwin/from-manifest", memory_budget=2**20)
    card = s3_server.get("from-manifest/README.md").decode()
    assert "storage_options" in card and "testing" not in card and s3_server.endpoint not in card


def test_a_budget_without_room_for_waiting_parts_is_refused(s3_server, local_child, monkeypatch):
    manifest, _ = local_child
    monkeypatch.setenv(object_sink.PART_ENV, str(8 * 2**20))
    with pytest.raises(OutputError, match=r"parts of 8\.0 MiB waiting to upload"):
        merge(manifest, "s3://darwin/tight", memory_budget=2**20, storage_options=s3_server.opts)
    assert not s3_server.keys("tight/") and not s3_server.keys(".tight.partial/")


def test_zarr_into_a_bucket(s3_server, local_child):
    from darwin_stream.pool import open_parent
    from darwin_stream.store import is_store

    manifest, local = local_child
    report = merge(manifest, "s3://darwin/child.zarr", memory_budget=2**20, out_format="zarr",
                   storage_options=s3_server.opts)
    assert report.format == "zarr" and is_store("s3://darwin/child.zarr", storage_options=s3_server.opts)
    got, want = open_parent("s3://darwin/child.zarr", storage_options=s3_server.opts), open_parent(local)
    assert set(got.tensors) == set(want.tensors)
    for name in want.tensors:
        assert raw(got.read(name)) == raw(want.read(name)), name


def put_parents(server: S3Server, tiny_parents, prefix: str) -> tuple[str, str]:
    """The tiny parents copied into the bucket under `prefix`, as s3:// specs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.opts)
    for name, d in zip(("father", "mother"), tiny_parents, strict=True):
        for f in d.iterdir():
            fs.pipe_file(f"darwin/{prefix}/{name}/{f.name}", f.read_bytes())
    return f"s3://darwin/{prefix}/father", f"s3://darwin/{prefix}/mother"


def test_url_parents_take_the_storage_options_of_the_command_line(s3_server, tiny_parents, local_child, tmp_path,
                                                                   monkeypatch, capsys):
    """No FSSPEC_S3_* and no fsspec config: the endpoint and keys come only from --storage-options,
    and the planner, the identity check and the tasks all open the bucket parents with them."""
    import fsspec.config

    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    for var in [v for v in os.environ if v.startswith("FSSPEC_S3")]:
        monkeypatch.delenv(var)
    father, mother = put_parents(s3_server, tiny_parents, "opts")
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST.format(a=father, b=mother))
    opts = json.dumps(s3_server.opts)
    for out in (str(tmp_path / "child"), "s3://darwin/opts/child"):
        assert main(["merge", str(m), out, "--memory-budget", "1MiB", "--shard-size", "1MiB",
                     "--storage-options", opts, "--quiet"]) == 0, capsys.readouterr().err
    _, local = local_child
    got = files_of(s3_server, "opts/child")
    for f in local.iterdir():
        if f.name != "README.md":  # the card names the parents by their specs
            assert (tmp_path / "child" / f.name).read_bytes() == f.read_bytes() == got[f.name], f.name
    card = got["README.md"].decode()
    assert father in card and s3_server.endpoint not in card and "testing" not in card
    plan_out = capsys.readouterr().out
    assert s3_server.endpoint not in plan_out
