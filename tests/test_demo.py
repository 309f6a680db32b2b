"""The README's first command: the demo builds tiny parents, merges them, and shows the child."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import read_all


@pytest.mark.slow
def test_demo_merges_and_generates(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "darwin_stream.cli", "demo", "--workdir", str(work), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"child:    {work / 'child'}" in proc.stdout
    assert "generate: " in proc.stdout
    child, father = read_all(work / "child"), read_all(work / "parents" / "father")
    assert child.keys() == father.keys()
    # slerp with t=0 at the first layer's attention: the father's tensor, bit for bit.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert child[name].equal(father[name])
    assert not child["model.layers.2.self_attn.q_proj.weight"].equal(father["model.layers.2.self_attn.q_proj.weight"])
