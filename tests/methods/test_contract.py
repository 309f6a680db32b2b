"""A method owns its contract: the registry is an explicit list, every declaration is complete, and a
method that exists only as a declaration (one object, one registry entry) plans, merges and breeds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import darwin_stream
from darwin_stream import methods
from darwin_stream.errors import PlanError
from darwin_stream.manifest import parse_manifest
from darwin_stream.methods import METHODS, REGISTRY, BasePolicy, MergeMethod, Param, get
from darwin_stream.methods.breeding import TASK_VECTOR
from darwin_stream.methods.contract import Arity, Chunk, param, required
from darwin_stream.plan import build_plan
from tests.helpers import read_all

PACKAGE = Path(darwin_stream.__file__).parent
READERS = ["plan/merge.py", "plan/breed.py", "plan/template.py", "engine.py"]


def test_registry_is_the_explicit_list():
    assert [m.name for m in METHODS] == list(REGISTRY) and len(METHODS) == 20
    assert not hasattr(methods, "register"), "registration is a list, not an import side effect"
    assert all(isinstance(m, MergeMethod) for m in METHODS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_declaration_is_complete(name):
    m = get(name)
    assert m.summary and not m.summary.startswith(name + ":"), "a one-line summary, without the name"
    for p in (*m.parameters, *m.model_parameters):
        assert isinstance(p, Param) and p.doc, f"{name}.{p.name}: every parameter has a doc line"
        assert not (p.required and p.default is not None)
    assert isinstance(m.base, BasePolicy)
    assert m.needs_base == (m.base is BasePolicy.REQUIRED)
    if m.breed is None:
        assert m.breed_refusal is None or m.breed_refusal.startswith(name)


@pytest.mark.parametrize("reader", READERS)
def test_readers_name_no_method(reader):
    """The planners and the engine read declarations; a quoted method name there is a per-method branch."""
    text = (PACKAGE / reader).read_text()
    pattern = "|".join(re.escape(n) for n in REGISTRY if n != "linear")  # "linear" is also a layer_map value
    assert not re.findall(rf"[\"']({pattern})[\"']", text)
    assert not re.findall(r"(==|!=|in)\s*[\"']linear[\"']", text.replace('spec == "linear"', "")
                          .replace('sec.layer_map != "linear"', ""))


def _halfway(chunk: Chunk, state: object) -> torch.Tensor:
    """A method written only for this test: base + t_i (x_i - base) summed, t_i the model's weight."""
    assert chunk.base is not None
    out = chunk.base.clone()
    for x, mp in zip(chunk.models, chunk.model_params, strict=True):
        out += (x - chunk.base) * float(mp["weight"]) * float(chunk.params["gain"])
    return out


HALFWAY = MergeMethod(
    name="halfway_test", summary="a test method", blend=_halfway, base=BasePolicy.REQUIRED, arity=Arity(1, 1),
    model_parameters=(required("weight", "share"),), parameters=(param("gain", 1.0, "a factor"),), breed=TASK_VECTOR,
)


@pytest.fixture
def halfway(monkeypatch):
    monkeypatch.setitem(REGISTRY, HALFWAY.name, HALFWAY)
    return HALFWAY


def test_a_declared_method_plans_and_merges(halfway, trio, tmp_path):
    a, b, c = trio
    text = (f"merge_method: halfway_test\nbase_model: {a}\nmodels:\n  - model: {b}\n"
            "    parameters: {weight: 0.25}\nparameters: {gain: 2.0}\ndtype: float32\nout_dtype: float32\n")
    (tmp_path / "m.yaml").write_text(text)
    darwin_stream.merge(tmp_path / "m.yaml", tmp_path / "child")
    got, pa, pb = read_all(tmp_path / "child"), read_all(a), read_all(b)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        want = pa[name].float() + (pb[name].float() - pa[name].float()) * 0.25 * 2.0
        torch.testing.assert_close(got[name], want)
        assert not torch.equal(got[name], pa[name].float())

    # the arity it declares is what the planner enforces
    two = text.replace("    parameters: {weight: 0.25}\n", f"    parameters: {{weight: 0.25}}\n  - model: {c}\n"
                       "    parameters: {weight: 0.5}\n")
    with pytest.raises(PlanError, match=r"halfway_test takes exactly 1 model\(s\) besides the base, got 2"):
        build_plan(parse_manifest(two), two)


def test_a_declared_method_breeds_through_its_map(halfway, tiny_parents):
    from darwin_stream.plan.breed import method_inputs
    from darwin_stream.plan.types import SourceRef

    f, m = SourceRef("father", "w"), SourceRef("mother", "w")
    got = method_inputs("halfway_test", 0.3, f, m, {}, "breed.blend.mlp")
    assert got["base"] == f and got["models"] == (m,)
    assert got["model_params"] == ({"weight": 0.3},) and got["params"] == {"gain": 1.0}
    assert halfway.breed.read(got["model_params"], got["params"]) == 0.3
