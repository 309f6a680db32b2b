"""mergekit's rule for the rows a parent lacks, on vocabularies written by hand (no tokenizer)."""

from __future__ import annotations

import pytest

from darwin_stream.errors import PlanError
from darwin_stream.plan.types import RowRun
from darwin_stream.plan.vocab_rows import Input, TokenSource, default_rows, input_runs
from darwin_stream.tokenizer.vocab import ChildVocab

# child tokens 0..5; where each sits in parents a, b, c (-1: absent)
VOCAB = {"x": 0, "y": 1, "only_b": 2, "ab": 3, "bc": 4, "none": 5}
POS = {"a": [0, 1, -1, 2, -1, -1], "b": [0, 1, 2, 3, 4, -1], "c": [0, 1, -1, -1, 3, -1]}
INPUTS = [Input("a", "emb", 3), Input("b", "emb", 5), Input("c", "emb", 4)]


def _vocab() -> ChildVocab:
    return ChildVocab(None, VOCAB, POS, {"a": {"x": 0, "y": 1, "ab": 2}})


def test_defaults_follow_mergekits_rule():
    d = default_rows(_vocab(), INPUTS, "a", {}, "emb")
    assert d[VOCAB["only_b"]] == (("b", "emb", 2),)  # one model has it: its row
    assert d[VOCAB["none"]] == ()  # nobody has it: zeros
    assert d[VOCAB["ab"]] == (("a", "emb", 2),)  # the base has it: the base's row
    assert d[VOCAB["bc"]] == (("b", "emb", 4), ("c", "emb", 3))  # else the mean, in input order
    assert VOCAB["x"] not in d  # every input has it: no default


def test_without_base_the_mean_is_taken():
    d = default_rows(_vocab(), INPUTS, None, {}, "emb")
    assert d[VOCAB["ab"]] == (("a", "emb", 2), ("b", "emb", 3))


def test_configured_tokens_and_force():
    tokens = {
        "x": TokenSource("model", "c", force=True),
        "none": TokenSource("model_token", "a", row=1),
        "only_b": TokenSource("zero"),
    }
    v = _vocab()
    d = default_rows(v, INPUTS, "a", tokens, "emb")
    assert d[VOCAB["x"]] == (("c", "emb", 0),)
    assert d[VOCAB["none"]] == (("a", "emb", 1),)
    assert d[VOCAB["only_b"]] == ()
    runs = input_runs(v, INPUTS[1], d, forced={VOCAB["x"]})
    # b's own rows except x (forced to c's row 0), and `none` from a's row 1
    assert runs == (RowRun(0, 1, (("c", "emb", 0),)), RowRun(1, 4, (("b", "emb", 1),)), RowRun(5, 1, (("a", "emb", 1),)))


def test_runs_of_a_permuted_input():
    v = _vocab()
    d = default_rows(v, INPUTS, "a", {}, "emb")
    runs = input_runs(v, INPUTS[0], d, set())
    assert runs == (
        RowRun(0, 2, (("a", "emb", 0),)),
        RowRun(2, 1, (("b", "emb", 2),)),
        RowRun(3, 1, (("a", "emb", 2),)),
        RowRun(4, 1, (("b", "emb", 4), ("c", "emb", 3))),
        RowRun(5, 1, ()),
    )


def test_an_input_as_stored_needs_no_runs():
    v = ChildVocab(None, {"x": 0, "y": 1}, {"a": [0, 1]}, {})
    assert input_runs(v, Input("a", "emb", 2), {}, set()) is None
    # the same order but fewer child rows than stored (a stripped padding) is a gather
    assert input_runs(v, Input("a", "emb", 3), {}, set()) == (RowRun(0, 2, (("a", "emb", 0),)),)


def test_a_token_source_that_lacks_the_token():
    with pytest.raises(PlanError, match="'ab' is not in the vocabulary of c"):
        default_rows(_vocab(), INPUTS, "a", {"ab": TokenSource("model", "c", force=True, where="w")}, "emb")
    with pytest.raises(PlanError, match="beyond the 3 rows"):
        default_rows(_vocab(), INPUTS, "a", {"none": TokenSource("model_token", "a", row=7, where="w")}, "emb")
    with pytest.raises(PlanError, match="not an input of emb"):
        default_rows(_vocab(), INPUTS[:2], "a", {"none": TokenSource("model", "c", where="w")}, "emb")
