"""The config a child gets with its vocabulary: special ids follow their tokens (no models needed)."""

from __future__ import annotations

from types import SimpleNamespace

from darwin_stream.plan.vocab import _config_overrides, _id_map
from darwin_stream.tokenizer.files import remap as _remap
from darwin_stream.tokenizer.vocab import ChildVocab


def _child(vocab: dict[str, int], eos: int | None = None) -> ChildVocab:
    return ChildVocab(SimpleNamespace(eos_token_id=eos, bos_token_id=None, pad_token_id=None), vocab, {},
                      {"base": {"<s>": 0, "</s>": 1, "<pad>": 2, "x": 3}})


def test_special_ids_follow_their_tokens():
    # the child takes another model's vocabulary, in which </s> and <pad> sit elsewhere
    child = _child({"x": 0, "<pad>": 1, "</s>": 2, "<s>": 3})
    config = {"bos_token_id": 0, "eos_token_id": [1, 3], "pad_token_id": 2, "vocab_size": 4}
    ids = _id_map(config, child, "base")
    assert ids == {0: 3, 1: 2, 2: 1, 3: 0}
    assert _config_overrides(config, 4, ids) == {"vocab_size": 4, "bos_token_id": 3, "eos_token_id": [2, 0],
                                                  "pad_token_id": 1}


def test_a_lost_special_token_takes_the_childs_own():
    child = _child({"x": 0, "<eos>": 1}, eos=1)
    assert _id_map({"eos_token_id": 1}, child, "base") == {1: 1}
    assert _remap({"eos_token_id": 7, "bos_token_id": True}, {7: 2}) == {"eos_token_id": 2}


def test_multimodal_vocab_size_lives_in_text_config():
    config = {"text_config": {"vocab_size": 10, "eos_token_id": 1}}
    assert _config_overrides(config, 12, {1: 5}) == {"text_config": {"vocab_size": 12, "eos_token_id": 5}}
