"""Genes fill a template plan; the resolved manifest plans to the same child, value for value."""

from __future__ import annotations

import random

import pytest

from darwin_stream.errors import DarwinError
from darwin_stream.manifest import parse_manifest
from darwin_stream.plan import build_plan
from darwin_stream.plan.template import Template
from tests.helpers import evolve_yaml


def _template(text: str) -> Template:
    m = parse_manifest(text)
    return Template(build_plan(m, text), m)


def test_layout_counts_one_value_per_layer_and_role(trio):
    tpl = _template(evolve_yaml(trio))
    assert tpl.n_layers == 4
    assert tpl.dim == 4 + 2  # gene a: per layer; gene b: one per role
    assert tpl.initial() == [0.5] * 6  # the template's own weights


def test_apply_equals_planning_the_resolved_manifest(trio):
    text = evolve_yaml(trio)
    tpl = _template(text)
    rng = random.Random(0)
    x = [rng.uniform(0, 1.5) for _ in range(tpl.dim)]
    got = tpl.apply(x)
    resolved = tpl.resolved_manifest(x, text)
    assert "\nevolve:" not in resolved and "&id" not in resolved
    m2 = parse_manifest(resolved)
    want = build_plan(m2, resolved)
    assert got.tensors == want.tensors
    # and the genes really moved the weights: layer 2's attention gets a's third value
    a_key = next(k for k, v in got.parents.items() if v == str(trio[1]))
    tp = next(t for t in got.tensors if t.layer == 2 and t.role == "attn_q")
    i = [r.parent for r in tp.models].index(a_key)
    assert tp.model_params[i]["weight"] == pytest.approx(x[2], abs=1e-12)
    emb = next(t for t in got.tensors if t.layer is None and t.role == "embed")
    assert all(mp["weight"] == 0.5 for mp in emb.model_params)  # no gene covers the embeddings


def test_tied_negated_and_block_genes(trio):
    _, a, b = trio
    genes = (f"    - {{name: a, param: weight, model: {a}, granularity: block, block: 2, bounds: [-1, 1], init: 0.25}}\n"
             f"    - {{name: b, param: weight, model: {b}, granularity: block, block: 2, tie: a, negate: true, bounds: [-1, 1]}}\n")
    text = evolve_yaml(trio, genes=genes)
    tpl = _template(text)
    assert tpl.dim == 2  # two blocks of two layers; b has no coordinates of its own
    plan = tpl.apply([0.1, 0.7])
    keys = {v: k for k, v in plan.parents.items()}
    for tp in plan.tensors:
        if tp.layer is None:
            continue
        w = {r.parent: mp["weight"] for r, mp in zip(tp.models, tp.model_params, strict=True)}
        want = 0.1 if tp.layer < 2 else 0.7
        assert w[keys[str(a)]] == pytest.approx(want) and w[keys[str(b)]] == pytest.approx(-want)
    m2 = parse_manifest(tpl.resolved_manifest([0.1, 0.7], text))
    assert build_plan(m2, "").tensors == plan.tensors


@pytest.mark.parametrize(("genes", "needle"), [
    ("    - {param: t, bounds: [0, 1]}\n", "names no parameter of the template"),
    ("    - {param: weight, model: nowhere/model, bounds: [0, 1]}\n", "is not a model of the template"),
    ("    - {param: weight, bounds: [1, 0]}\n", "bounds are inverted"),
    ("    - {param: weight, bounds: [0, 1], init: 2}\n", "outside bounds"),
    ("    - {param: weight, bounds: [0.6, 1]}\n", "lies outside bounds [0.6, 1.0]"),
    ("    - {param: weight, granularity: block, bounds: [0, 1]}\n", "needs block"),
    ("    - {param: weight, tie: nobody, bounds: [0, 1]}\n", "no gene is named"),
])
def test_bad_genes_are_one_line_errors(trio, genes, needle):
    with pytest.raises(DarwinError, match=None) as e:
        _template(evolve_yaml(trio, genes=genes)).initial()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_popsize_below_two_is_refused(trio):
    with pytest.raises(DarwinError) as e:
        parse_manifest(evolve_yaml(trio, search="{popsize: 1}"))
    assert "popsize must be at least 2" in str(e.value)


def test_breed_genes_set_the_blend_t_per_father_layer(tmp_path):
    from darwin_stream.demo import build_model

    father = build_model(tmp_path / "f", "gemma4", seed=1)
    mother = build_model(tmp_path / "m", "qwen3_5", seed=2)
    text = (f"breed:\n  father: {father}\n  mother: {mother}\n  blend:\n    mlp: {{method: linear, t: 0.5}}\n"
            "evolve:\n  genes:\n    - {param: t, filter: mlp, granularity: layer, bounds: [0, 1]}\n"
            "  fitness: {tasks: [x.jsonl]}\n")
    tpl = _template(text)
    assert tpl.dim == 6  # the genome length follows the father's layer count
    x = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    plan = tpl.apply(x)
    for tp in plan.tensors:
        if tp.role == "ffn_up" and tp.layer is not None:
            assert tp.model_params[1]["weight"] == pytest.approx(x[tp.layer])
    m2 = parse_manifest(tpl.resolved_manifest(x, text))
    assert build_plan(m2, "").tensors == plan.tensors
