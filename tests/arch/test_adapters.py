"""Adapters: real tensor names (copied from tiny models built with transformers 5.19) -> (layer, role)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from darwin_stream import arch
from darwin_stream.arch import adapters, cli
from darwin_stream.errors import ManifestError


def roles(config: dict, names: list[str]) -> dict[str, tuple[int | None, str]]:
    return {n: (r.layer, r.role) for n in names for r in [arch.classify(n, config)]}


@pytest.mark.parametrize(("model_type", "adapter"), [
    ("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen3_moe", "qwen3_moe"),
    ("qwen3_5_text", "qwen3_5"), ("qwen3_5", "qwen3_5"), ("gemma2", "gemma2"), ("gemma3_text", "gemma3"),
    ("gemma3", "gemma3"), ("gemma4_text", "gemma4"), ("gemma4", "gemma4"), ("phi3", "phi3"), ("gpt2", "pattern"),
])
def test_detect(model_type, adapter):
    assert arch.adapter_for({"model_type": model_type}).name == adapter


def test_detect_multimodal_by_text_config_and_architectures():
    assert arch.adapter_for({"model_type": "x", "text_config": {"model_type": "gemma4_text"}}).name == "gemma4"
    assert arch.adapter_for({"architectures": ["Qwen3_5ForConditionalGeneration"]}).name == "qwen3_5"


def test_llama_like_post_attention_norm_is_the_ffn_norm():
    got = roles({"model_type": "qwen3"}, [
        "model.layers.3.post_attention_layernorm.weight", "model.layers.3.input_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight", "model.layers.3.mlp.gate_proj.weight", "model.norm.weight",
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.bias"])
    assert got == {
        "model.layers.3.post_attention_layernorm.weight": (3, "ffn_norm"),
        "model.layers.3.input_layernorm.weight": (3, "attn_norm"),
        "model.layers.3.self_attn.q_norm.weight": (3, "attn_q_norm"),
        "model.layers.3.mlp.gate_proj.weight": (3, "ffn_gate"),
        "model.norm.weight": (None, "final_norm"),
        "lm_head.weight": (None, "lm_head"),
        "model.embed_tokens.weight": (None, "embed"),
        "model.layers.3.self_attn.q_proj.bias": (3, "attn_q"),
    }


def test_gemma4_text_and_multimodal():
    names = [
        "{p}layers.2.post_attention_layernorm.weight", "{p}layers.2.pre_feedforward_layernorm.weight",
        "{p}layers.2.post_feedforward_layernorm.weight", "{p}layers.2.input_layernorm.weight",
        "{p}layers.2.layer_scalar", "{p}layers.2.per_layer_input_gate.weight", "{p}layers.2.per_layer_projection.weight",
        "{p}layers.2.post_per_layer_input_norm.weight", "{p}embed_tokens_per_layer.weight",
        "{p}per_layer_model_projection.weight", "{p}per_layer_projection_norm.weight", "{p}layers.2.mlp.down_proj.weight",
    ]
    want = ["attn_post_norm", "ffn_norm", "ffn_post_norm", "attn_norm", "layer_scalar", "per_layer_input",
            "per_layer_input", "per_layer_input_norm", "per_layer_embed", "per_layer_proj", "per_layer_proj", "ffn_down"]
    for prefix, cfg in (("model.", {"model_type": "gemma4_text"}),
                        ("model.language_model.", {"model_type": "gemma4", "text_config": {"model_type": "gemma4_text"}})):
        got = [arch.classify(n.format(p=prefix), cfg).role for n in names]
        assert got == want
    cfg = {"model_type": "gemma4"}
    # The vision tower has layers and an mlp too, but it is outside the text model: "other", no layer.
    for n in ("model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight",
              "model.vision_tower.patch_embedder.position_embedding_table", "model.embed_vision.embedding_projection.weight"):
        assert arch.classify(n, cfg) == arch.TensorRole(None, "other")


def test_qwen35_hybrid_and_moe_and_phi3():
    q = {"model_type": "qwen3_5_text"}
    assert arch.classify("model.layers.0.linear_attn.in_proj_qkv.weight", q) == arch.TensorRole(0, "linear_attn")
    assert arch.classify("model.layers.0.linear_attn.A_log", q).group == "self_attn"
    assert arch.classify("model.visual.blocks.0.mlp.linear_fc1.weight", {"model_type": "qwen3_5"}).role == "other"
    assert arch.classify("mtp.layers.0.mlp.gate_proj.weight", q).role == "other"
    moe = {"model_type": "qwen3_moe"}
    assert arch.classify("model.layers.1.mlp.gate.weight", moe).role == "moe_router"
    assert arch.classify("model.layers.1.mlp.experts.7.gate_proj.weight", moe).role == "moe_expert"
    phi = {"model_type": "phi3"}
    assert arch.classify("model.layers.0.self_attn.qkv_proj.weight", phi).role == "attn_qkv"
    assert arch.classify("model.layers.0.mlp.gate_up_proj.weight", phi).role == "ffn_gate_up"
    assert arch.ROLE_GROUPS["attn_qkv"] == "self_attn" and arch.ROLE_GROUPS["ffn_gate_up"] == "mlp"


def test_filters_resolve_through_roles():
    n = "model.layers.0.mlp.gate_up_proj.weight"
    r = arch.classify(n, {"model_type": "phi3"})
    assert arch.matches_filter(n, r, "mlp") and arch.matches_filter(n, r, "ffn_gate_up")
    n = "model.layers.0.linear_attn.conv1d.weight"
    assert arch.matches_filter(n, arch.classify(n, {"model_type": "qwen3_5_text"}), "self_attn")
    assert not arch.matches_filter(n, arch.classify(n, {"model_type": "qwen3_5_text"}), "mlp")


def test_pattern_fallback():
    assert arch.classify("transformer.h.4.mlp.up_proj.weight", {"model_type": "toy"}) == arch.TensorRole(4, "ffn_up")
    assert arch.classify("model.vision_model.layers.0.mlp.up_proj.weight", {"model_type": "toy"}).role == "other"
    assert arch.classify("model.layers.1.self_attn.q_proj.weight") == arch.TensorRole(1, "attn_q")


TOY_ADAPTER = r"""
adapters:
  - name: toy
    model_types: [toy]
    layers: '^backbone\.blocks\.(\d+)\.(.+)$'
    roles:
      'attn\.wq\.': attn_q
      'ff\.w_in\.': ffn_up
      'ff\.w_out\.': ffn_down
      'ln_attn\.': attn_norm
    globals:
      '^backbone\.tok\.weight$': embed
