"""Every shipped manifest runs as it is, from the repository root, once `darwin-stream demo` has
built its parents in demo-out/ (base, parent_a, parent_b: tiny Qwen3 models; breed-tiny.yaml also
a tiny Gemma-4 in demo-out/gemma4, which its comment says how to build)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from darwin_stream.api import merge
from tests.helpers import read_all

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
# demo.yaml belongs to `darwin-stream demo`, evolve-*.yaml to `darwin-stream evolve`, and the
# gemma4 x qwen3.5 breed names real hub checkpoints of several GB.
NOT_HERE = {"demo.yaml", "breed-gemma4-qwen35.yaml"}
SHIPPED = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name not in NOT_HERE and not p.name.startswith("evolve-"))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_parents):
    """A scratch copy of the repository's manifests/ beside the parents the demo builds."""
    from darwin_stream.demo import build_model

    r = tmp_path_factory.mktemp("repo")
    shutil.copytree(MANIFESTS, r / "manifests")
    shutil.copytree(tiny_parents[0], r / "demo-out" / "base")
    shutil.copytree(tiny_parents[1], r / "demo-out" / "parent_a")
    build_model(r / "demo-out" / "parent_b", seed=3)
    build_model(r / "demo-out" / "gemma4", "gemma4", seed=4)  # breed-tiny.yaml's mother
    return r


def test_the_list_is_not_empty():
    assert {"linear.yaml", "slerp.yaml", "ties.yaml", "breed-tiny.yaml"} <= set(SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifest_merges(root, name, monkeypatch):
    monkeypatch.chdir(root)
    out = root / "children" / name.removesuffix(".yaml")
    report = merge(f"manifests/{name}", out, memory_budget=64 * 2**20)
    assert report.tensors > 0
    child = read_all(out)
    assert len(child) == report.tensors
    text = (MANIFESTS / name).read_text()
    assert "demo/parents" not in text  # the old demo's layout, which no longer exists
