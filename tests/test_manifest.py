"""Manifest parsing: real mergekit configs load unchanged, and every bad input is one line naming its field."""

from __future__ import annotations

import numpy as np
import pytest

from darwin_stream.errors import ManifestError
from darwin_stream.manifest import (
    Conditional,
    evaluate,
    interpolate,
    load_manifest,
    parse_manifest,
    parse_size,
)

LINEAR = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

SLERP = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

DARE_TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
"""

PASSTHROUGH = """
slices:
  - sources:
    - model: meta-llama/Meta-Llama-3-8B-Instruct
      layer_range: [0, 24]
  - sources:
    - model: meta-llama/Meta-Llama-3-8B-Instruct
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""


def _err(text: str) -> str:
    with pytest.raises(ManifestError) as e:
        parse_manifest(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("manifest: ")
    return msg


def test_linear_config():
    m = parse_manifest(LINEAR)
    assert m.merge_method == "linear"
    assert [im.model for im in m.models] == [
        "psmathur/orca_mini_v3_13b",
        "WizardLM/WizardLM-13B-V1.2",
        "garage-bAInd/Platypus2-13B",
    ]
    assert m.models[1].parameters == {"weight": 0.3}
    assert m.dtype == "F16" and m.out_code == "F16"


def test_slerp_config_with_filtered_gradients():
    m = parse_manifest(SLERP)
    assert m.models is None and len(m.slices) == 1
    assert m.slices[0].sources[1].layer_range == (0, 40)
    assert m.base_model == "psmathur/orca_mini_v3_13b"
    assert m.parameters["t"] == [
        Conditional("self_attn", (0.0, 0.5, 0.3, 0.7, 1.0)),
        Conditional("mlp", (1.0, 0.5, 0.7, 0.3, 0.0)),
        Conditional(None, 0.5),
    ]


def test_ties_and_dare_ties_configs():
    m = parse_manifest(TIES)
    assert m.models[0].parameters["density"] == (1.0, 0.7, 0.1)
    assert m.models[2].parameters["weight"] == [Conditional("mlp", 0.5), Conditional(None, 0.0)]
    assert m.parameters == {"normalize": True, "int8_mask": True}
    d = parse_manifest(DARE_TIES)
    assert d.models[0].parameters is None and d.dtype == "BF16"


def test_passthrough_slices():
    m = parse_manifest(PASSTHROUGH)
    assert [s.sources[0].layer_range for s in m.slices] == [(0, 24), (8, 32)]


def test_example_manifests_parse():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("manifests").glob("*.yaml"))
    assert files
    for f in files:
        load_manifest(f)


