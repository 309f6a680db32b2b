"""The transformers backend breeds plan children in place and generates in left-padded batches.

Every comparison is exact and in float32: a child bred into the live model must be, parameter for
parameter and logit for logit, what `from_pretrained` loads from the same plan merged to disk.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from darwin_stream.errors import PlanError
from darwin_stream.plan import Plan
from darwin_stream.score.backend import open_backend
from darwin_stream.score.hf_backend import cut, until

PROMPTS = ["the quick brown fox", "paris is the capital of", "one two three"]

SLERP = """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: mlp
      value: [0.2, 0.9]
    - value: 0.6
dtype: bfloat16
"""


def _with_t(plan: Plan, t: float, layer: int | None = None) -> Plan:
    """The same plan with slerp's t set to `t` on every tensor (or on one layer's)."""
    tensors = [dataclasses.replace(tp, params={**tp.params, "t": t}) if layer is None or tp.layer == layer else tp
               for tp in plan.tensors]
    return dataclasses.replace(plan, tensors=tensors)


def _disk(plan: Plan, out):
    from transformers import AutoModelForCausalLM

    from darwin_stream import merge

    merge(plan, out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False).eval()


def _assert_same_model(live, disk, seqs: list[list[int]]) -> None:
    """Same parameter names, bit-identical values, identical logits."""
    got, want = live.state_dict(), disk.state_dict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].dtype == w.dtype == torch.float32, name
        assert torch.equal(got[name].view(torch.int32), w.view(torch.int32)), name
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            assert torch.equal(live(input_ids=ids).logits, disk(input_ids=ids).logits)


def _ids(backend, texts):
    return [backend.tokenizer(t)["input_ids"] for t in texts]


def _pair_plan(work, arch: str) -> Plan:
    """A slerp of two tiny `arch` parents, planned as `darwin-stream merge` would."""
    from darwin_stream.api import load_plan
    from darwin_stream.demo import build_model

    a, b = build_model(work / "a", arch, seed=1), build_model(work / "b", arch, seed=2)
    manifest = work / "slerp.yaml"
    manifest.write_text(SLERP.format(a=a, b=b))
    return load_plan(manifest)


@pytest.fixture(scope="module")
def tied_plan(tmp_path_factory) -> Plan:
    """Two tiny Gemma-3 parents: tied embeddings (the checkpoint has no lm_head.weight)."""
    return _pair_plan(tmp_path_factory.mktemp("tied"), "gemma3")


@pytest.mark.slow
def test_child_bred_in_place_is_the_disk_child(plan, merged_child):
    from transformers import AutoModelForCausalLM

    hf = open_backend("hf", _with_t(plan, 0.25), dtype="float32")
    model = hf.model
    info = hf.load(plan)
    assert hf.model is model, "a new model was built for a child of the same config"
    assert (info["bred"], info["skipped"]) == (len(plan.tensors), 0)
    disk = AutoModelForCausalLM.from_pretrained(merged_child, dtype=torch.float32, trust_remote_code=False).eval()
    _assert_same_model(hf.model, disk, _ids(hf, PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma4", "qwen3_5"])
def test_other_architectures_bred_in_place(arch, tmp_path):
    """The model is built without random init; every architecture's buffers (rotary frequencies,
    Gemma-4's per-layer inputs, Qwen3.5's linear attention) still match from_pretrained's."""
    plan = _pair_plan(tmp_path, arch)
    hf = open_backend("hf", _with_t(plan, 0.1), dtype="float32")
    model = hf.model
    assert hf.load(plan)["bred"] == len(plan.tensors) and hf.model is model
    _assert_same_model(hf.model, _disk(plan, tmp_path / "child"), _ids(hf, PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal-father"])
def test_a_breed_child_bred_in_place(multimodal, tmp_path):
    """Gemma-4 father (text, or with its vision tower) x Qwen3.5 mother (the FFN padded to the
    mother's width, the config overridden): moving the FFN genes re-breeds exactly the FFN tensors,
    and the child is the disk one."""
    from darwin_stream.api import load_plan
    from darwin_stream.demo import build_model, build_multimodal_model

    f = (build_multimodal_model if multimodal else build_model)(tmp_path / "f", "gemma4", seed=1)
    m = build_model(tmp_path / "m", "qwen3_5", seed=2)

    def breed(lo: float, hi: float) -> Plan:
        path = tmp_path / f"breed-{lo}.yaml"
        path.write_text(f"breed:\n  father: {f}\n  mother: {m}\n  blend:\n"
                        f"    mlp: {{method: linear, t: {{gradient: [{lo}, {hi}]}}}}\n")
        return load_plan(path)

    first, plan = breed(0.0, 0.5), breed(0.3, 0.9)
    hf = open_backend("hf", first, dtype="float32")
    ffn = [tp.name for tp in plan.tensors if tp.name.split(".")[-2] in ("gate_proj", "up_proj", "down_proj")]
    assert len(ffn) == 3 * 6
    info = hf.load(plan)
    assert (info["bred"], info["skipped"]) == (len(ffn), len(plan.tensors) - len(ffn))
    _assert_same_model(hf.model, _disk(plan, tmp_path / "child"), _ids(hf, PROMPTS))


@pytest.mark.slow
def test_unchanged_tensors_are_skipped(plan, tmp_path):
    hf = open_backend("hf", plan, dtype="float32")
    assert hf.load(plan)["bred"] == 0
    moved = _with_t(plan, 0.8, layer=2)
    in_layer = sum(tp.layer == 2 for tp in plan.tensors)
    assert in_layer > 0
    info = hf.load(moved)
    assert (info["bred"], info["skipped"]) == (in_layer, len(plan.tensors) - in_layer)
    _assert_same_model(hf.model, _disk(moved, tmp_path / "moved"), _ids(hf, PROMPTS))


@pytest.mark.slow
def test_checkpoint_in_between_means_breeding_everything(demo, plan, merged_child):
    """After a from_pretrained load the live model no longer holds the last plan's child."""
    from transformers import AutoModelForCausalLM

    hf = open_backend("hf", plan, dtype="float32")
    hf.load(str(demo["father"]))
    assert hf.load(plan)["bred"] == len(plan.tensors)
    disk = AutoModelForCausalLM.from_pretrained(merged_child, dtype=torch.float32, trust_remote_code=False).eval()
    _assert_same_model(hf.model, disk, _ids(hf, PROMPTS))


@pytest.mark.slow
def test_tied_embeddings_and_a_new_architecture(plan, tied_plan, tmp_path):
    """Qwen3 -> Gemma-3 rebuilds the model; Gemma-3 -> Gemma-3 breeds in place, and lm_head (tied,
    absent from the plan) follows the bred embeddings exactly as from_pretrained ties it."""
    hf = open_backend("hf", plan, dtype="float32")
    qwen = hf.model
    hf.load(_with_t(tied_plan, 0.1))
    gemma = hf.model
    assert gemma is not qwen and type(gemma).__name__ == "Gemma3ForCausalLM"
    assert "lm_head.weight" not in {tp.name for tp in tied_plan.tensors}
    info = hf.load(tied_plan)
    assert hf.model is gemma and info["bred"] == len(tied_plan.tensors)
    assert hf.model.lm_head.weight.data_ptr() == hf.model.model.embed_tokens.weight.data_ptr()
    _assert_same_model(hf.model, _disk(tied_plan, tmp_path / "tied"), _ids(hf, PROMPTS))


@pytest.mark.slow
def test_a_tied_pair_that_the_plan_fills_twice(tmp_path):
    """Parents whose config ties lm_head to the embeddings but whose checkpoints hold both, with
    different values: from_pretrained then leaves them untied, and so must breeding in place."""
    from safetensors.torch import load_file, save_file

    from darwin_stream.api import load_plan
    from darwin_stream.demo import build_model

    parents = []
    for seed in (1, 2):
        d = build_model(tmp_path / f"p{seed}", "qwen3", seed=seed, overrides={"tie_word_embeddings": True},
                        max_shard_size="100MB")
        (shard,) = d.glob("*.safetensors")
        sd = load_file(shard)
        sd["lm_head.weight"] = (torch.randn(sd["model.embed_tokens.weight"].shape) * 0.02).to(torch.bfloat16)
        save_file(sd, shard, metadata={"format": "pt"})
        parents.append(d)
    manifest = tmp_path / "slerp.yaml"
    manifest.write_text(SLERP.format(a=parents[0], b=parents[1]))
    plan = load_plan(manifest)
    assert "lm_head.weight" in {tp.name for tp in plan.tensors}
    hf = open_backend("hf", _with_t(plan, 0.1), dtype="float32")
    assert hf.load(plan)["bred"] == len(plan.tensors)
    assert hf.model.lm_head.weight.data_ptr() != hf.model.model.embed_tokens.weight.data_ptr()
    _assert_same_model(hf.model, _disk(plan, tmp_path / "child"), _ids(hf, PROMPTS))


@pytest.mark.slow
def test_a_plan_that_does_not_fit_its_config(plan):
    short = dataclasses.replace(plan, tensors=[tp for tp in plan.tensors if tp.name != "model.norm.weight"])
    with pytest.raises(PlanError, match=r"missing \['model.norm.weight'\]"):
        open_backend("hf", short, dtype="float32")


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(demo):
    """Left padding changes nothing: 30 prompts of 1-40 tokens, batched and one by one."""
    from darwin_stream.demo import CORPUS

    hf = open_backend("hf", str(demo["father"]), dtype="float32")
    ids = hf.tokenizer(CORPUS)["input_ids"]
    seqs = [ids[7 * k : 7 * k + 1 + (13 * k) % 40] for k in range(30)]
    assert len({len(s) for s in seqs}) > 15
    batched = hf.generate(seqs, 12, [])
    single = [hf.generate([s], 12, [])[0] for s in seqs]
    assert batched == single
    assert len(set(batched)) > 10  # real, varied outputs, not empty strings
    stops = ["e"]
    assert hf.generate(seqs, 12, stops) == [cut(t, stops) for t in single]


def test_until_and_cut():
    assert until([5, 6, 0, 7, 1, 1], {0}) == [5, 6]
    assert until([5, 6], {0}) == [5, 6]
    assert cut("abc. def", [".", "z"]) == "abc"
    assert cut("abc", ["", "z"]) == "abc"


def test_gen_batches(monkeypatch):
    from darwin_stream.score import hf_backend

    monkeypatch.setattr(hf_backend, "GEN_BATCH", 3)
    monkeypatch.setattr(hf_backend, "GEN_TOKENS", 38)  # [4, 5, 9] would hold 3 x (9 + 4) = 39
    lengths = [5, 1, 9, 2, 30, 3, 4, 50]
    got = hf_backend.gen_batches(lengths, 4)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in got] == [[1, 2, 3], [4, 5], [9], [30], [50]]


@pytest.mark.slow
def test_a_plan_edited_in_place_is_bred_again(plan, tmp_path):
    """A template may write the next genome into the same params dicts: the live plan is a copy."""
    live = _with_t(plan, 0.5)
    hf = open_backend("hf", live, dtype="float32")
    for tp in live.tensors:
        if tp.layer == 1:
            tp.params["t"] = 0.7
    info = hf.load(live)
    assert info["bred"] == sum(tp.layer == 1 for tp in live.tensors) > 0
    _assert_same_model(hf.model, _disk(live, tmp_path / "edited"), _ids(hf, PROMPTS))
