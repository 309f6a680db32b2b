"""Parents: every form opens to the same tensors, and every bad input is a one-line SourceError."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from darwin_stream.errors import SourceError
from darwin_stream.sources import SafetensorsParent, StoreParent, open_parent
from darwin_stream.store import ingest


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_shard(path: Path, header: dict | bytes, data: bytes = b"", declared: int | None = None) -> Path:
    """A safetensors file written by hand, so tests can break it in precise ways."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + data)
    return path


def good_header(rows: int = 4, cols: int = 8) -> tuple[dict, bytes]:
    data = np.arange(rows * cols, dtype=np.float32).tobytes()
    return {"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, len(data)]}}, data


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- good parents -------------------------------------------------------------------------------


def test_local_parent_reads_match_safetensors(tiny_parents):
    father, _ = tiny_parents
    p = open_parent(father)
    assert isinstance(p, SafetensorsParent)
    ref: dict[str, torch.Tensor] = {}
    for shard in sorted(father.glob("*.safetensors")):
        ref |= load_file(shard)
    assert set(p.tensors) == set(ref)
    for name, t in ref.items():
        got = p.read(name)
        assert got.dtype == t.dtype == torch.bfloat16 and got.shape == t.shape
        assert raw(got) == raw(t)
    name = "model.embed_tokens.weight"
    assert raw(p.read_rows(name, 3, 17)) == raw(ref[name][3:17])
    assert p.config["model_type"] == "qwen3"
    aux = p.read_aux()
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(aux)
    assert aux["config.json"] == (father / "config.json").read_bytes()
    p.close()


def test_array_is_the_reference_view(tiny_parents):
    p = open_parent(tiny_parents[0])
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"):
        a = p.array(name)
        assert a.shape == p.info(name).shape
        assert np.asarray(a[:]).tobytes() == raw(p.read(name))


def test_rows_out_of_range(tiny_parents):
    p = open_parent(tiny_parents[0])
    with pytest.raises(SourceError, match="out of range"):
        p.read_rows("lm_head.weight", 0, 10**6)


def test_url_parents_read_like_local(tiny_parents, tmp_path):
    import fsspec

    father, _ = tiny_parents
    local = open_parent(father)
    mem = fsspec.filesystem("memory")
    for f in father.iterdir():
        mem.pipe_file(f"/parents/father/{f.name}", f.read_bytes())
    for url in (f"file://{father}", "memory://parents/father"):
        p = open_parent(url)
        assert isinstance(p, SafetensorsParent) and not p.is_local
        assert set(p.tensors) == set(local.tensors)
        for name in local.tensors:
            assert raw(p.read(name)) == raw(local.read(name))
        assert raw(p.read_rows("model.embed_tokens.weight", 5, 9)) == raw(local.read_rows("model.embed_tokens.weight", 5, 9))
        assert p.read_aux()["tokenizer.json"] == (father / "tokenizer.json").read_bytes()
        a = p.array("model.layers.0.self_attn.q_proj.weight")  # reference view over the URL's filesystem
        assert np.asarray(a[:]).tobytes() == raw(local.read("model.layers.0.self_attn.q_proj.weight"))


def test_hub_repo_id_resolves_offline_from_cache(tiny_parents, tmp_path, monkeypatch):
    father, _ = tiny_parents
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--darwin--tiny-father" / "snapshots" / rev
    shutil.copytree(father, snap)
    (cache / "models--darwin--tiny-father" / "refs").mkdir()
    (cache / "models--darwin--tiny-father" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    p = open_parent("darwin/tiny-father")
    local = open_parent(father)
    assert set(p.tensors) == set(local.tensors)
    assert raw(p.read("lm_head.weight")) == raw(local.read("lm_head.weight"))
    with pytest.raises(SourceError, match="not in the local Hugging Face cache") as e:
        open_parent("darwin/not-cached")
    one_line(e)


@pytest.mark.parametrize("mode", ["reference", "copy"])
def test_store_parent_reads_equal_mmap(tiny_parents, tmp_path, mode):
    father, _ = tiny_parents
    store = tmp_path / ("ref.json" if mode == "reference" else "copy.zarr")
    ingest(father, store, mode=mode, chunk_bytes=8192, shard_bytes=32768)
    local, p = open_parent(father), open_parent(store)
    assert isinstance(p, StoreParent)
    assert {n: (t.dtype, t.shape) for n, t in p.tensors.items()} == {n: (t.dtype, t.shape) for n, t in local.tensors.items()}
    for name in local.tensors:
        assert raw(p.read(name)) == raw(local.read(name))
    assert raw(p.read_rows("model.embed_tokens.weight", 7, 300)) == raw(local.read_rows("model.embed_tokens.weight", 7, 300))
    assert p.config == local.config
    assert p.read_aux() == local.read_aux()
    assert np.asarray(p.array("lm_head.weight")[:4]).tobytes() == raw(local.read_rows("lm_head.weight", 0, 4))


def test_index_selects_shards(tmp_path):
    h, data = good_header()
    write_shard(tmp_path / "a.safetensors", h, data)
    write_shard(tmp_path / "stray.safetensors", b"garbage!")  # not in the index: never read
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    p = open_parent(tmp_path)
    assert list(p.tensors) == ["w"]
    assert p.read("w").tolist()[1][0] == 8.0


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_parent(tmp_path):
    with pytest.raises(SourceError, match="no such directory") as e:
        open_parent(tmp_path / "nope")
    one_line(e)


def test_missing_tensor(tiny_parents):
    with pytest.raises(SourceError, match=r"no tensor named 'model.nope'") as e:
        open_parent(tiny_parents[0]).read_rows("model.nope")
    one_line(e)


def test_truncated_shard(tmp_path):
    h, data = good_header()
    write_shard(tmp_path / "model.safetensors", h, data[:-5])
    with pytest.raises(SourceError, match="truncated shard") as e:
        open_parent(tmp_path)
    assert "model.safetensors" in one_line(e)


def test_truncated_header(tmp_path):
    write_shard(tmp_path / "model.safetensors", b'{"w": {}}', declared=1000)
    with pytest.raises(SourceError, match="truncated shard"):
        open_parent(tmp_path)


def test_corrupt_json_header(tmp_path):
    write_shard(tmp_path / "model.safetensors", b'{"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 12')
    with pytest.raises(SourceError, match="corrupt safetensors header") as e:
        open_parent(tmp_path)
    one_line(e)


def test_garbled_header(tmp_path):
    write_shard(tmp_path / "model.safetensors", bytes(range(256)) * 4)
    with pytest.raises(SourceError, match="corrupt safetensors header"):
        open_parent(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]},  # offsets disagree with the shape
        {"dtype": "Q99", "shape": [4, 8], "data_offsets": [0, 128]},  # unknown dtype
        {"dtype": "F32", "shape": "x", "data_offsets": [0, 128]},  # not a shape
    ],
)
def test_inconsistent_header_entries(tmp_path, entry):
    _, data = good_header()
    write_shard(tmp_path / "model.safetensors", {"w": entry}, data)
    with pytest.raises(SourceError) as e:
        open_parent(tmp_path)
    assert "'w'" in one_line(e)


