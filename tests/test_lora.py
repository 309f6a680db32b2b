"""`model+lora` parents (#11.4): a PEFT LoRA adapter applied by rows as the parent is streamed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import darwin_stream as ds
from darwin_stream import lora
from darwin_stream.errors import ManifestError, SourceError
from darwin_stream.pool import open_parent
from tests.helpers import bf16_ulp_mismatch, read_all

R, ALPHA = 4, 16.0
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def make_adapter(base: Path, out: Path, *, seed: int = 0, config: dict | None = None, embed: bool = True,
                 save_lm_head: bool = False) -> Path:
    """A PEFT adapter directory for `base`, written as PEFT saves one (names, shapes, config)."""
    base_t = read_all(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in base_t.items():
        module = name.removesuffix(".weight")
        if any(module.endswith(t) for t in TARGETS):
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(R, w.shape[1], generator=g) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(w.shape[0], R, generator=g) * 0.05
    if embed:
        vocab, dim = base_t["model.embed_tokens.weight"].shape
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(R, vocab, generator=g) * 0.05
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(dim, R, generator=g) * 0.05
    if save_lm_head:
        tensors["base_model.model.lm_head.weight"] = torch.randn(base_t["lm_head.weight"].shape, generator=g)
    out.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj", "down_proj"],
           "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "base_model_name_or_path": str(base),
           **(config or {})}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


TERMS: dict[str, torch.Tensor] = {}  # name -> |W| + scale * |B| @ |A|: what float32 rounding is relative to


def reference(base: Path, adapter: Path, scale_of=lambda module: ALPHA / R) -> dict[str, torch.Tensor]:
    """W + scale * B @ A in float64, for every base tensor (PEFT's merge_and_unload, without rounding).

    Also fills TERMS: where W and the delta cancel, float32 arithmetic is good to 2^-24 of the
    terms, which can be several bf16 ulps of the tiny result (1 element in 32768 here).
    """
    w, a = read_all(base), read_all(adapter)
    out = {n: t.double() for n, t in w.items()}
    for name in w:
        module = name.removesuffix(".weight")
        key = f"base_model.model.{module}"
        TERMS[name] = w[name].double().abs()
        for left, right, tr in ((f"{key}.lora_B.weight", f"{key}.lora_A.weight", False),
                                (f"{key}.lora_embedding_B", f"{key}.lora_embedding_A", True)):
            if right in a:
                bb, aa = a[left].double(), a[right].double()
                delta, mag = bb @ aa, bb.abs() @ aa.abs()
                out[name] += scale_of(module) * (delta.T if tr else delta)
                TERMS[name] = TERMS[name] + scale_of(module) * (mag.T if tr else mag)
    return out


PASS = "merge_method: passthrough\nmodels:\n  - model: {m}\ndtype: bfloat16\n"


def test_a_lora_parent_is_its_base_with_the_adapter_merged(tiny_parents, tmp_path):
    base = tiny_parents[0]
    adapter = make_adapter(base, tmp_path / "adapter")
    report = ds.merge(PASS.format(m=f"{base}+{adapter}"), tmp_path / "child", memory_budget=2**20)
    got, ref, plain = read_all(tmp_path / "child"), reference(base, adapter), read_all(base)
    assert got.keys() == plain.keys() and report.tensors == len(plain)
    changed = 0
    for name, t in got.items():
        if torch.equal(t, plain[name]):
            assert torch.equal(ref[name].to(torch.bfloat16), plain[name]), f"{name}: adapter not applied"
            continue
        changed += 1
        assert bf16_ulp_mismatch(t, ref[name], TERMS[name]) == 0, name  # rounded once from the float32 sum
    assert changed == 3 * 4 + 1  # three targets in each of 4 layers, and the embeddings
    assert (tmp_path / "child" / "config.json").read_bytes() != b""


def test_chunking_changes_nothing_and_the_dict_form_is_the_same_parent(tiny_parents, tmp_path):
    base = tiny_parents[0]
    adapter = make_adapter(base, tmp_path / "adapter", seed=3)
    ds.merge(PASS.format(m=f"{base}+{adapter}"), tmp_path / "small", memory_budget=200 * 2**10)
    ds.merge(PASS.format(m=f"{base}+{adapter}"), tmp_path / "big")
    ds.merge(PASS.format(m=f"{{model: {base}, lora: {adapter}}}"), tmp_path / "dict")
    small, big, as_dict = read_all(tmp_path / "small"), read_all(tmp_path / "big"), read_all(tmp_path / "dict")
    assert all(torch.equal(small[k], big[k]) and torch.equal(as_dict[k], big[k]) for k in big)


def test_a_lora_parent_in_a_linear_merge(tiny_parents, tmp_path):
    base, other = tiny_parents
    adapter = make_adapter(base, tmp_path / "adapter", seed=5)
    yaml = (f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {other}\n    parameters: {{weight: 0.4}}\ndtype: float32\nout_dtype: bfloat16\n")
    ds.merge(yaml, tmp_path / "child")
    got, ref, o = read_all(tmp_path / "child"), reference(base, adapter), read_all(other)
    for name, t in got.items():
        x = ref[name].to(torch.bfloat16).double()  # the LoRA parent's rows are stored bf16, as a merged checkpoint
        want = 0.6 * x + 0.4 * o[name].double()
        assert bf16_ulp_mismatch(t, want, terms=0.6 * x.abs() + 0.4 * o[name].double().abs()) <= 1e-4, name


def test_rslora_rank_and_alpha_patterns_and_a_saved_module(tiny_parents, tmp_path):
    base = tiny_parents[0]
    cfg = {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 4.0}}
    adapter = make_adapter(base, tmp_path / "adapter", config=cfg, embed=False, save_lm_head=True)

    def scale(module: str) -> float:
        r = 2 if module.endswith("v_proj") else R
        alpha = 4.0 if module.endswith("layers.1.self_attn.q_proj") else ALPHA
        return alpha / math.sqrt(r)

    ds.merge(PASS.format(m=f"{base}+{adapter}"), tmp_path / "child")
    got, ref = read_all(tmp_path / "child"), reference(base, adapter, scale)
    for name, t in got.items():
        if name != "lm_head.weight":
            assert bf16_ulp_mismatch(t, ref[name], TERMS[name]) == 0, name
    assert torch.equal(got["lm_head.weight"], read_all(adapter)["base_model.model.lm_head.weight"])


def test_a_changed_adapter_invalidates_the_identity(tiny_parents, tmp_path):
    from darwin_stream.identity import parent_identity, parent_locations

    base = tiny_parents[0]
    adapter = make_adapter(base, tmp_path / "adapter")
    spec = f"{base}+{adapter}"
    with open_parent(spec) as p:
        before, where = parent_identity(p), parent_locations(p)
    assert str(adapter) in where and str(base) in where  # an output may not be written over either
    make_adapter(base, tmp_path / "other", seed=9)
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    with open_parent(spec) as p:
        assert parent_identity(p) != before


@pytest.mark.parametrize(("edit", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "not a LoRA"),
    ({"r": 0}, "positive integer r"),
])
def test_adapters_that_cannot_be_applied_by_rows_are_refused(tiny_parents, tmp_path, edit, message):
    base = tiny_parents[0]
    adapter = make_adapter(base, tmp_path / "adapter", config=edit)
    with pytest.raises(SourceError, match=message):
        ds.load_plan(PASS.format(m=f"{base}+{adapter}"))


def test_bad_adapters_and_references_are_one_line_errors(tiny_parents, tmp_path):
    base, other = tiny_parents
    no_config = make_adapter(base, tmp_path / "no-config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(SourceError, match=r"no adapter_config\.json"):
        ds.load_plan(PASS.format(m=f"{base}+{no_config}"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(R, 3),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(5, R)},
              str(wrong / "adapter_model.safetensors"))
    (wrong / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": ALPHA}))
    with pytest.raises(SourceError, match=r"do not fit model\.layers\.0\.self_attn\.q_proj\.weight"):
        ds.load_plan(PASS.format(m=f"{base}+{wrong}"))
    with pytest.raises(ManifestError, match="one '\\+'"):
        ds.load_plan(PASS.format(m=f"{base}+{other}+{other}"))


def test_the_row_arithmetic_matches_the_whole_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 11, generator=g).to(torch.bfloat16)
    a, b = torch.randn(3, 11, generator=g), torch.randn(37, 3, generator=g)
    d = lora.Delta(a="a", b="b", scale=0.7, transposed=False)

    def read(name: str, r0: int, r1: int | None) -> torch.Tensor:
        t = {"a": a, "b": b}[name]
        return t[r0:r1]

    whole = (w.double() + 0.7 * b.double() @ a.double()).to(torch.bfloat16)
    for r0, r1 in ((0, 37), (5, 6), (30, 37)):
        part = lora.apply_rows(w[r0:r1], d, r0, read)
        assert bf16_ulp_mismatch(part, (w.double() + 0.7 * b.double() @ a.double())[r0:r1]) == 0
        assert (part.view(torch.int16) - whole[r0:r1].view(torch.int16)).abs().max() <= 1
