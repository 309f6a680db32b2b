"""build_plan against tiny real parents: mergekit's gradient, filter and base semantics, and plan errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from darwin_stream import demo
from darwin_stream.errors import PlanError, SourceError
from darwin_stream.manifest import parse_manifest
from darwin_stream.plan import Plan, build_plan, format_plan, layer_t, tensor_seed

ATTN = [0, 0.5, 0.3, 0.7, 1]
MLP = [1, 0.5, 0.7, 0.3, 0]


@pytest.fixture(scope="module")
def par(tmp_path_factory, tiny_parents):
    """Parents: a, b, c (tiny qwen3, 4 layers), wide (other FFN size), holey (a without one tensor)."""
    root = tmp_path_factory.mktemp("plan_parents")
    out = {
        "a": str(tiny_parents[0]),
        "b": str(tiny_parents[1]),
        "c": str(demo.build_model(root / "c", seed=3)),
    }
    out["wide"] = str(demo.build_model(root / "wide", seed=4, overrides={"intermediate_size": 192}))
    holey = root / "holey"
    holey.mkdir()
    tensors = {}
    for f in sorted(tiny_parents[0].glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(holey / "model.safetensors"))
    shutil.copy(tiny_parents[0] / "config.json", holey / "config.json")
    out["holey"] = str(holey)
    return out


def plan_of(text: str, **fmt) -> Plan:
    return build_plan(parse_manifest(text.format(**fmt)), text)


def want_t(name: str, t: float) -> float:
    """An independent reading of the demo's t: substring filters in order, np.interp over anchors."""
    for needle, values in (("self_attn", ATTN), ("mlp", MLP)):
        if needle in name:
            return float(np.interp(t, np.linspace(0, 1, len(values)), values))
    return 0.5


SLERP = """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_slerp_gradients_per_layer(par):
    plan = plan_of(SLERP, **par)
    names = [t.name for t in plan.tensors]
    assert len(names) == len(set(names))
    assert plan.parents == {"father": par["a"], "mother": par["b"]}
    assert plan.config_from == plan.tokenizer_from == "father"
    layers = set()
    for t in plan.tensors:
        assert t.method == "slerp" and t.dtype == "BF16"
        assert t.base.parent == "father" and t.base.tensor == t.name
        assert [(r.parent, r.tensor) for r in t.models] == [("mother", t.name)]
        assert t.model_params == ({},)
        if t.layer is None:
            # Outside the layers mergekit evaluates gradients at t = 0; no filter matches these names.
            assert t.params["t"] == 0.5, t.name
        else:
            layers.add(t.layer)
            assert t.params["t"] == pytest.approx(want_t(t.name, t.layer / 3), abs=1e-12), t.name
    assert layers == {0, 1, 2, 3}
    by = {t.name: t for t in plan.tensors}
    assert by["model.layers.1.self_attn.q_proj.weight"].params["t"] == pytest.approx(0.5 * 2 / 3 + 0.3 / 3)
    assert by["model.layers.3.mlp.down_proj.weight"].params["t"] == 0.0
    assert by["model.layers.2.input_layernorm.weight"].params["t"] == 0.5
    assert by["model.layers.0.self_attn.q_norm.weight"].role == "attn_q_norm"


def test_slerp_in_slices_form_plans_the_same(par):
    sliced = """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
    p1, p2 = plan_of(SLERP, **par), plan_of(sliced, **par)
    assert p1.tensors == p2.tensors
    assert p2.config_overrides["num_hidden_layers"] == 4


