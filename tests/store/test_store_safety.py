"""Stores never overwrite what they did not make, never serve stale or foreign bytes, and are verified.

Each test failed on the code before this file: ingest truncated a parent's shard given as STORE,
a second parent of the same geometry inherited the first one's arrays, a reference store used
from another directory read another model, a forged store read /etc/passwd or replaced the
weights with an aux file, and an incomplete or damaged store merged without a word.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import zarr

from darwin_stream import api
from darwin_stream.cli import main
from darwin_stream.errors import DarwinError, SourceError, StoreError
from darwin_stream.pool import open_parent
from darwin_stream.store import export_store, ingest, layout
from darwin_stream.store.api import write_aux_file
from tests.helpers import TOY_MANIFEST, build_toy, read_all


def _sha(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)), n


@pytest.fixture
def toy(tmp_path):
    return build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)


# --- ingest never writes over what it did not make ---------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "copy"])
@pytest.mark.parametrize("where", ["shard", "config", "dir", "inside", "above"])
def test_ingest_never_writes_over_its_parent(capsys, toy, tmp_path, mode, where):
    a, _ = toy
    before = _sha(a)
    store = {"shard": a / "model.safetensors", "config": a / "config.json", "dir": a, "inside": a / "s",
             "above": tmp_path}[where]
    assert main(["ingest", str(a), str(store), "--mode", mode, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input" in err and "Traceback" not in err, err
    assert _sha(a) == before


@pytest.mark.parametrize("mode", ["reference", "copy"])
def test_ingest_never_writes_into_something_that_is_not_its_store(toy, tmp_path, mode):
    _, b = toy
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("mine too")
    for target in (notes, work):
        with pytest.raises(StoreError, match=r"refusing|directory"):
            ingest(b, target, mode=mode)
    assert notes.read_text() == "mine" and (work / "paper.tex").read_text() == "mine too"
    assert sorted(p.name for p in work.iterdir()) == ["paper.tex"]
    ingest(b, tmp_path / ("s.json" if mode == "reference" else "s.zarr"), mode=mode)  # its own: fine, twice
    ingest(b, tmp_path / ("s.json" if mode == "reference" else "s.zarr"), mode=mode)
    assert not list(tmp_path.glob(".s.*"))


def test_copy_ingest_of_another_parent_of_the_same_geometry_rewrites(toy, tmp_path):
    a, b = toy
    store = tmp_path / "s.zarr"
    ingest(a, store, mode="copy")
    report = ingest(b, store, mode="copy")
    assert report["bytes_written"] > 0
    export_store(store, tmp_path / "out")
    _same(read_all(tmp_path / "out"), read_all(b))
    again = ingest(b, store, mode="copy")  # the same source again: trusted, nothing rewritten
    assert again["bytes_written"] == 0


def test_an_interrupted_reingest_leaves_a_store_nothing_reads(toy, tmp_path):
    a, b = toy
    store = tmp_path / "s.zarr"
    ingest(a, store, mode="copy")

    def crash(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(b, store, mode="copy", progress=crash)
    with pytest.raises(SourceError, match="did not complete"):
        open_parent(store)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=store, t=0.5))
    with pytest.raises(DarwinError, match="did not complete"):
        api.merge(m, tmp_path / "child")
    assert not (tmp_path / "child").exists()
    ingest(b, store, mode="copy")  # and running it again finishes it, with b's bytes
    with open_parent(store) as s:
        for name, t in read_all(b).items():
            assert torch.equal(s.read(name).view(torch.int16), t.view(torch.int16)), name


def test_a_merge_into_a_zarr_out_never_keeps_another_run_s_tensors(toy, tmp_path):
    """A killed `merge --format zarr` of another manifest leaves a complete copy store in .OUT.partial."""
    a, b = toy
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.1))
    second.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.9))
    api.merge(first, tmp_path / "out", out_format="zarr")
    (tmp_path / "out").rename(tmp_path / ".out.partial")  # killed just before its final rename
    api.merge(second, tmp_path / "out", out_format="zarr")
    api.merge(second, tmp_path / "expected")
    with open_parent(tmp_path / "out") as got:
        for name, t in read_all(tmp_path / "expected").items():
            assert torch.equal(got.read(name).view(torch.int16), t.view(torch.int16)), name


# --- stores are verified -----------------------------------------------------------------------


def test_a_reference_store_reads_its_own_parent_from_any_directory(toy, tmp_path, monkeypatch):
    a, b = toy
    monkeypatch.chdir(tmp_path)
    ingest("a", "s.json", mode="reference")  # typed relative
    refs = json.loads((tmp_path / "s.json").read_text())["refs"]
    assert all(Path(v[0]).is_absolute() for v in refs.values() if isinstance(v, list))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a").symlink_to(b)  # another model at the same relative path
    monkeypatch.chdir(elsewhere)
    with open_parent(tmp_path / "s.json") as s:
        for name, t in read_all(a).items():
            assert torch.equal(s.read(name).view(torch.int16), t.view(torch.int16)), name


@pytest.mark.parametrize("target", ["/etc/passwd", "secret", "other/model.safetensors", "relative"])
def test_a_forged_reference_store_cannot_point_outside_its_parent(toy, tmp_path, target):
    a, _ = toy
    ingest(a, tmp_path / "s.json", mode="reference")
    (tmp_path / "secret").write_bytes(b"k" * 2**20)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(b"k" * 2**20)
    path = {"/etc/passwd": "/etc/passwd", "secret": str(tmp_path / "secret"), "relative": "a/model.safetensors",
            "other/model.safetensors": str(tmp_path / "other" / "model.safetensors")}[target]
    doc = json.loads((tmp_path / "s.json").read_text())
    for v in doc["refs"].values():
        if isinstance(v, list):
            v[0] = path
            v[1] = 0
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(SourceError, match="reference target"):
        open_parent(tmp_path / "s.json")
    with pytest.raises(StoreError, match="reference target"):
        export_store(tmp_path / "s.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("aux", ["model.safetensors", "../planted.txt", ".darwin-journal"])
def test_a_forged_store_s_aux_files_cannot_replace_weights_or_escape(toy, tmp_path, aux):
    a, b = toy
    store = tmp_path / "s.zarr"
    ingest(a, store, mode="copy")
    root = zarr.open_group(str(store), mode="r+")
    meta = dict(root.attrs[layout.ROOT_ATTR])
    meta["aux"] = [*meta["aux"], aux]
    if "/" not in aux:
        write_aux_file(root, aux, b"not weights")
    root.attrs[layout.ROOT_ATTR] = meta
    with pytest.raises(StoreError, match="aux file"):
        export_store(store, tmp_path / "out")
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=store, b=b, t=0.5))
    with pytest.raises(DarwinError, match="aux file"):
        api.merge(m, tmp_path / "child")
    assert not (tmp_path / "out").exists() and not (tmp_path / "child").exists()
    assert not (tmp_path / "planted.txt").exists()


def test_a_forged_tensor_path_is_refused(toy, tmp_path):
    a, _ = toy
    store = tmp_path / "s.zarr"
    ingest(a, store, mode="copy")
    root = zarr.open_group(str(store), mode="r+")
    meta = dict(root.attrs[layout.ROOT_ATTR])
    name = next(iter(meta["tensors"]))
    meta["tensors"][name] = {**meta["tensors"][name], "path": "../../elsewhere"}
    root.attrs[layout.ROOT_ATTR] = meta
    with pytest.raises(SourceError, match="layers/<i>/<name>"):
        open_parent(store)


def test_a_lost_chunk_of_a_copy_store_is_an_error_not_zeros(toy, tmp_path):
    a, b = toy
    store = tmp_path / "s.zarr"
    ingest(a, store, mode="copy", chunk_bytes=4096, shard_bytes=4096)
    name = "model.layers.0.mlp.up_proj.weight"
    chunk = next(p for p in (store / "layers/0/mlp.up_proj.weight/c").rglob("*") if p.is_file())
    chunk.unlink()
    with open_parent(store) as s, pytest.raises(SourceError, match=rf"{name}.*does not match its checksum"):
        s.read(name)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=store, b=b, t=0.5))
    with pytest.raises(DarwinError, match="does not match its checksum"):
        api.merge(m, tmp_path / "child")
    assert not (tmp_path / "child").exists()
