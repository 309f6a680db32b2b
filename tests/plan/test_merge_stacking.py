"""Stacked children (passthrough slices, a frankenmerge): no `scale` needed, and a config that loads."""

from __future__ import annotations

import json

import pytest
import torch

import darwin_stream as ds
from darwin_stream.plan.merge import stacked_config
from tests.helpers import read_all

STACK = """\
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
dtype: bfloat16
"""


def test_every_per_layer_list_follows_the_stacked_layers():
    a = {"num_hidden_layers": 4, "layer_types": ["s", "s", "s", "f"], "no_rope_layers": [1, 0, 1, 0],
         "mlp_only_layers": [0, 3], "eos_token_id": [1, 2], "hidden_size": 8}
    b = {**a, "layer_types": ["S", "S", "S", "F"], "no_rope_layers": [0, 0, 0, 1], "mlp_only_layers": [2]}
    layers = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    got = stacked_config(a, layers)
    assert got == {"num_hidden_layers": 6, "layer_types": ["s", "s", "s", "S", "S", "F"],
                   "no_rope_layers": [1, 0, 1, 0, 0, 1], "mlp_only_layers": [0, 4]}  # eos_token_id is not per layer


def test_a_multimodal_config_stacks_its_text_section():
    text = {"num_hidden_layers": 2, "layer_types": ["x", "y"]}
    cfg = {"model_type": "mm", "text_config": text, "vision_config": {"num_hidden_layers": 2}}
    got = stacked_config(cfg, [(cfg, 0), (cfg, 1), (cfg, 1)])
    assert got == {"text_config": {"num_hidden_layers": 3, "layer_types": ["x", "y", "y"]}}


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_5"])
def test_a_stacked_child_without_scale_loads_and_generates(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from darwin_stream.demo import build_model

    a, b = build_model(tmp_path / "a", arch, seed=1), build_model(tmp_path / "b", arch, seed=2)
    ds.merge(STACK.format(a=a, b=b), tmp_path / "child")
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    types = [json.loads((p / "config.json").read_text())["layer_types"] for p in (a, b)]
    assert cfg["num_hidden_layers"] == 6 and cfg["layer_types"] == types[0][0:3] + types[1][1:4]
    child, pb = read_all(tmp_path / "child"), read_all(b)
    for name, t in pb.items():  # child layer 3 + k is b's layer 1 + k, byte for byte (no scale: a copy)
        if ".layers.2." in name:
            assert torch.equal(child[name.replace(".layers.2.", ".layers.4.")], t), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    assert model.config.num_hidden_layers == 6
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=1, do_sample=False)
    assert out.shape == (1, 4)