def test_oversized_header_length(tmp_path):
    write_shard(tmp_path / "model.safetensors", b"{}", declared=2**40)
    with pytest.raises(SourceError, match="exceeds") as e:
        open_parent(tmp_path)
    one_line(e)


def test_pickle_only_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match=r"pytorch_model.bin is a pickle checkpoint") as e:
        open_parent(tmp_path)
    one_line(e)


def test_tensor_name_escaping_the_store(tmp_path):
    save_file({"../../etc/evil": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SourceError, match="escape the store") as e:
        open_parent(tmp_path)
    assert "../../etc/evil" in one_line(e)


def test_index_names_missing_shard(tmp_path):
    h, data = good_header()
    write_shard(tmp_path / "a.safetensors", h, data)
    index = {"weight_map": {"w": "a.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"shard model-00002-of-00002.safetensors listed in") as e:
        open_parent(tmp_path)
    one_line(e)


def test_index_names_tensor_missing_from_shard(tmp_path):
    h, data = good_header()
    write_shard(tmp_path / "a.safetensors", h, data)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "a.safetensors"}}))
    with pytest.raises(SourceError, match=r"tensor 'v' listed in .* is missing from shard a.safetensors"):
        open_parent(tmp_path)


def test_index_shard_outside_checkpoint(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}}))
    with pytest.raises(SourceError, match="outside the checkpoint"):
        open_parent(tmp_path)


def test_garbled_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(SourceError, match="index.json is not valid JSON"):
        open_parent(tmp_path)


def test_empty_dir(tmp_path):
    with pytest.raises(SourceError, match=r"no .safetensors files"):
        open_parent(tmp_path)


def test_missing_url(tmp_path):
    with pytest.raises(SourceError, match="no such URL"):
        open_parent("memory://nothing/here")


def test_hub_pickle_only_repo_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    rev = "f" * 40
    snap = cache / "models--darwin--pickled" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (cache / "models--darwin--pickled" / "refs").mkdir()
    (cache / "models--darwin--pickled" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(SourceError, match=r"pytorch_model.bin is a pickle checkpoint"):
        open_parent("darwin/pickled")


def test_parent_files_are_never_written(tmp_path):
    h, data = good_header()
    shard = write_shard(tmp_path / "model.safetensors", h, data)
    before = shard.read_bytes()
    p = open_parent(tmp_path)
    t = p.read_rows("w", 0, 2)
    t.fill_(7.0)  # copy-on-write map: only a private page changes
    p.close()
    assert shard.read_bytes() == before
    assert open_parent(tmp_path).read("w")[0, 1].item() == 1.0