def test_gradient_positions_per_slice():
    assert [layer_t(i, 4) for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert layer_t(0, 1) == 1.0  # mergekit: a one-layer slice sits at the end of the gradient


def test_linear_weights_and_top_level_fallback(par):
    text = """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters:
      weight: [0.2, 0.8]
  - model: {b}
  - model: {c}
    parameters:
      weight:
        - filter: mlp
          value: 0.9
parameters:
  weight: 0.1
  normalize: false
"""
    plan = plan_of(text, **par)
    for t in plan.tensors:
        assert t.base is None and [r.parent for r in t.models] == ["father", "mother", "c"]
        assert t.params == {"normalize": False}
        wa, wb, wc = (mp["weight"] for mp in t.model_params)
        pos = 0.0 if t.layer is None else t.layer / 3
        assert wa == pytest.approx(0.2 + 0.6 * pos)
        assert wb == 0.1  # no per-model value: the top-level parameter applies
        assert wc == (0.9 if "mlp" in t.name else 0.1)  # no filter matched: falls back to the top level
        assert t.dtype == "BF16"  # no dtype, no out_dtype: the tensor keeps its own


def test_ties_base_listed_is_not_an_input_and_defaults_fill(par):
    text = """
merge_method: ties
base_model: {a}
models:
  - model: {a}
  - model: {b}
    parameters:
      density: [1, 0.7, 0.3]
      weight: 0.5
  - model: {c}
    parameters:
      weight: 0.5
parameters:
  int8_mask: true
dtype: bfloat16
out_dtype: float32
"""
    plan = plan_of(text, **par)
    for t in plan.tensors:
        assert t.base.parent == "father" and [r.parent for r in t.models] == ["mother", "c"]
        assert t.params == {"int8_mask": True, "normalize": True, "rescale": False, "lambda": 1.0}
        pos = 0.0 if t.layer is None else t.layer / 3
        want = float(np.interp(pos, [0, 0.5, 1], [1, 0.7, 0.3]))
        assert t.model_params[0] == {"weight": 0.5, "density": pytest.approx(want, abs=1e-12)}
        assert t.model_params[1] == {"weight": 0.5, "density": 1.0}
        assert t.dtype == "F32"
    assert plan.out_dtype == "F32" and plan.options["dtype"] == "BF16"


def test_task_arithmetic_adds_an_unlisted_base(par):
    text = "merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
    plan = plan_of(text, **par)
    assert all(t.base.parent == "father" and [r.parent for r in t.models] == ["mother"] for t in plan.tensors)


def test_role_filters_resolve_through_arch(par):
    text = SLERP.replace("filter: self_attn", "filter: attn_q")  # a canonical role name, not a substring
    by = {t.name: t for t in plan_of(text, **par).tensors}
    assert by["model.layers.0.self_attn.q_proj.weight"].params["t"] == 0.0
    assert by["model.layers.0.self_attn.k_proj.weight"].params["t"] == 0.5


def test_seeds_are_stable_and_per_tensor(par):
    text = SLERP + "darwin: {{seed: 7}}\n"
    p1, p2 = plan_of(text, **par), plan_of(text, **par)
    seeds = [t.seed for t in p1.tensors]
    assert seeds == [t.seed for t in p2.tensors]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert p1.tensors[0].seed == tensor_seed(7, p1.tensors[0].name) != tensor_seed(8, p1.tensors[0].name)


def test_passthrough_slices_renumber(par):
    text = """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
"""
    plan = plan_of(text, **par)
    assert plan.config_overrides["num_hidden_layers"] == 6
    assert plan.config_overrides["layer_types"] == ["full_attention"] * 6  # the hybrid-layer list follows
    assert plan.config_from == "father"
    by = {t.name: t for t in plan.tensors}
    assert by["model.embed_tokens.weight"].models[0].parent == "father"
    assert (
        by["lm_head.weight"].models[0].parent == "mother"
    )  # mergekit: post-layer tensors from the last slice
    assert by["model.norm.weight"].models[0].parent == "mother"
    t = by["model.layers.4.mlp.up_proj.weight"]
    assert (t.models[0].parent, t.models[0].tensor, t.layer) == (
        "mother",
        "model.layers.2.mlp.up_proj.weight",
        4,
    )
    t = by["model.layers.1.self_attn.o_proj.weight"]
    assert (t.models[0].parent, t.models[0].tensor) == ("father", "model.layers.1.self_attn.o_proj.weight")
    assert {t.layer for t in plan.tensors} == {None, 0, 1, 2, 3, 4, 5}
    assert all(t.method == "passthrough" and t.base is None for t in plan.tensors)


def test_plan_options_and_json_round_trip(par):
    text = SLERP + "darwin: {{memory_budget: 256MiB, shard_size: 1GB, device: cuda, format: zarr, seed: 3, direct_io: false, allow_nonfinite: true}}\n"
    plan = plan_of(text, **par)
    assert plan.options == {
        "memory_budget": 256 * 2**20,
        "shard_size": 10**9,
        "seed": 3,
        "device": "cuda",
        "format": "zarr",
        "direct_io": False,
        "allow_nonfinite": True,
        "dtype": "BF16",
    }
    assert plan.manifest == text
    back = Plan.from_json(plan.to_json())
    assert back.tensors == plan.tensors and back.options == plan.options
    json.loads(plan.to_json())


def test_format_plan(par):
    plan = plan_of(SLERP, **par)
    out = format_plan(plan)
    lines = out.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "method", "sources", "parameters"]
    row = next(line for line in lines if line.startswith("model.layers.1.self_attn.q_proj.weight "))
    assert (
        "128x128" in row
        and "BF16" in row
        and "slerp" in row
        and "father(base) mother" in row
        and "t=0.4333" in row
    )
    assert f"{plan.nbytes:,} bytes" in lines[-1] and "MiB" in lines[-1]
    assert f"child: {len(plan.tensors)} tensors" in lines[-1]


