"""The zarr layer store: layout, bit-exact round trips in both modes, resume, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from darwin_stream.errors import SourceError, StoreError
from darwin_stream.pool import open_parent
from darwin_stream.sources import TensorInfo
from darwin_stream.store import export_store, ingest, is_store, layout, open_store, reference_view
from darwin_stream.store.reference import build_refs


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    pa, pb = open_parent(a), open_parent(b)
    assert list(pa.tensors) == list(pb.tensors) or set(pa.tensors) == set(pb.tensors)
    for name, t in pa.tensors.items():
        u = pb.info(name)
        assert (t.dtype, t.shape) == (u.dtype, u.shape), name
        assert raw(pa.read(name)) == raw(pb.read(name)), name
    assert pa.read_aux() == pb.read_aux()


@pytest.fixture(scope="module")
def mixed_parent(tmp_path_factory) -> Path:
    """bf16, fp16 and fp32 tensors over two shards, with awkward shapes: prime rows, 1-D, scalar."""
    root = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(3)
    a = {
        "model.embed_tokens.weight": torch.randn(97, 24, generator=g).bfloat16(),  # prime row count
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 24, generator=g).half(),
        "model.layers.0.input_layernorm.weight": torch.randn(24, generator=g).float(),
        "model.layers.11.mlp.down_proj.weight": torch.randn(24, 60, generator=g).bfloat16(),
    }
    b = {
        "model.norm.weight": torch.randn(24, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(96, 24, generator=g).float(),
        "model.layers.1.mlp.up_proj.weight": torch.tensor([[float("nan"), -0.0, float("inf"), 1e-40]]).bfloat16(),
        "scale": torch.tensor(1.5, dtype=torch.float16),
    }
    save_file(a, str(root / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(root / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in a} | {n: "model-00002-of-00002.safetensors" for n in b}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "qwen3", "num_hidden_layers": 12}')
    (root / "tokenizer.model").write_bytes(bytes(range(256)))
    return root


@pytest.mark.parametrize("mode", ["reference", "copy"])
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_round_trip_bit_exact(mixed_parent, tmp_path, mode, compressor):
    if mode == "reference" and compressor:
        with pytest.raises(StoreError, match="cannot compress"):
            ingest(mixed_parent, tmp_path / "s", mode=mode, compressor=compressor)
        return
    store = tmp_path / ("store.json" if mode == "reference" else "store.zarr")
    report = ingest(mixed_parent, store, mode=mode, chunk_bytes=200, shard_bytes=1000, compressor=compressor)
    assert report["mode"] == mode and report["tensors"] == 8
    assert is_store(store)
    out = tmp_path / "out"
    export_store(store, out, shard_size=4000)
    assert (out / "model.safetensors.index.json").exists()
    assert_same_checkpoint(mixed_parent, out)
    single = tmp_path / "single"
    export_store(store, single)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert_same_checkpoint(mixed_parent, single)


@pytest.mark.parametrize("mode", ["reference", "copy"])
def test_tiny_qwen3_round_trip(tiny_parents, tmp_path, mode):
    father, _ = tiny_parents
    store = tmp_path / ("s.json" if mode == "reference" else "s.zarr")
    ingest(father, store, mode=mode)
    export_store(store, tmp_path / "out", shard_size=300_000)
    assert_same_checkpoint(father, tmp_path / "out")


@pytest.mark.parametrize("mode", ["reference", "copy"])
def test_layout(mixed_parent, tmp_path, mode):
    store = tmp_path / ("s.json" if mode == "reference" else "s.zarr")
    ingest(mixed_parent, store, mode=mode)
    g = open_store(store)
    meta = g.attrs[layout.ROOT_ATTR]
    assert meta["mode"] == mode and meta["complete"] and meta["format"] == 1
    assert meta["tensors"]["model.layers.11.mlp.down_proj.weight"]["path"] == "layers/11/mlp.down_proj.weight"
    assert meta["tensors"]["lm_head.weight"]["path"] == "other/lm_head.weight"
    assert meta["aux"] == ["config.json", "tokenizer.model"]
    q = g["layers/0/self_attn.q_proj.weight"]
    assert isinstance(q, zarr.Array) and q.dtype == np.float16
    assert q.attrs["name"] == "model.layers.0.self_attn.q_proj.weight" and q.attrs["dtype"] == "F16"
    assert q.attrs["checksum"].startswith("sha256:") and len(q.attrs["checksum"]) == 7 + 64
    emb = g["other/model.embed_tokens.weight"]
    assert emb.dtype == np.dtype(ml_dtypes.bfloat16)
    assert emb.metadata.data_type.to_json(zarr_format=3) == "bfloat16"
    assert sorted(k for k, _ in g["layers"].groups()) == ["0", "1", "11"]
    assert bytes(np.asarray(g["aux/tokenizer.model"][:])) == bytes(range(256))
    if mode == "copy":
        zj = json.loads((store / "layers/11/mlp.down_proj.weight/zarr.json").read_text())
        assert zj["data_type"] == "bfloat16"


def test_reference_chunks_divide_rows(mixed_parent):
    refs = build_refs(open_parent(mixed_parent), chunk_bytes=24 * 2 * 10)["refs"]
    meta = json.loads(refs["other/model.embed_tokens.weight/zarr.json"])
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 24]  # 97 is prime
    assert sum(k.startswith("other/model.embed_tokens.weight/c/") for k in refs) == 97
    meta = json.loads(refs["other/lm_head.weight/zarr.json"])
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 24]  # 96 rows, budget of 5 rows of fp32
    shard, offset, length = refs["other/lm_head.weight/c/1/0"]
    t = open_parent(mixed_parent).info("lm_head.weight")
    assert (shard, offset, length) == (t.file, t.offset + 4 * 96, 4 * 96)
    assert layout.row_chunk_dividing(151936, 2048, 16 * 2**20) == 4748


def test_reference_view_is_in_memory(mixed_parent):
    p = open_parent(mixed_parent)
    g = reference_view(p)
    for name in p.tensors:
        assert np.asarray(g[layout.store_path(name)][...]).tobytes() == raw(p.read(name))


def test_copy_resumes_after_interruption(tiny_parents, tmp_path):
    father, _ = tiny_parents
    store = tmp_path / "s.zarr"
    total = sum(t.nbytes for t in open_parent(father).tensors.values())

    done = [0]

    def crash(n: int) -> None:
        done[0] += n
        if done[0] > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(father, store, mode="copy", chunk_bytes=4096, shard_bytes=16384, progress=crash)
    assert not open_store(store, allow_incomplete=True).attrs[layout.ROOT_ATTR]["complete"]
    with pytest.raises(StoreError, match="did not complete"):
        export_store(store, tmp_path / "early")
    assert not (tmp_path / "early").exists()
    seen: list[int] = []
    r = ingest(father, store, mode="copy", chunk_bytes=4096, shard_bytes=16384, progress=seen.append)
    assert r["bytes_skipped"] >= total // 2 and r["bytes_written"] <= total - total // 2 + 64 * 1024
    assert r["bytes_written"] + r["bytes_skipped"] == total and sum(seen) == total
    seen.clear()
    export_store(store, tmp_path / "out2", progress=seen.append)
    assert sum(seen) == total
    export_store(store, tmp_path / "out")
    assert_same_checkpoint(father, tmp_path / "out")
    again = ingest(father, store, mode="copy", chunk_bytes=4096, shard_bytes=16384)
    assert again["bytes_written"] == 0


def test_copy_rewrites_shards_that_no_longer_match(mixed_parent, tmp_path):
    store = tmp_path / "s.zarr"
    ingest(mixed_parent, store, mode="copy", chunk_bytes=200, shard_bytes=1000)
    arr = zarr.open_array(store / "other/lm_head.weight", mode="r+")
    done = dict(arr.attrs["done"])
    done["1"] = "0" * 64  # a recorded digest that no longer verifies
    arr.update_attributes({"done": done, "complete": False})
    r = ingest(mixed_parent, store, mode="copy", chunk_bytes=200, shard_bytes=1000)
    assert 0 < r["bytes_written"] <= 1000


def test_export_detects_corruption(mixed_parent, tmp_path):
    store = tmp_path / "s.zarr"
    ingest(mixed_parent, store, mode="copy")
    arr = zarr.open_array(store / "other/lm_head.weight", mode="r+")
    arr[0, 0] = 123.0
    with pytest.raises(StoreError, match=r"'lm_head.weight' does not match its checksum"):
        export_store(store, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_export_refuses_non_empty_out_dir(mixed_parent, tmp_path):
    ingest(mixed_parent, tmp_path / "s.json")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        export_store(tmp_path / "s.json", tmp_path / "out")


@pytest.mark.parametrize("name", ["../evil", "/abs", "a\\b", "a/b", "", "..", "x..y", "__meta", "c:evil", "a\x00b", "x" * 300])
def test_names_that_escape_are_refused(name):
    assert layout.name_problem(name) is not None


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "a-b_c.d"])
def test_plain_names_are_fine(name):
    assert layout.name_problem(name) is None


def test_store_refuses_escaping_names_even_from_a_forged_parent(mixed_parent, tmp_path):
    p = open_parent(mixed_parent)
    t = next(iter(p.tensors.values()))
    p.tensors = {"../../outside": TensorInfo("../../outside", t.dtype, t.shape, t.file, t.offset, t.nbytes)}
    for mode in ("reference", "copy"):
        with pytest.raises(StoreError, match=r"'\.\./\.\./outside'"):
            ingest(p, tmp_path / f"s-{mode}", mode=mode)
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()


def test_not_a_store(tmp_path):
    (tmp_path / "x.json").write_text('{"version": 1, "refs": {}}')
    assert not is_store(tmp_path / "x.json") and not is_store(tmp_path)
    with pytest.raises(StoreError, match="not a darwin-stream store"):
        open_store(tmp_path / "x.json")


def test_reference_store_to_directory_refused(mixed_parent, tmp_path):
    with pytest.raises(StoreError, match="one JSON file"):
        ingest(mixed_parent, tmp_path, mode="reference")


def test_unknown_mode(mixed_parent, tmp_path):
    with pytest.raises(StoreError, match="mode"):
        ingest(mixed_parent, tmp_path / "s", mode="hardlink")


def test_missing_source(tmp_path):
    with pytest.raises(SourceError):
        ingest(tmp_path / "nope", tmp_path / "s.json")


def test_bfloat16_dtype_round_trip(tmp_path):
    a = np.array([[1.5, -2.0, np.nan, np.inf]], dtype=ml_dtypes.bfloat16)
    z = zarr.create_array(tmp_path / "a", shape=a.shape, dtype=a.dtype, chunks=(1, 2))
    z[:] = a
    b = zarr.open_array(tmp_path / "a")[:]
    assert b.dtype == a.dtype and b.view(np.uint16).tolist() == a.view(np.uint16).tolist()


def test_reference_store_with_a_vanished_shard(mixed_parent, tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(mixed_parent, parent)
    ingest(parent, tmp_path / "s.json")
    (parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"tensor '.*': cannot read .*model-00002-of-00002.safetensors") as e:
        export_store(tmp_path / "s.json", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(SourceError, match="cannot read"):
        open_parent(tmp_path / "s.json").read("lm_head.weight")


def test_reference_mode_needs_safetensors(mixed_parent, tmp_path):
    ingest(mixed_parent, tmp_path / "copy.zarr", mode="copy")
    with pytest.raises(StoreError, match="reference mode needs safetensors"):
        ingest(tmp_path / "copy.zarr", tmp_path / "s.json", mode="reference")
    r = ingest(tmp_path / "copy.zarr", tmp_path / "again.zarr")  # a store re-ingests by copy
    assert r["mode"] == "copy"
    export_store(tmp_path / "again.zarr", tmp_path / "out")
    assert_same_checkpoint(mixed_parent, tmp_path / "out")


def test_reference_progress_adds_up(mixed_parent, tmp_path):
    seen: list[int] = []
    r = ingest(mixed_parent, tmp_path / "s.json", progress=seen.append)
    assert sum(seen) == r["bytes"] > 0
    r = ingest(mixed_parent, tmp_path / "t.json", checksum=False)
    meta = open_store(tmp_path / "t.json").attrs[layout.ROOT_ATTR]
    assert all(e["checksum"] is None for e in meta["tensors"].values())
    export_store(tmp_path / "t.json", tmp_path / "out")  # nothing to verify against, still exact
    assert_same_checkpoint(mixed_parent, tmp_path / "out")
