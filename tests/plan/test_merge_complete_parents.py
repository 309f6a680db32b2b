"""Complete parents, or a clear error (#11.5): the child's tensors come from every parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import darwin_stream as ds
from darwin_stream.cli import main
from darwin_stream.errors import PlanError
from tests.helpers import read_all

H, V = 8, 16


def _parent(d: Path, seed: int, *, extra: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Path:
    """A two-layer llama-named checkpoint; `extra` tensors added, `drop` ones left out."""
    g = torch.Generator().manual_seed(seed)
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(2):
        names |= {f"model.layers.{i}.self_attn.q_proj.weight": (H, H), f"model.layers.{i}.mlp.up_proj.weight": (H, H),
                  f"model.layers.{i}.input_layernorm.weight": (H,)}
    names |= {n: (H,) for n in extra}
    tensors = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in names.items() if n not in drop}
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"))
    tied = "lm_head.weight" in drop
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                               "num_hidden_layers": 2, "hidden_size": H, "vocab_size": V,
                                               "tie_word_embeddings": tied}))
    return d


def _linear(*models: Path) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models) + "dtype: float32\n"


@pytest.mark.parametrize("extra", ["model.layers.1.self_attn.q_proj.bias", "model.rotary.inv_freq"])
def test_a_tensor_the_first_parent_lacks_is_a_one_line_error_naming_both(tmp_path, capsys, extra):
    a = _parent(tmp_path / "a", 1)
    b = _parent(tmp_path / "b", 2, extra=(extra,))
    (tmp_path / "m.yaml").write_text(_linear(a, b))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "child"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"tensor {extra!r}" in err and f"missing in parent {a}" in err and str(b) in err
    assert not list(tmp_path.glob("*child*")), "nothing may be written before the check"


def test_the_other_order_names_the_same_tensor(tmp_path):
    a = _parent(tmp_path / "a", 1)
    b = _parent(tmp_path / "b", 2, extra=("model.layers.1.self_attn.q_proj.bias",))
    with pytest.raises(PlanError, match=rf"'model\.layers\.1\.self_attn\.q_proj\.bias' is missing in parent {a}"):
        ds.load_plan(_linear(b, a))


def test_a_tied_lm_head_stays_optional(tmp_path):
    """mergekit's lm_head is optional and tied to the embeddings: a parent without one gives its embed_tokens."""
    untied = _parent(tmp_path / "untied", 1)
    tied = _parent(tmp_path / "tied", 2, drop=("lm_head.weight",))
    ds.merge(_linear(untied, tied), tmp_path / "child")
    child, u, t = read_all(tmp_path / "child"), read_all(untied), read_all(tied)
    want = 0.5 * u["lm_head.weight"].double() + 0.5 * t["model.embed_tokens.weight"].double()
    assert torch.allclose(child["lm_head.weight"].double(), want, rtol=0, atol=1e-6)
    # the child takes the first parent's config (untied), so its lm_head is real
    assert json.loads((tmp_path / "child" / "config.json").read_text())["tie_word_embeddings"] is False

    plan = ds.load_plan(_linear(tied, untied))  # config from the tied parent: the child ties, lm_head unused
    assert "lm_head.weight" not in {tp.name for tp in plan.tensors}
    assert any("lm_head.weight" in n and "tie" in n for n in plan.notes)
