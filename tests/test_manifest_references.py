"""mergekit's accepted forms (#11.4): ignored parameters, and model references `path@revision`."""

from __future__ import annotations

import shutil

import pytest
import torch

import darwin_stream as ds
from darwin_stream.cli import main
from darwin_stream.errors import ManifestError
from darwin_stream.manifest import parse_manifest
from tests.helpers import read_all

SLERP = """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}{pa}
  - model: {b}{pb}
parameters: {{t: 0.3}}
dtype: float32
"""


def _same_child(x, y) -> bool:
    tx, ty = read_all(x), read_all(y)
    return tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


def test_weight_under_slerp_is_ignored_with_one_warning_line(tiny_parents, tmp_path, capsys):
    a, b = tiny_parents
    w = "\n    parameters: {weight: 0.7}"
    (tmp_path / "weighted.yaml").write_text(SLERP.format(a=a, b=b, pa=w, pb=w))
    (tmp_path / "plain.yaml").write_text(SLERP.format(a=a, b=b, pa="", pb=""))
    assert main(["merge", str(tmp_path / "weighted.yaml"), str(tmp_path / "weighted"), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "ignored" in line]
    assert len(lines) == 1, out
    assert "models[0].parameters.weight, models[1].parameters.weight" in lines[0]
    assert "slerp does not read weight" in lines[0]
    ds.merge(tmp_path / "plain.yaml", tmp_path / "plain")
    assert _same_child(tmp_path / "weighted", tmp_path / "plain")  # ignored means ignored


def test_another_methods_parameter_is_a_warning_but_a_typo_is_still_refused():
    m = parse_manifest("merge_method: model_stock\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
                       "    parameters: {weight: 1.0, density: 0.5}\n  - model: c\n")
    assert len(m.warnings) == 2 and any("density" in w for w in m.warnings)
    with pytest.raises(ManifestError, match=r"models\[1\]\.parameters\.wieght: unknown parameter for model_stock"):
        parse_manifest("merge_method: model_stock\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
                       "    parameters: {wieght: 1.0}\n  - model: c\n")
    assert parse_manifest("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n").warnings == []


def test_a_local_path_at_revision_reads_the_path(tiny_parents, tmp_path):
    """mergekit's ModelPath splits at '@'; a local path is read as it is, the revision unused."""
    a, b = tiny_parents
    (tmp_path / "rev.yaml").write_text(SLERP.format(a=a, b=f"{b}@v1", pa="", pb=""))
    mergekit_dict = f"\n      model: {{path: {b}, revision: main}}"  # the form mergekit writes in its own configs
    (tmp_path / "dict.yaml").write_text(SLERP.format(a=a, b="", pa="", pb="").replace("  - model: \n",
                                                                                     f"  - model:{mergekit_dict}\n"))
    (tmp_path / "plain.yaml").write_text(SLERP.format(a=a, b=b, pa="", pb=""))
    plan = ds.load_plan(tmp_path / "rev.yaml")
    assert str(b) in plan.parents.values()
    for name in ("rev", "dict", "plain"):
        ds.merge(tmp_path / f"{name}.yaml", tmp_path / name)
    assert _same_child(tmp_path / "rev", tmp_path / "plain")
    assert _same_child(tmp_path / "dict", tmp_path / "plain")
    with pytest.raises(ManifestError, match="one '@'"):
        parse_manifest(f"merge_method: linear\nmodels:\n  - model: {b}@v1@v2\n")


def test_a_path_with_an_at_sign_that_exists_is_that_path(tiny_parents, tmp_path):
    odd = tmp_path / "model@v1"
    shutil.copytree(tiny_parents[0], odd)
    m = parse_manifest(f"merge_method: linear\nmodels:\n  - model: {odd}\n")
    assert m.models[0].model == str(odd)


def test_a_hub_id_at_revision_reads_that_revision(tiny_parents, tmp_path, monkeypatch):
    a, b = tiny_parents
    repo = tmp_path / "hub" / "models--darwin--tiny"
    revs = {"main": "1" * 40, "v2": "2" * 40}
    shutil.copytree(a, repo / "snapshots" / revs["main"])
    shutil.copytree(b, repo / "snapshots" / revs["v2"])
    (repo / "refs").mkdir()
    for ref, sha in revs.items():
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    yaml = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    ds.merge(yaml.format(m="darwin/tiny@v2"), tmp_path / "v2")
    ds.merge(yaml.format(m=b), tmp_path / "b")
    ds.merge(yaml.format(m="darwin/tiny"), tmp_path / "main")
    assert _same_child(tmp_path / "v2", tmp_path / "b")
    assert not _same_child(tmp_path / "main", tmp_path / "b")
