"""Breeding across architectures: plans (fast) and real children on disk (slow).

Parents are tiny real-architecture models built locally: a Gemma-4 text father (6 layers, FFN 192)
and a hybrid Qwen3.5 text mother (4 layers, FFN 256), plus qwen3/llama/gemma3 and a multimodal
Gemma-4 father, so every path (father padded, mother padded, nested text_config) is exercised.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from darwin_stream import demo
from darwin_stream.errors import PlanError
from darwin_stream.plan import breed
from darwin_stream.pool import open_parent

FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    out = {
        "gemma4": demo.build_model(root / "gemma4", "gemma4", seed=1),
        "qwen3_5": demo.build_model(root / "qwen3_5", "qwen3_5", seed=2),
        "qwen3": demo.build_model(root / "qwen3", "qwen3", seed=3),
        "llama": demo.build_model(root / "llama", "llama", seed=4),
        "gemma3": demo.build_model(root / "gemma3", "gemma3", seed=5),
        "gemma4_mm": demo.build_multimodal_model(root / "gemma4_mm", "gemma4", seed=6),
        "narrow": demo.build_model(root / "narrow", "qwen3", seed=7, overrides=dict(hidden_size=64, head_dim=32)),
    }
    return {k: str(v) for k, v in out.items()}


def section(father, mother, **blend):
    return breed.BreedSection(father=father, mother=mother, blend=blend or {"mlp": {"method": "linear", "t": 0.3}})


def by_name(plan):
    return {t.name: t for t in plan.tensors}


# --- genes and layer maps ----------------------------------------------------------------------


def test_linear_layer_map_rounds_halves_up():
    assert breed.linear_layer_map(6, 4) == [0, 1, 1, 2, 2, 3]
    assert breed.linear_layer_map(3, 2) == [0, 1, 1]  # 0.5 -> 1, not banker's 0
    assert breed.linear_layer_map(1, 5) == [0]


def test_gene_forms():
    assert breed.gene_values(0.25, 3) == [0.25] * 3
    assert breed.gene_values([0.1, 0.2, 0.3], 3) == [0.1, 0.2, 0.3]
    g = breed.gene_values(breed.Gradient(gradient=[0.0, 1.0]), 5)
    assert g == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_wrong_length_t_list_names_both_lengths(parents):
    sec = section(parents["gemma4"], parents["qwen3_5"], mlp={"method": "linear", "t": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(PlanError, match=r"father has 6 layers, the list has 4 values"):
        breed.plan_breed(sec)


def test_non_finite_t_refused():
    with pytest.raises(ValueError, match="finite"):
        section("a", "b", mlp={"t": float("nan")})


def test_unknown_blend_key_and_method(parents):
    with pytest.raises(PlanError, match="not a role or group"):
        breed.plan_breed(section(parents["gemma4"], parents["qwen3_5"], feedforward={"t": 0.1}))
    with pytest.raises(PlanError, match="unknown method"):
        breed.plan_breed(section(parents["gemma4"], parents["qwen3_5"], mlp={"method": "nope", "t": 0.1}))


# --- plans -------------------------------------------------------------------------------------


def test_gemma4_x_qwen35_plan(parents):
    f, m = parents["gemma4"], parents["qwen3_5"]
    genes = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    plan = breed.plan_breed(section(f, m, mlp={"method": "linear", "t": genes}), "yaml text")
    father = open_parent(f)
    assert set(by_name(plan)) == set(father.tensors)  # every father tensor, nothing else
    assert plan.config_from == f and plan.tokenizer_from == f and set(plan.parents) == {f, m}
    assert plan.config_overrides == {"intermediate_size": 256}
    lmap = [0, 1, 1, 2, 2, 3]
    for tp in plan.tensors:
        if tp.role in ("ffn_gate", "ffn_up", "ffn_down"):
            i = tp.layer
            suffix = tp.name.split(f"layers.{i}.")[1]
            assert tp.method == "linear"
            assert tp.models[0].parent == f and tp.models[0].tensor == tp.name
            assert tp.models[1].parent == m and tp.models[1].tensor == f"model.layers.{lmap[i]}.{suffix}"
            assert tp.shape == ((256, 128) if tp.role != "ffn_down" else (128, 256))
            assert tp.models[0].pad_to == tp.shape and tp.models[1].pad_to is None  # father padded
            assert [p["weight"] for p in tp.model_params] == pytest.approx([1 - genes[i], genes[i]])
        else:
            assert tp.method == "passthrough" and tp.models == (breed.SourceRef(f, tp.name),)
    text = " ".join(plan.notes)
    assert "gelu_pytorch_tanh" in text and "silu" in text  # activations differ
    assert "FFN norm layouts differ" in text


def test_mother_padded_qwen3_x_llama_and_gemma3_x_qwen3(parents):
    # qwen3 (FFN 256) father, llama (FFN 320) mother: father padded to 320.
    plan = breed.plan_breed(section(parents["qwen3"], parents["llama"]))
    gate = by_name(plan)["model.layers.3.mlp.gate_proj.weight"]
    assert gate.shape == (320, 128) and gate.models[0].pad_to == (320, 128)
    assert gate.models[1].tensor == "model.layers.2.mlp.gate_proj.weight"  # 4 <- 3 layers
    assert plan.config_overrides == {"intermediate_size": 320}
    # gemma3 (FFN 384) father, qwen3 (FFN 256) mother: mother padded, config unchanged.
    plan = breed.plan_breed(section(parents["gemma3"], parents["qwen3"]))
    down = by_name(plan)["model.layers.1.mlp.down_proj.weight"]
    assert down.shape == (128, 384) and down.models[0].pad_to is None and down.models[1].pad_to == (128, 384)
    assert plan.config_overrides == {}
    assert any("FFN norm layouts differ" in n for n in plan.notes)


def test_hidden_size_mismatch_names_both_shapes(parents):
    with pytest.raises(PlanError, match=r"hidden-size mismatch: father .* \[\d+, \d+\] vs mother .* \[\d+, \d+\]"):
        breed.plan_breed(section(parents["qwen3"], parents["narrow"]))


def test_hybrid_mother_attention_missing_layers_noted(parents):
    # Blending attention from a hybrid mother: its linear-attention layers have no k_proj (Qwen3.5 q_proj is gated, twice as tall).
    plan = breed.plan_breed(section(parents["qwen3"], parents["qwen3_5"], attn_k={"t": 0.5}))
    q = [t for t in plan.tensors if t.role == "attn_k"]
    assert [t.method for t in sorted(q, key=lambda t: t.layer)] == ["passthrough"] * 3 + ["linear"]
    assert any("attn_k" in n and "linear-attention" in n for n in plan.notes)


def test_methods_map_t(parents):
    f, m = parents["qwen3"], parents["llama"]
    tp = by_name(breed.plan_breed(section(f, m, ffn_up={"method": "slerp", "t": 0.4})))["model.layers.0.mlp.up_proj.weight"]
    assert tp.base.parent == f and tp.models[0].parent == m and tp.params["t"] == 0.4
    tp = by_name(breed.plan_breed(section(f, m, mlp={"method": "ties", "t": 0.7, "density": 0.5})))["model.layers.0.mlp.up_proj.weight"]
    assert tp.base.parent == f and tp.model_params[0]["weight"] == 0.7 and tp.model_params[0]["density"] == 0.5
    della = {"method": "della", "t": 0.6, "density": 0.5, "epsilon": 0.1}
    tp = by_name(breed.plan_breed(section(f, m, mlp=della)))["model.layers.0.mlp.up_proj.weight"]
    assert tp.base.parent == f and tp.model_params[0] == {"weight": 0.6, "density": 0.5, "epsilon": 0.1}
    with pytest.raises(PlanError, match="t must be 0"):
        breed.plan_breed(section(f, m, mlp={"method": "passthrough", "t": 0.5}))


def test_explicit_layer_map(parents):
    sec = breed.BreedSection(father=parents["qwen3"], mother=parents["llama"], blend={"mlp": {"t": 0.5}},
                             layer_map=[2, None, 0, 1])
    plan = by_name(breed.plan_breed(sec))
    assert plan["model.layers.0.mlp.up_proj.weight"].models[1].tensor == "model.layers.2.mlp.up_proj.weight"
    assert plan["model.layers.1.mlp.up_proj.weight"].method == "passthrough"
    with pytest.raises(PlanError, match="list of 4 mother layers"):
        breed.plan_breed(breed.BreedSection(father=parents["qwen3"], mother=parents["llama"], blend={"mlp": {"t": 0.5}}, layer_map=[0, 1]))


def test_multimodal_father_plan(parents):
    f = parents["gemma4_mm"]
    plan = breed.plan_breed(section(f, parents["qwen3_5"]))
    assert plan.config_overrides == {"text_config": {"intermediate_size": 256}}
    tps = by_name(plan)
    up = tps["model.language_model.layers.5.mlp.up_proj.weight"]
    assert up.method == "linear" and up.models[1].tensor == "model.layers.3.mlp.up_proj.weight"
    vision = [t for t in plan.tensors if "vision" in t.name]
    assert vision and all(t.method == "passthrough" and t.role == "other" and t.layer is None for t in vision)
    assert all(t.models[0].pad_to is None for t in vision)


# --- children on disk --------------------------------------------------------------------------


def _child(plan, out):
    from darwin_stream.api import merge

    merge(plan, out)
    from safetensors import safe_open

    tensors = {}
    for p in sorted(out.glob("*.safetensors")):
        with safe_open(str(p), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return tensors


def _pad(x: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    out[tuple(slice(0, s) for s in x.shape)] = x.double()
    return out


def test_gemma4_x_qwen35_child(parents, tmp_path):
    f, m = parents["gemma4"], parents["qwen3_5"]
    genes = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    plan = breed.plan_breed(section(f, m, mlp={"method": "linear", "t": genes}))
    child = _child(plan, tmp_path / "child")
    father, mother = open_parent(f), open_parent(m)
    lmap = [0, 1, 1, 2, 2, 3]
    for name in father.tensors:
        if not any(name.endswith(s) for s in FFN):
            assert torch.equal(child[name], father.read(name)), name  # attention, norms, embeddings: bit-identical
            continue
        i = int(name.split(".")[2])
        suffix = name.split(f"layers.{i}.")[1]
        shape = child[name].shape
        expected = (1 - genes[i]) * _pad(father.read(name), shape) + genes[i] * _pad(
            mother.read(f"model.layers.{lmap[i]}.{suffix}"), shape)
        torch.testing.assert_close(child[name].double(), expected, rtol=8e-3, atol=1e-6)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["intermediate_size"] == 256
    fcfg = open_parent(f).config
    assert {k: v for k, v in cfg.items() if k not in ("intermediate_size", "dtype", "torch_dtype")} == {
        k: v for k, v in fcfg.items() if k not in ("intermediate_size", "dtype", "torch_dtype")}


def test_t_zero_child_equals_father_and_generates(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    f = parents["gemma4"]
    plan = breed.plan_breed(section(f, parents["qwen3_5"], mlp={"method": "linear", "t": [0.0] * 6}))
    _child(plan, tmp_path / "child")
    fa = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)
    ch = AutoModelForCausalLM.from_pretrained(tmp_path / "child", dtype=torch.float32)
    assert ch.config.intermediate_size == 256  # padded, and still the father's function
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ch(ids).logits, fa(ids).logits, rtol=1e-4, atol=1e-4)
        out = ch.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_multimodal_father_child(parents, tmp_path):
    f = parents["gemma4_mm"]
    plan = breed.plan_breed(section(f, parents["qwen3_5"], mlp={"method": "linear", "t": 0.5}))
    child = _child(plan, tmp_path / "child")
    father = open_parent(f)
    outside = [n for n in father.tensors if ".language_model.layers." not in n]
    assert any("vision_tower" in n for n in outside)
    for n in outside:
        assert torch.equal(child[n], father.read(n)), n
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    fcfg = json.loads(json.dumps(father.config))
    assert cfg["text_config"]["intermediate_size"] == 256
    fcfg["text_config"]["intermediate_size"] = 256
    for c in (cfg, fcfg):
        c.pop("dtype", None), c.pop("torch_dtype", None), c["text_config"].pop("dtype", None)
    assert cfg == fcfg
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "child", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_breed_manifest_through_library(parents, tmp_path):
    import darwin_stream

    f, m = parents["gemma4"], parents["qwen3_5"]
    path = tmp_path / "breed.yaml"
    path.write_text(f"breed:\n  father: {f}\n  mother: {m}\n  blend:\n    mlp: {{method: linear, t: {{gradient: [0.0, 0.5]}}}}\n")
    darwin_stream.merge(str(path), tmp_path / "child")
    card = (tmp_path / "child" / "README.md").read_text()
    assert "activations differ" in card and "gradient" in card
    assert json.loads((tmp_path / "child" / "config.json").read_text())["intermediate_size"] == 256
