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
from darwin_stream.pool import open_parent
from darwin_stream.sources import SafetensorsParent
from darwin_stream.store import ingest
from darwin_stream.store.parent import StoreParent


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
    with pytest.raises(SourceError, match=r"index.json is not valid JSON"):
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


# --- headers as strict as safetensors (issue 10, class 4 and 6) --------------------------------

_F32_4x8 = {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}


def _t(shape: list, lo: int, hi: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [lo, hi]}


# Each header is refused by safetensors' own reader too (checked below): the child would otherwise be
# built from another tensor's bytes, or the open would end in a traceback.
STRICT = {
    "overlap": ({"a": _t([4, 4], 0, 64), "b": _t([4, 4], 32, 96)}, 96),
    "same offsets twice": ({"a": _F32_4x8, "b": _F32_4x8}, 128),
    "gap": ({"a": _t([4, 4], 0, 64), "b": _t([2, 4], 96, 128)}, 128),
    "bytes after the last tensor": ({"a": _t([4, 4], 0, 64)}, 128),
    "float offset": (b'{"a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0.0, 128]}}', 128),
    "boolean dim": (b'{"a": {"dtype": "F32", "shape": [true, 32], "data_offsets": [0, 128]}}', 128),
    "float dim": (b'{"a": {"dtype": "F32", "shape": [4.0, 8], "data_offsets": [0, 128]}}', 128),
    "dim 2**70": ({"a": _t([2**70, 8], 0, 128)}, 128),
    "offset 1e400": (b'{"a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 1e400]}}', 128),
    "offset of 5000 digits": (b'{"a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}", 128),
    "dtype a list": (b'{"a": {"dtype": ["F32"], "shape": [4, 8], "data_offsets": [0, 128]}}', 128),
    "metadata not strings": (b'{"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}', 128),
    "metadata nested deeply": (
        b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b', "a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}',
        128,
    ),
}


@pytest.mark.parametrize("case", sorted(STRICT))
def test_header_is_as_strict_as_safetensors(tmp_path, case):
    from safetensors import safe_open

    header, nbytes = STRICT[case]
    shard = write_shard(tmp_path / "model.safetensors", header, np.zeros(nbytes, dtype=np.uint8).tobytes())
    with pytest.raises(Exception), safe_open(str(shard), "pt") as f:  # noqa: B017 - the oracle: safetensors refuses it
        f.keys()
    with pytest.raises(SourceError) as e:
        open_parent(tmp_path)
    assert "model.safetensors" in one_line(e) and len(str(e.value)) < 400


def test_header_refuses_duplicate_tensor_names(tmp_path):
    # json keeps the last of two equal keys silently; the first entry's bytes would be unaccounted for
    text = b'{"a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}, "a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}'
    write_shard(tmp_path / "model.safetensors", text, bytes(128))
    with pytest.raises(SourceError, match="duplicate key 'a'") as e:
        open_parent(tmp_path)
    one_line(e)


def test_valid_headers_still_open(tmp_path):
    # zero-size tensors share an offset; the tiling rule must not refuse them
    header = {"__metadata__": {"format": "pt"}, "a": _t([2, 4], 0, 32), "empty": _t([0], 32, 32), "b": _t([2, 4], 32, 64)}
    write_shard(tmp_path / "model.safetensors", header, np.arange(16, dtype=np.float32).tobytes())
    p = open_parent(tmp_path)
    assert p.read("b").flatten().tolist() == list(range(8, 16))
    assert p.read("empty").shape == (0,)


# --- index, config and aux files: bounded, regular, confined (classes 2, 3, 7) -----------------


def _parent_dir(tmp_path: Path, name: str = "p") -> Path:
    d = tmp_path / name
    d.mkdir()
    h, data = good_header()
    write_shard(d / "model.safetensors", h, data)
    (d / "config.json").write_text('{"model_type": "toy"}')
    return d


def test_aux_symlink_out_of_the_parent_is_refused(tmp_path):
    d = _parent_dir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private key")
    (d / "tokenizer.json").symlink_to(secret)
    p = open_parent(d)
    with pytest.raises(SourceError, match=r"tokenizer.json is a symlink to .*outside the parent") as e:
        p.read_aux()
    one_line(e)


def test_shard_symlink_out_of_the_parent_is_refused(tmp_path):
    d = _parent_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(elsewhere)
    (d / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(SourceError, match="outside the parent") as e:
        open_parent(d)
    one_line(e)


def test_symlinks_inside_the_parent_are_followed(tmp_path):
    d = _parent_dir(tmp_path)
    (d / "tok.real").write_text('{"tok": 1}')
    (d / "tokenizer.json").symlink_to(d / "tok.real")
    assert open_parent(d).read_aux()["tokenizer.json"] == b'{"tok": 1}'


def test_hub_snapshot_symlinks_into_blobs_are_followed(tmp_path, monkeypatch):
    """A Hugging Face cache snapshot is symlinks into the repo's blobs/: that is inside the parent."""
    d = _parent_dir(tmp_path, "src")
    repo = tmp_path / "hub" / "models--darwin--linked"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in d.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    p = open_parent("darwin/linked")
    assert p.config == {"model_type": "toy"} and list(p.tensors) == ["w"]


def test_aux_file_that_is_not_a_regular_file_is_refused(tmp_path):
    d = _parent_dir(tmp_path)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()  # today: silently skipped, and the child's config is {}
    with pytest.raises(SourceError, match=r"config.json is not a regular file") as e:
        _ = open_parent(d).config
    one_line(e)


def test_huge_sparse_index_is_refused_unread(tmp_path):
    d = _parent_dir(tmp_path)
    with open(d / "model.safetensors.index.json", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB on paper, nothing on disk; reading it cost 6.5 GB of RAM
    with pytest.raises(SourceError, match=r"is 3221225472 bytes, over the \d+ byte limit") as e:
        open_parent(d)
    one_line(e)


def test_huge_config_is_refused_unread(tmp_path):
    d = _parent_dir(tmp_path)
    with open(d / "config.json", "wb") as f:
        f.truncate(3 * 2**30)
    with pytest.raises(SourceError, match="byte limit") as e:
        _ = open_parent(d).config
    one_line(e)


@pytest.mark.parametrize(
    ("text", "needle"),
    [("[1, 2]", "holds a JSON list, not an object"), ('"x"', "not an object"),
     ("[" * 100_000 + "]" * 100_000, "nested"), ('{"a": {"b": 1}, "a": 2}', "duplicate key")],
)
def test_config_that_is_not_an_object_is_refused(tmp_path, text, needle):
    d = _parent_dir(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(SourceError, match=needle) as e:
        _ = open_parent(d).config
    one_line(e)


def test_index_that_maps_no_tensors_is_refused(tmp_path):
    d = _parent_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(SourceError, match="maps no tensors") as e:
        open_parent(d)
    one_line(e)


def test_shards_without_tensors_are_refused(tmp_path):
    write_shard(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}})
    with pytest.raises(SourceError, match="hold no tensors") as e:
        open_parent(tmp_path)
    one_line(e)


def _series(d: Path, n: int) -> list[str]:
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        h, data = good_header()
        write_shard(d / name, {f"w{i}": h["w"]}, data)
    return names


def test_index_missing_a_present_shard_of_its_series_is_refused(tmp_path):
    names = _series(tmp_path, 2)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w0": names[0]}}))
    with pytest.raises(SourceError, match=f"shard {names[1]} is present but .* does not list it") as e:
        open_parent(tmp_path)
    one_line(e)


def test_index_listing_part_of_its_series_is_refused(tmp_path):
    names = _series(tmp_path, 3)
    (tmp_path / names[2]).unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w0": names[0], "w1": names[1]}}))
    with pytest.raises(SourceError, match="lists 2 of the 3 shards") as e:
        open_parent(tmp_path)
    one_line(e)


def test_index_ignores_a_consolidated_file_beside_it(tmp_path):
    """transformers and mergekit read what the index lists; Mistral repos ship consolidated.safetensors too."""
    names = _series(tmp_path, 2)
    write_shard(tmp_path / "consolidated.safetensors", b"not even a header")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w0": names[0], "w1": names[1]}}))
    assert sorted(open_parent(tmp_path).tensors) == ["w0", "w1"]


_TRUNCATE_MID_MERGE = """
import os, sys
from darwin_stream.errors import SourceError
from darwin_stream.pool import open_parent
p = open_parent(sys.argv[1])
p.read_rows("w", 0, 1)  # the shard is now mapped
os.truncate(os.path.join(sys.argv[1], "model.safetensors"), 8)
try:
    print(float(p.read_rows("w", 0, 4).sum()))
except SourceError as e:
    print("refused:", e)
"""


def test_shard_truncated_after_open_is_refused_not_sigbus(tmp_path):
    """Reading a mapped page past the end of a file is SIGBUS, a silent death; it must be one line."""
    import os
    import subprocess
    import sys

    d = tmp_path / "p"
    d.mkdir()
    save_file({"w": torch.ones(4, 4096)}, str(d / "model.safetensors"))  # 4 pages: past the first one
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_MID_MERGE, str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout.startswith("refused:") and "was truncated while in use" in r.stdout, r.stdout


def test_url_parents_bound_their_small_files_too(tmp_path, monkeypatch):
    """Over fsspec the size comes from the listing, so an oversized index or config is refused unread."""
    import fsspec

    from darwin_stream import sources

    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)
    mem = fsspec.filesystem("memory")
    h, data = good_header()
    write_shard(tmp_path / "model.safetensors", h, data)
    mem.pipe_file("/bounded/p/model.safetensors", (tmp_path / "model.safetensors").read_bytes())
    config = json.dumps({"model_type": "toy", "pad": "x" * 2000}).encode()
    mem.pipe_file("/bounded/p/config.json", config)
    with pytest.raises(SourceError, match=f"config.json is {len(config)} bytes, over the 1000 byte limit") as e:
        _ = open_parent("memory://bounded/p").config
    one_line(e)
    mem.pipe_file("/bounded/p/model.safetensors.index.json", json.dumps({"weight_map": {"w": "model.safetensors"}, "pad": "x" * 2000}).encode())
    with pytest.raises(SourceError, match=r"index.json is \d+ bytes, over the 1000 byte limit") as e:
        open_parent("memory://bounded/p")
    one_line(e)


def test_file_url_parents_confine_symlinks(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    h, data = good_header()
    write_shard(d / "model.safetensors", h, data)
    (tmp_path / "secret").write_text("{}")
    (d / "config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(SourceError, match="outside the parent") as e:
        _ = open_parent(f"file://{d}").config
    one_line(e)