"""


@pytest.fixture()
def toy(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    save_file({"backbone.tok.weight": torch.zeros(8, 4), "backbone.blocks.0.attn.wq.weight": torch.zeros(4, 4),
               "backbone.blocks.0.ff.w_in.weight": torch.zeros(6, 4), "backbone.blocks.1.ff.w_out.weight": torch.zeros(4, 6),
               "backbone.blocks.1.ln_attn.weight": torch.zeros(4), "backbone.blocks.1.mystery": torch.zeros(2)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 2}))
    (tmp_path / "adapters.yaml").write_text(TOY_ADAPTER)
    yield d
    adapters.USER.clear()


def test_yaml_adapter(toy, tmp_path, capsys):
    adapters.register_adapters(tmp_path / "adapters.yaml")
    cfg = {"model_type": "toy"}
    assert arch.classify("backbone.blocks.1.ff.w_out.weight", cfg) == arch.TensorRole(1, "ffn_down")
    assert arch.classify("backbone.blocks.1.mystery", cfg) == arch.TensorRole(1, "layer_other")
    assert arch.classify("backbone.tok.weight", cfg) == arch.TensorRole(None, "embed")
    table = arch.inspect(str(toy))
    assert "adapter: toy" in table and "ffn_down" in table and "4x6" in table


def test_yaml_adapter_errors():
    with pytest.raises(ManifestError, match=r"adapters\[bad\]\.roles\['x'\]: unknown role 'mlp_thing'"):
        adapters.register_adapters([{"name": "bad", "roles": {"x": "mlp_thing"}}])
    with pytest.raises(ManifestError, match="two groups"):
        adapters.register_adapters([{"name": "bad", "layers": r"layers\.\d+\."}])
    with pytest.raises(ManifestError, match="extends: no adapter"):
        adapters.register_adapters([{"name": "bad", "extends": "nope"}])


def test_inspect_cli(toy, tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser()
    cli.configure(p)
    assert cli.run(p.parse_args([str(toy), "--adapters", str(tmp_path / "adapters.yaml"), "--json", "--layer", "1"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"] == "toy" and {r["role"] for r in out["tensors"]} == {"ffn_down", "attn_norm", "layer_other"}
