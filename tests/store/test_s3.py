"""S3 against a real local server (moto's ThreadedMotoServer on 127.0.0.1): copy ingest and URL parents."""

from __future__ import annotations

import pytest
import torch

from darwin_stream.pool import open_parent
from darwin_stream.sources import SafetensorsParent
from darwin_stream.store import export_store, ingest, is_store
from darwin_stream.store.parent import StoreParent

pytestmark = pytest.mark.s3


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def s3(s3_server, tiny_parents):
    """s3fs options for the session's moto server, with the father checkpoint in the bucket."""
    import s3fs

    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    father, _ = tiny_parents
    for f in father.iterdir():
        fs.pipe_file(f"darwin/parents/father/{f.name}", f.read_bytes())
    return opts


def test_parent_from_s3_url(s3, tiny_parents):
    father, _ = tiny_parents
    p = open_parent("s3://darwin/parents/father", storage_options=s3)
    local = open_parent(father)
    assert isinstance(p, SafetensorsParent) and set(p.tensors) == set(local.tensors)
    for name in local.tensors:
        assert raw(p.read(name)) == raw(local.read(name))
    assert p.read_aux()["config.json"] == (father / "config.json").read_bytes()


@pytest.mark.slow  # ~13 s: moto answers each of the few hundred S3 requests in tens of ms
def test_copy_ingest_into_s3_and_back(s3, tiny_parents, tmp_path):
    father, _ = tiny_parents
    url = "s3://darwin/stores/father"
    report = ingest(father, url, mode="copy", chunk_bytes=32768, compressor="zstd", storage_options=s3)
    assert report["bytes_written"] == report["bytes"]
    assert is_store(url, storage_options=s3)
    again = ingest(father, url, mode="copy", chunk_bytes=32768, compressor="zstd", storage_options=s3)
    assert again["bytes_written"] == 0
    p = open_parent(url, storage_options=s3)
    assert isinstance(p, StoreParent)
    local = open_parent(father)
    for name in local.tensors:
        assert raw(p.read(name)) == raw(local.read(name))
    export_store(url, tmp_path / "out", storage_options=s3)
    out = open_parent(tmp_path / "out")
    for name in local.tensors:
        assert raw(out.read(name)) == raw(local.read(name))


def test_s3_parent_ingests_by_copy_by_default(s3, tmp_path):
    r = ingest("s3://darwin/parents/father", tmp_path / "s.zarr", storage_options=s3)
    assert r["mode"] == "copy"
    ref = ingest("s3://darwin/parents/father", tmp_path / "s.json", mode="reference", storage_options=s3)
    assert ref["mode"] == "reference"
    a, b = open_parent(tmp_path / "s.zarr"), open_parent(tmp_path / "s.json", storage_options=s3)
    assert raw(a.read("lm_head.weight")) == raw(b.read("lm_head.weight"))


def test_merge_with_a_parent_on_s3(s3, tiny_parents, tmp_path, monkeypatch):
    """A manifest naming an s3:// parent merges to the same child as the local copy. The endpoint and
    credentials come from fsspec's own configuration (FSSPEC_S3_* variables or its config files), so
    that no secret is ever written into a manifest or a child's model card."""
    import fsspec.config

    from darwin_stream import merge
    from tests.helpers import read_all

    father, mother = tiny_parents
    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": s3["key"], "secret": s3["secret"],
                                                   "endpoint_url": s3["client_kwargs"]["endpoint_url"]})
    text = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.3\ndtype: bfloat16\n"
    remote, local = tmp_path / "remote.yaml", tmp_path / "local.yaml"
    remote.write_text(text.format(a="s3://darwin/parents/father", b=mother))
    local.write_text(text.format(a=father, b=mother))
    a = merge(remote, tmp_path / "from-s3", memory_budget=2**20)
    b = merge(local, tmp_path / "from-disk", memory_budget=2**20)
    assert a.bytes_read == b.bytes_read > 0
    got, expected = read_all(a.out), read_all(b.out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert raw(got[name]) == raw(expected[name]), name


def test_an_s3_parent_without_credentials_is_a_one_line_error(s3, tiny_parents, tmp_path, monkeypatch, capsys):
    from darwin_stream.cli import main

    _, mother = tiny_parents
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    m = tmp_path / "m.yaml"
    m.write_text(f"merge_method: linear\nmodels:\n  - model: s3://darwin/parents/father\n    parameters: {{weight: 1}}\n"
                 f"  - model: {mother}\n    parameters: {{weight: 1}}\ndtype: bfloat16\n")
    assert main(["merge", str(m), str(tmp_path / "child")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "s3://darwin/parents/father" in err and "cannot open URL" in err, err
    assert not (tmp_path / "child").exists()
