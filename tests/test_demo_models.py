"""The evolution demo's tokenizer, skills, task files and build reuse (tiny step counts: seconds)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from darwin_stream import demo_models as dm
from darwin_stream import errors
from darwin_stream.score.tasks import load_task

# A model of a few thousand parameters: the tests check plumbing, not learning.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
             head_dim=32, max_position_embeddings=64, tie_word_embeddings=True)
TINY = dm.with_steps(dm.DemoSettings(n_fitness=12, n_heldout=10, batch=16, model=SMALL), base=3, parents=2)


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    dm.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # HF_HUB_OFFLINE=1 (conftest): local files only
    for prompt in ("123+45=", "abcdef>", "zyx:", "7 a\n"):
        ids = tok(prompt)["input_ids"]  # how the scorer tokenizes a prompt
        assert ids == [dm.BOS, *dm.encode(prompt)]
        assert tok.decode(ids, skip_special_tokens=True) == prompt
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (dm.BOS, dm.EOS, dm.PAD)
    assert tok.decode([*dm.encode("579"), dm.EOS], skip_special_tokens=True) == "579"
    assert len(tok) == len(dm.VOCAB)


@pytest.mark.parametrize("skill", [dm.DemoSettings().skill_a, dm.DemoSettings().skill_b, dm.Skill("s", "sort", 4, 6)])
def test_splits_are_disjoint_deterministic_and_correct(skill):
    a, b = dm.make_splits(skill, 0, 40, 30), dm.make_splits(skill, 0, 40, 30)
    assert a == b
    assert dm.make_splits(skill, 1, 40, 30) != a
    assert len(a.fitness) == 40 and len(a.heldout) == 30
    assert not {p for p, _ in a.fitness} & {p for p, _ in a.heldout}
    train = dm.train_items(skill, a, random.Random(0), 3000)
    assert not {p for p, _ in train} & a.reserved
    for prompt, answer in a.fitness + train[:200]:
        assert answer == _solve(skill.kind, prompt[:-1])
        assert len(dm.encode(answer)) + 1 <= skill.max_tokens


def _solve(kind: str, body: str) -> str:
    if kind == "add":
        return str(sum(map(int, body.split("+"))))
    return body[::-1] if kind == "reverse" else "".join(sorted(body))


def test_collate_scores_only_the_answer_and_eos():
    ids, attn, target = dm.collate([("12+3=", "15"), ("ab>", "ba")])
    row = ids[0, 1:][target[0]].tolist()
    assert row == [*dm.encode("15"), dm.EOS]
    assert ids[1, 1:][target[1]].tolist() == [*dm.encode("ba"), dm.EOS]
    assert attn[1].sum() == 1 + 3 + 2 + 1 and ids[1, -1] == dm.PAD


def test_fast_greedy_equals_the_scorers_hf_backend(tmp_path):
    """The in-process evaluation and the scorer's transformers backend generate the same text."""
    from darwin_stream.score.hf_backend import HfBackend

    model = dm.new_model(TINY, seed=3)
    with torch.no_grad():  # large random weights: outputs that differ per prompt and stop at random
        for p in model.parameters():
            p.normal_(0, 1.0)
    dm._save_model(model, tmp_path / "m")
    splits = dm.make_splits(TINY.skill_b, 0, 12, 10)
    ev = dm.GreedyEval({"b": splits.fitness}, {"b": TINY.skill_b.max_tokens})
    backend = HfBackend(str(tmp_path / "m"), dtype="float32", device="cpu")
    seqs = [backend.tokenizer(p)["input_ids"] for p, _ in splits.fitness]
    texts = backend.generate(seqs, TINY.skill_b.max_tokens, ["\n"])
    ours = ["".join(dm.VOCAB[t] for t in row) for row in ev.outputs(model, "b")]
    assert ours == texts
    assert len(set(texts)) > 3  # random outputs that differ per prompt: the check has teeth


def test_build_demo_writes_loadable_tasks_and_reuses_its_models(tmp_path):
    build = dm.build_demo(tmp_path / "demo", seed=0, settings=TINY)
    assert not any(s["reused"] for s in build.stages.values())
    for split, paths in (("fitness", build.fitness), ("heldout", build.heldout)):
        assert [p.parent.name for p in paths] == [split, split]
        for path, skill in zip(paths, TINY.skills(), strict=True):
            task = load_task(path)
            assert (task.name, task.kind, task.max_tokens, task.stop) == (skill.name, "generate", skill.max_tokens, ["\n"])
            assert len(task.items) == (12 if split == "fitness" else 10)
    stamps = {p: (p / "model.safetensors").stat().st_mtime_ns for p in (build.base, *build.parents.values())}

    again = dm.build_demo(tmp_path / "demo", seed=0, settings=TINY)
    assert all(s["reused"] for s in again.stages.values())
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in stamps} == stamps


def test_build_demo_rebuilds_only_what_changed_or_was_cut_short(tmp_path):
    root = tmp_path / "demo"
    dm.build_demo(root, seed=0, settings=TINY)
    # A killed build leaves a temporary directory; the next build removes it and trusts nothing in it.
    (root / ".parent_b.tmp-999").mkdir()
    (root / ".parent_b.tmp-999" / "config.json").write_text("{}")
    # A parent whose record is gone (a build killed after its rename, before build.json) is rebuilt.
    record = json.loads((root / "build.json").read_text())
    del record["A"]
    (root / "build.json").write_text(json.dumps(record))
    again = dm.build_demo(root, seed=0, settings=TINY)
    assert {k: s["reused"] for k, s in again.stages.items()} == {"base": True, "A": False, "B": True}
    # Longer fine-tuning: parents rebuilt from the same base. Another seed: everything.
    longer = dm.with_steps(TINY, base=3, parents=3)
    assert {k: s["reused"] for k, s in dm.build_demo(root, seed=0, settings=longer).stages.items()} == {
        "base": True, "A": False, "B": False}
    assert not any(s["reused"] for s in dm.build_demo(root, seed=1, settings=longer).stages.values())
    assert not list(root.glob(".*tmp*"))


def test_build_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(errors.DarwinError, match="is a file"):
        dm.build_demo(tmp_path / "f", settings=TINY)


def test_parents_are_fine_tuned_from_the_base(tmp_path):
    build = dm.build_demo(tmp_path / "demo", seed=0, settings=TINY)
    from safetensors.torch import load_file

    base = load_file(build.base / "model.safetensors")
    a = load_file(build.parents["A"] / "model.safetensors")
    fresh = dm.new_model(TINY, seed=0).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert base[name].dtype == torch.float32
    # Two steps at 1e-4 move a parent a little from the base, and far less than the base is from init.
    assert 0 < (a[name] - base[name]).abs().max() < (base[name] - fresh[name]).abs().max()
