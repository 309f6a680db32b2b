"""End to end through the library call: a mergekit YAML in, a child that transformers runs out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import darwin_stream
from tests.helpers import bf16_ulp_mismatch, read_all

LINEAR = """\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: bfloat16
"""


@pytest.mark.slow
def test_multishard_child_loads_and_generates(tiny_parents, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tiny_parents
    manifest = tmp_path / "linear.yaml"
    manifest.write_text(LINEAR.format(a=a, b=b))
    report = darwin_stream.merge(manifest, tmp_path / "child", shard_size=300_000)
    child = tmp_path / "child"
    assert report.out == str(child)
    index = json.loads((child / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    for name in ("config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (child / name).is_file(), name
    assert "merge_method: linear" in (child / "README.md").read_text()

    # Every tensor is the float64 blend rounded once to bf16, within one ulp.
    pa, pb, got = read_all(a), read_all(b), read_all(child)
    assert got.keys() == pa.keys()
    for name, t in got.items():
        x, y = pa[name].double(), pb[name].double()
        ref = 0.6 * x + 0.4 * y
        assert bf16_ulp_mismatch(t, ref, terms=0.6 * x.abs() + 0.4 * y.abs()) <= 1e-4, name

    tok = AutoTokenizer.from_pretrained(child)
    model = AutoModelForCausalLM.from_pretrained(child)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 6
    assert torch.isfinite(model(ids).logits).all()


def test_report_and_parents_untouched(tiny_parents, tmp_path):
    a, b = tiny_parents
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_size) for d in (a, b) for p in d.iterdir()}
    manifest = tmp_path / "linear.yaml"
    manifest.write_text(LINEAR.format(a=a, b=b))
    report = darwin_stream.merge(manifest, tmp_path / "child", memory_budget=2**20)
    assert report.bytes_written == sum(
        (tmp_path / "child" / f).stat().st_size for f in ("model.safetensors",)
    )
    assert report.bytes_read > report.bytes_written  # two parents in, one child out
    assert report.tensors == len(read_all(a))
    assert report.peak_anon_bytes >= report.baseline_anon_bytes > 0
    assert stamps == {p: (p.stat().st_mtime_ns, p.stat().st_size) for d in (a, b) for p in d.iterdir()}
    with safe_open(str(tmp_path / "child" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_out_dir_that_exists_is_refused_unless_overwrite(tiny_parents, tmp_path):
    a, b = tiny_parents
    manifest = tmp_path / "linear.yaml"
    manifest.write_text(LINEAR.format(a=a, b=b))
    out = tmp_path / "child"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(darwin_stream.OutputError, match="already exists"):
        darwin_stream.merge(manifest, out)
    assert (out / "keep.txt").read_text() == "mine"
    darwin_stream.merge(manifest, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_zarr_child_equals_the_safetensors_child(tiny_parents, tmp_path):
    from darwin_stream.pool import open_parent

    a, b = tiny_parents
    manifest = tmp_path / "linear.yaml"
    manifest.write_text(LINEAR.format(a=a, b=b))
    darwin_stream.merge(manifest, tmp_path / "st")
    report = darwin_stream.merge(manifest, tmp_path / "zarr", out_format="zarr")
    assert report.format == "zarr" and report.out == str(tmp_path / "zarr")
    assert not (tmp_path / ".zarr.safetensors").exists() and not (tmp_path / ".zarr.partial").exists()
    expected = read_all(tmp_path / "st")
    with open_parent(str(tmp_path / "zarr")) as store:
        assert set(store.tensors) == set(expected)
        for name, t in expected.items():
            assert torch.equal(store.read(name).view(torch.int16), t.view(torch.int16)), name
        assert json.loads(store.read_aux()["config.json"]) == json.loads((tmp_path / "st" / "config.json").read_text())