# --- errors: one line, naming what is wrong ---


def plan_error(text: str, **fmt) -> str:
    with pytest.raises(PlanError) as e:
        plan_of(text, **fmt)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_parent(par, tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        plan_of(SLERP, a=par["a"], b=str(tmp_path / "nowhere"))


def test_missing_tensor(par):
    msg = plan_error(SLERP, a=par["a"], b=par["holey"])
    assert "model.layers.2.mlp.up_proj.weight" in msg and par["holey"] in msg


def test_shape_mismatch_names_both_shapes(par):
    msg = plan_error(SLERP, a=par["a"], b=par["wide"])
    assert "mlp" in msg and "[128, 256]" in msg and "[128, 192]" in msg


def test_slerp_needs_exactly_two(par):
    text = SLERP.replace("  - model: {b}\n", "  - model: {b}\n  - model: {c}\n")
    assert "slerp blends exactly 2 models" in plan_error(text, **par)


def test_base_required(par):
    text = "merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
    assert plan_error(text, **par).startswith("base_model: ties needs a base_model")
    text = "slices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 4]\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\n"
    with pytest.raises(PlanError):
        plan_of(text, **par)


def test_required_parameter_missing(par):
    text = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n"
    msg = plan_error(text, **par)
    assert msg.startswith("models[1].parameters.weight: linear needs weight")
    assert "parameters.t: slerp needs t" in plan_error(
        SLERP.split("parameters:")[0] + "dtype: bfloat16\n", **par
    )


def test_layer_range_beyond_the_model(par):
    text = (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [2, 9]\n"
    )
    assert "slices[0].sources[0].layer_range: [2, 9] is beyond the 4 layers" in plan_error(text, **par)


def test_slice_sources_of_different_lengths(par):
    text = (
        "merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
        "      - model: {a}\n        layer_range: [0, 4]\n      - model: {b}\n        layer_range: [0, 3]\n"
    )
    assert "slices[0]: every source must span the same number of layers" in plan_error(text, **par)


def test_breed_section_is_delegated(par, monkeypatch):
    from darwin_stream.plan import breed

    seen = {}
    monkeypatch.setattr(breed, "plan_breed", lambda m, text: seen.setdefault("plan", (m, text)))
    text = f"breed:\n  father: {par['a']}\n  mother: {par['b']}\n"
    m = parse_manifest(text)
    assert build_plan(m, text) == (m, text)