def test_load_from_path_and_text(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(LINEAR)
    m, text = load_manifest(p)
    assert text == LINEAR and m.merge_method == "linear"
    m2, _ = load_manifest(str(p))
    assert m2 == m
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.yaml")


def test_darwin_section_and_sizes():
    m = parse_manifest(LINEAR + "darwin: {memory_budget: 256MiB, shard_size: 2GB, seed: 7, device: cuda}\n")
    assert m.darwin.memory_budget == 256 * 2**20
    assert m.darwin.shard_size == 2 * 10**9
    assert (m.darwin.seed, m.darwin.device, m.darwin.format) == (7, "cuda", "safetensors")
    assert parse_size("1GiB") == 2**30 and parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5KB") == 1500 and parse_size(4096) == 4096 and parse_size("10kib") == 10240
    defaults = parse_manifest(LINEAR).darwin
    assert defaults.memory_budget == 2**30 and defaults.shard_size == 5 * 10**9
    for bad in ("1 potato", "-1GB", "0", "GB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_out_dtype_precedence():
    assert parse_manifest(LINEAR + "out_dtype: bfloat16\n").out_code == "BF16"
    assert parse_manifest(LINEAR + "out_dtype: bfloat16\ndarwin: {out_dtype: float32}\n").out_code == "F32"
    no_dtype = LINEAR.replace("dtype: float16\n", "")
    assert parse_manifest(no_dtype).out_code is None


def test_tokenizer_forms():
    parse_manifest(LINEAR + "tokenizer_source: base\n")
    parse_manifest(LINEAR + "tokenizer_source: null\n")
    parse_manifest(LINEAR + "tokenizer:\n  source: base\n")
    assert parse_manifest(LINEAR + "tokenizer_source: union\n").tokenizer_source == "union"
    assert parse_manifest(LINEAR + "tokenizer: {tokens: {x: {source: {kind: zero}}}}\n").tokenizer.source == "union"
    assert "tokenizer_source: expected union, base" in _err(LINEAR + "tokenizer_source: [1]\n")
    assert "tokenizer.tokens.x.force: force needs a source" in _err(LINEAR + "tokenizer:\n  tokens: {x: {force: true}}\n")
    assert "give exactly one of token or token_id" in _err(
        LINEAR + "tokenizer:\n  tokens: {x: {source: {kind: model_token, model: a}}}\n")
    assert "kind zero or model_token" in _err(LINEAR + "tokenizer:\n  tokens: {x: {source: {kind: mean}}}\n")
    assert parse_manifest(LINEAR + "chat_template: chatml\n").chat_template == "chatml"
    assert parse_manifest(LINEAR + "chat_template: auto\n").chat_template == "auto"
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert parse_manifest(LINEAR + f"chat_template: '{jinja}'\n").chat_template == jinja


def test_numeric_strings_are_numbers():
    # PyYAML reads 1e-3 as a string; mergekit's pydantic coerces it, so we do too.
    m = parse_manifest(LINEAR.replace("weight: 0.3", "weight: 3e-1"))
    assert m.models[1].parameters["weight"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (("weight: 0.3", "weight: abc"), "models[1].parameters.weight:", "got 'abc'"),
        (("weight: 0.3", "weight: .nan"), "models[1].parameters.weight:", "finite"),
        (("weight: 0.3", "weight: .inf"), "models[1].parameters.weight:", "finite"),
        (("weight: 0.3", "weight: -.inf"), "models[1].parameters.weight:", "finite"),
        (("weight: 0.3", "weight: nan"), "models[1].parameters.weight:", "finite"),
        (("weight: 0.3", "weight: [0, .nan]"), "models[1].parameters.weight[1]:", "finite"),
        (
            ("weight: 0.3", "weight: [{filter: mlp, value: .inf}]"),
            "models[1].parameters.weight[0].value:",
            "finite",
        ),
        (
            ("weight: 0.3", "weight: [{filter: mlp, valu: 1}]"),
            "models[1].parameters.weight[0]:",
            "unknown key",
        ),
        (("weight: 0.3", "weight: []"), "models[1].parameters.weight:", "at least one"),
        (("weight: 0.3", "weight: {a: 1}"), "models[1].parameters.weight:", "unknown key"),
        (("weight: 0.3", "wieght: 0.3"), "models[1].parameters.wieght:", "unknown parameter for linear"),
        (("    parameters:\n      weight: 0.3", "    params: {}"), "models[1].params:", "unknown key"),
        (("merge_method: linear", "merge_method: lineer"), "merge_method:", "'lineer'"),
        (("merge_method: linear", "merge_methd: linear"), "merge_methd:", "unknown key"),
        (("dtype: float16", "dtype: int4"), "dtype:", "bfloat16"),
        (("dtype: float16", "darwin: {memory_budget: lots}"), "darwin.memory_budget:", "1GiB"),
        (("dtype: float16", "darwin: {device: tpu}"), "darwin.device:", "'cuda'"),
        (("dtype: float16", "darwin: {format: gguf}"), "darwin.format:", "'zarr'"),
        (("dtype: float16", "darwin: {seed: x}"), "darwin.seed:", "integer"),
        (("dtype: float16", "darwin: {shards: 1}"), "darwin.shards:", "unknown key"),
        (("model: psmathur/orca_mini_v3_13b", "model: a+my/lora+x"), "models[0].model:", "one '+'"),
        (("model: psmathur/orca_mini_v3_13b", "model: {model: a, lora: 3}"), "models[0].model:", "path or repo id"),
        (("model: psmathur/orca_mini_v3_13b", "model: 3"), "models[0].model:", "path or repo id"),
        (("dtype: float16", "modules: {text: {}}"), "modules:", "not supported"),
        (("dtype: float16", "chat_template: chat-ml"), "chat_template:", "unknown chat template 'chat-ml'"),
    ],
)
def test_bad_inputs_name_their_field(edit, field, expected):
    old, new = edit
    assert old in LINEAR
    msg = _err(LINEAR.replace(old, new, 1) if old != "weight: 0.3" else LINEAR.replace(old, new))
    assert f"manifest: {field}" in msg
    assert expected in msg


def test_unknown_method_lists_known_ones():
    msg = _err(LINEAR.replace("merge_method: linear", "merge_method: frankenstein"))
    assert "frankenstein" in msg and "linear" in msg and "slerp" in msg and "ties" in msg


def test_method_level_parameter_is_not_per_model():
    m = parse_manifest(
        SLERP.replace("merge_method: slerp", "merge_method: slerp").replace(
            "        layer_range: [0, 40]\nmerge",
            "        layer_range: [0, 40]\n        parameters: {t: 0.3}\nmerge",
        )
    )  # mergekit accepts it and reads only the method-level t: a warning says so
    assert m.warnings == ["slices[0].sources[1].parameters.t: ignored, slerp reads t only for the whole merge or "
                          "slice, not per model (mergekit ignores it too)"]


def test_structure_errors():
    assert "give exactly one of models or slices" in _err("merge_method: linear\n")
    assert "models:" in _err("merge_method: linear\nmodels: []\n")
    assert "merge_method: required" in _err("models: [{model: a}]\n")
    assert "expected a mapping" in _err("- a\n- b\n")
    msg = _err("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n")
    assert "slices[0].sources[0].layer_range: expected [start, end]" in msg
    msg = _err("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0]}]}]\n")
    assert "slices[0].sources[0].layer_range" in msg
    assert "slices[0].sources:" in _err("merge_method: passthrough\nslices: [{sources: []}]\n")
    assert "models[0].model: required field missing" in _err(
        "merge_method: linear\nmodels: [{parameters: {}}]\n"
    )


def test_malformed_yaml_names_the_line():
    msg = _err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2\n")
    assert msg.startswith("manifest: invalid YAML at line ")
    msg = _err("merge_method: linear\n  models: x\n")
    assert "invalid YAML at line 2" in msg


def test_yaml_never_constructs_python_objects():
    assert "invalid YAML" in _err("merge_method: !!python/object/apply:os.system ['true']\n")


def test_breed_and_evolve_sections():
    m = parse_manifest(
        "breed:\n  father: a\n  mother: b\n  blend: {mlp: {method: linear, t: 0.3}}\n"
        "evolve:\n  genes: [{param: t, filter: mlp, granularity: layer}]\n  fitness: {tasks: [f.jsonl]}\n"
    )
    assert m.breed.father == "a" and m.evolve.genes[0].granularity == "layer"
    assert m.evolve.search.popsize == 8 and m.evolve.backend.name == "hf"
    assert _err("breed:\n  fathr: a\n  mother: b\n").startswith("manifest: breed.")
    assert _err("merge_method: linear\nmodels: [{model: a}]\nevolve: {x: 1}\n").startswith("manifest: evolve")


# --- gradients and filters, evaluated as mergekit's evaluate_setting does ---


@pytest.mark.parametrize(
    "values", [[0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], [0.2], [3, -1], [0, 1, 0, 1, 0, 1, 0.25]]
)
@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 7, 28, 40])
def test_gradient_equals_np_interp(values, n_layers):
    anchors = np.linspace(0, 1, len(values))
    for i in range(n_layers):
        t = i / (n_layers - 1) if n_layers > 1 else 1.0
        want = float(np.interp(t, anchors, values))
        assert interpolate(tuple(float(v) for v in values), t) == pytest.approx(want, abs=1e-12)


def test_filters_first_match_wins_and_fall_through():
    setting = [Conditional("self_attn", 0.1), Conditional("mlp", (0.0, 1.0)), Conditional(None, 0.5)]

    def name_matcher(name):
        return lambda f: f in name

    assert evaluate(setting, name_matcher("model.layers.3.self_attn.q_proj.weight"), 0.0) == 0.1
    assert evaluate(setting, name_matcher("model.layers.3.mlp.up_proj.weight"), 0.25) == 0.25
    assert evaluate(setting, name_matcher("model.norm.weight"), 0.9) == 0.5
    # No fallback entry and no match: None, so the caller falls back to a less specific level.
    assert evaluate(setting[:2], name_matcher("model.norm.weight"), 0.0) is None
    assert evaluate([Conditional("*", 2.0)], name_matcher("x"), 0.0) == 2.0
