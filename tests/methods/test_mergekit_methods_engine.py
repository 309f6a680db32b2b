"""mergekit 0.1.5's other methods through the whole path: YAML -> plan -> engine -> child on disk.

Each merge runs twice, under a budget that keeps every tensor whole and under one so small that the
statistics are split across tasks and 1-D tensors across blocks; the children must be bit-identical,
and equal to the float64 reference (tests/methods/mergekit_reference.py) within the bf16 contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

import darwin_stream
import darwin_stream.api
from darwin_stream import demo, engine
from tests.helpers import read_all
from tests.methods import mergekit_reference as R
from tests.methods.methods_reference import assert_bf16_close, ref_gta

SMALL = 20_000  # bytes: every statistic split across tasks, 1-D tensors across blocks
CHECKED = ("model.layers.1.mlp.up_proj.weight", "model.layers.2.input_layernorm.weight")
Ref = Callable[[torch.Tensor, list[torch.Tensor], int], torch.Tensor]  # (base, models, tensor seed)

DELLA_BODY = (
    "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.75, density: 0.5, epsilon: 0.125}}\n"
    "  - model: {c}\n    parameters: {{weight: 0.5, density: 0.25, epsilon: 0.0625}}\n"
)


def _della(base, models, seed, consensus, normalize):
    masks = [
        R.magprune_mask(m - base, d, e, R.hashed_uniforms(seed, i, base.shape))
        for i, (m, d, e) in enumerate(zip(models, (0.5, 0.25), (0.125, 0.0625), strict=True))
    ]
    return ref_gta(base, models, [0.75, 0.5], masks=masks, consensus=consensus, normalize=normalize, rescale=True)


# method -> (YAML body after merge_method, reference(base, [models], seed) on float tensors)
CASES: dict[str, tuple[str, Ref]] = {
    "nearswap": (
        "base_model: {a}\nmodels:\n  - model: {b}\nparameters: {{t: 0.01}}\n",
        lambda b, ms, seed: R.ref_nearswap(0.01, b, ms[0]),
    ),
    "nuslerp": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.7}}\n",
        lambda b, ms, seed: R.ref_nuslerp(b, ms, [0.3, 0.7]),
    ),
    "nuslerp:no_base": (  # mergekit's optional base: without one, the models themselves are slerped
        "models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n",
        lambda b, ms, seed: R.ref_nuslerp(None, ms, [0.6, 0.4]),
    ),
    "multislerp": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.3}}\n",
        lambda b, ms, seed: R.ref_multislerp(b, ms, [0.5, 0.3]),
    ),
    "della": (DELLA_BODY, lambda b, ms, seed: _della(b, ms, seed, consensus=True, normalize=True)),
    "della_linear": (DELLA_BODY, lambda b, ms, seed: _della(b, ms, seed, consensus=False, normalize=False)),
    "sce": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\nparameters: {{select_topk: 0.3}}\n",
        lambda b, ms, seed: R.ref_sce(b, ms, 0.3),
    ),
    "arcee_fusion": ("base_model: {a}\nmodels:\n  - model: {b}\n", lambda b, ms, seed: R.ref_arcee_fusion(b, ms[0])),
    "ram": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\nparameters: {{epsilon: 0.02}}\n",
        lambda b, ms, seed: R.ref_ram(b, ms, 0.02),
    ),
    "ramplus_tl": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\nparameters: {{epsilon: 0.02, r: 0.5, alpha: 0.3}}\n",
        lambda b, ms, seed: R.ref_ram(b, ms, 0.02, True, 0.5, 0.3),
    ),
    # base_model is one more input to average, as mergekit appends it
    "karcher": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n", lambda b, ms, seed: R.ref_karcher([*ms, b])),
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_parents) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trio")
    c = demo.build_model(root / "c", seed=3)
    return {"a": str(tiny_parents[0]), "b": str(tiny_parents[1]), "c": str(c)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_merges_through_the_engine(trio, tmp_path, name):
    body, ref = CASES[name]
    text = f"merge_method: {name.split(':')[0]}\n" + body.format(**trio) + "dtype: bfloat16\n"
    full = darwin_stream.api.load_plan(text)
    # Only the checked tensors: the whole path, in a fraction of the time of the full child.
    plan = dataclasses.replace(full, tensors=[tp for tp in full.tensors if tp.name in CHECKED])
    workers = engine.worker_count()
    # As small as the engine accepts (it refuses a budget below one row per worker), never larger.
    small_budget = max(SMALL, engine.minimum_budget(plan, workers)[0])
    big, vec = (next(tp for tp in plan.tensors if tp.name == k) for k in CHECKED)
    assert engine.chunk_rows(plan, big, small_budget, workers) < big.shape[0], "the statistic must be split"
    assert engine.block_rows(plan, vec, small_budget, workers) < vec.shape[0], "1-D tensors must be split"
    whole = tmp_path / "whole"
    darwin_stream.merge(plan, whole, memory_budget=2**30)
    small = tmp_path / "small"
    darwin_stream.merge(plan, small, memory_budget=small_budget)
    got, split = read_all(whole), read_all(small)
    assert got.keys() == split.keys() == set(CHECKED)
    for k in got:
        assert torch.equal(got[k].view(torch.int16), split[k].view(torch.int16)), k
    parents = {key: read_all(path) for key, path in trio.items()}
    base_key = "a"
    based = "base_model: {a}" in body
    listed = [key for key in ("a", "b", "c") if "{" + key + "}" in body and not (based and key == "a")]
    for k in CHECKED:
        base = parents[base_key][k].float()
        models = [parents[key][k].float() for key in listed]
        seed = next(tp.seed for tp in plan.tensors if tp.name == k)
        assert_bf16_close(got[k].float(), ref(base, models, seed))


def test_arity_is_checked_at_plan_time(trio):
    from darwin_stream.errors import PlanError

    text = "merge_method: nearswap\nbase_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\nparameters: {{t: 0.1}}\n"
    with pytest.raises(PlanError, match=r"nearswap takes exactly 1 model\(s\) besides the base, got 2"):
        darwin_stream.api.load_plan(text.format(**trio))


@pytest.mark.parametrize("name", sorted(CASES))
def test_yaml_parameters_are_checked_by_name(trio, name):
    from darwin_stream.errors import ManifestError
    from darwin_stream.manifest import parse_manifest

    body, _ = CASES[name]
    text = f"merge_method: {name.split(':')[0]}\n" + body.format(**trio)
    parse_manifest(text)  # mergekit's spelling of every parameter is accepted
    # a typo in the first parameters mapping (per-model or top-level), or a new top-level one
    typo = text.replace("parameters: {", "parameters: {no_such_knob: 1, ", 1)
    typo = typo if typo != text else text + "parameters: {no_such_knob: 1}\n"
    with pytest.raises(ManifestError, match=rf"parameters\.no_such_knob: unknown parameter for {name.split(':')[0]}"):
        parse_manifest(typo)
