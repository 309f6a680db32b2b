"""A parent's identity changes whenever its content can have, and only then; its locations cover what it reads."""

from __future__ import annotations

import os

import fsspec
import pytest

from darwin_stream.identity import parent_identity, parent_locations
from darwin_stream.pool import open_parent
from darwin_stream.store import ingest
from tests.helpers import build_toy


def _id(spec) -> str:
    with open_parent(str(spec)) as p:
        return parent_identity(p)


def test_local_identity_is_stable_and_follows_content(tmp_path):
    a = build_toy(tmp_path / "a", 1)
    first = _id(a)
    assert _id(a) == first, "re-opening the same files gives the same identity"
    shard = a / "model.safetensors"
    data = bytearray(shard.read_bytes())
    st = shard.stat()
    data[-1] ^= 1  # one bit of one tensor: same header, same size
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime put back (ctime moved)
    assert _id(a) != first
    second = _id(a)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert _id(a) != second
    assert _id(build_toy(tmp_path / "b", 1)) != first, "another directory is another parent"


def test_store_identity_follows_its_checksums(tmp_path):
    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    ingest(a, tmp_path / "s.zarr", mode="copy")
    first = _id(tmp_path / "s.zarr")
    assert _id(tmp_path / "s.zarr") == first
    ingest(b, tmp_path / "s.zarr", mode="copy")
    assert _id(tmp_path / "s.zarr") != first


def test_url_identity_follows_the_filesystem_s_report(tmp_path):
    a = build_toy(tmp_path / "a", 1)
    fs = fsspec.filesystem("memory")
    for f in a.iterdir():
        fs.pipe(f"/ident/a/{f.name}", f.read_bytes())
    first = _id("memory://ident/a")
    assert _id("memory://ident/a") == first
    from safetensors.torch import load_file, save

    # The same tensors with a longer header: a valid shard of another size (trailing bytes are refused).
    fs.pipe("/ident/a/model.safetensors", save(load_file(a / "model.safetensors"), metadata={"v": "2" * 64}))
    assert _id("memory://ident/a") != first, "a shard of another size is another parent"
    fs.rm("/ident", recursive=True)


def test_a_reference_store_s_locations_include_its_shards(tmp_path):
    a = build_toy(tmp_path / "a", 1)
    ingest(a, tmp_path / "s.json", mode="reference")
    with open_parent(str(tmp_path / "s.json")) as p:
        where = parent_locations(p)
    assert str(tmp_path / "s.json") in where and str(a / "model.safetensors") in where


@pytest.mark.parametrize("checksum", [True, False])
def test_a_reference_store_s_identity_follows_its_shards(tmp_path, checksum):
    a = build_toy(tmp_path / "a", 1)
    ingest(a, tmp_path / "s.json", mode="reference", checksum=checksum)
    first = _id(tmp_path / "s.json")
    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert _id(tmp_path / "s.json") != first
