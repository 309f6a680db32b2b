"""Bad tokenizer settings are one line naming the problem, before anything is written."""

from __future__ import annotations

import pytest

from darwin_stream.cli import main


def _manifest(p, extra: str) -> str:
    return (f"merge_method: linear\nbase_model: {p['a']}\nmodels:\n  - model: {p['a']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {p['b']}\n    parameters: {{weight: 0.5}}\n{extra}\n")


CASES = [
    ("tokenizer_source: /nowhere/model", ["tokenizer_source: /nowhere/model is not a model of this merge"]),
    ("tokenizer: {{source: /nowhere/model}}", ["tokenizer.source: /nowhere/model is not a model of this merge"]),
    ("tokenizer:\n  tokens:\n    <x>: {{source: {{kind: model_token, model: {a}, token: nope}}}}",
     ["tokenizer.tokens.<x>.source", "'nope' is not in the vocabulary of"]),
    ("tokenizer:\n  tokens:\n    <tool>: {{source: {a}, force: true}}",
     ["tokenizer.tokens.<tool>.source", "'<tool>' is not in the vocabulary of"]),
    ("tokenizer:\n  tokens:\n    <x>: {{source: {{kind: model_token, model: {a}, token_id: 999}}}}",
     ["tokenizer.tokens.<x>.source", "token id 999 is beyond the 322 rows"]),
    ("tokenizer:\n  tokens:\n    <x>: {{source: /elsewhere}}", ["tokenizer.tokens.<x>.source: /elsewhere is not a model of this merge"]),
    ("chat_template: fancy", ["chat_template: unknown chat template 'fancy'", "chatml"]),
    ("tokenizer: {{pad_to_multiple_of: 0}}", ["pad_to_multiple_of", "expected a positive integer, got 0"]),
]


@pytest.mark.parametrize(("extra", "needles"), CASES, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(CASES)])
def test_one_line_error(capsys, tmp_path, vocab_parents, extra, needles):
    m = tmp_path / "m.yaml"
    m.write_text(_manifest(vocab_parents, extra.format(**vocab_parents)))
    out = tmp_path / "child"
    code = main(["merge", str(m), str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("darwin-stream: error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() and not (tmp_path / ".child.partial").exists()
