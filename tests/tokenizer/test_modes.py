"""Each tokenizer mode end to end on parents whose vocabularies differ: the child's vocabulary,
its embedding and lm_head rows against a float64 reference built token by token, its config and
special tokens, and a union child that loads, generates and applies its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import darwin_stream
from darwin_stream import engine
from darwin_stream.api import load_plan
from darwin_stream.plan import Plan
from tests.helpers import bf16_ulp_mismatch, read_all
from tests.tokenizer.conftest import C_TEMPLATE

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _vocab(d: Path) -> dict[str, int]:
    return json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] | {
        t["content"]: t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]
    }


def _manifest(parents: dict[str, Path], weights: dict[str, float], extra: str, base: str = "a") -> str:
    models = "".join(f"  - model: {parents[k]}\n    parameters: {{weight: {w}}}\n" for k, w in weights.items())
    return f"merge_method: linear\nbase_model: {parents[base]}\nmodels:\n{models}{extra}\ndtype: float32\nout_dtype: bfloat16\n"


def _reference(child: dict[str, int], parents: dict[str, Path], weights: dict[str, float], base: str | None,
               tensor: str, configured: dict | None = None, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The child's rows by mergekit's rule, written out token by token in float64, and the sum of
    the magnitudes of each element's terms (bf16_ulp_mismatch forgives float32 cancellation).

    `pad_to`: rows past the vocabulary, each model's padding row the mean of its aligned rows."""
    vocabs = {k: _vocab(parents[k]) for k in weights}
    rows = {k: read_all(parents[k])[tensor].double() for k in weights}
    out = torch.zeros(pad_to or len(child), next(iter(rows.values())).shape[1], dtype=torch.float64)
    terms = torch.zeros_like(out)
    aligned_rows = {k: torch.zeros(len(child), out.shape[1], dtype=torch.float64) for k in weights}
    for tok, i in child.items():
        have = [k for k in weights if tok in vocabs[k]]
        fixed = (configured or {}).get(tok)
        if fixed is not None:
            default = fixed(rows)
        elif len(have) == 1:
            default = rows[have[0]][vocabs[have[0]][tok]]
        elif not have:
            default = torch.zeros_like(out[0])
        elif base in have:
            default = rows[base][vocabs[base][tok]]
        else:
            default = sum(rows[k][vocabs[k][tok]] for k in have) / len(have)
        forced = fixed is not None and getattr(fixed, "force", False)
        aligned = {k: (rows[k][vocabs[k][tok]] if k in have and not forced else default) for k in weights}
        for k in weights:
            aligned_rows[k][i] = aligned[k]
        out[i] = sum(w * aligned[k] for k, w in weights.items()) / sum(weights.values())
        terms[i] = sum(abs(w) * aligned[k].abs() for k, w in weights.items()) / sum(weights.values())
    if pad_to and pad_to > len(child):
        means = {k: aligned_rows[k].mean(dim=0) for k in weights}
        out[len(child):] = sum(w * means[k] for k, w in weights.items()) / sum(weights.values())
        terms[len(child):] = sum(abs(w) * means[k].abs() for k, w in weights.items()) / sum(weights.values())
    return out, terms


def _merge(tmp_path: Path, text: str, name: str = "child", **kw) -> Path:
    (tmp_path / f"{name}.yaml").write_text(text)
    darwin_stream.merge(tmp_path / f"{name}.yaml", tmp_path / name, **kw)
    return tmp_path / name


def _check_rows(child: Path, parents, weights, base, configured=None, pad_to=None) -> None:
    got = read_all(child)
    vocab = _vocab(child)
    for t in VOCAB_TENSORS:
        ref, terms = _reference(vocab, parents, weights, base, t, configured, pad_to)
        assert got[t].shape == ref.shape
        assert bf16_ulp_mismatch(got[t].float(), ref, terms) == 0, t


def test_union_of_three(tmp_path, vocab_parents):
    p = vocab_parents
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    child = _merge(tmp_path, _manifest(p, weights, "tokenizer_source: union\nchat_template: chatml"))
    va, vb, vc, v = (_vocab(x) for x in (p["a"], p["b"], p["c"], child))
    assert set(v) == set(va) | set(vb) | set(vc)
    assert all(v[t] == i for t, i in va.items())  # the base keeps its ids; the rest follow
    assert sorted(v.values()) == list(range(len(v)))
    # tokens only b and c have take their mean in a; tokens only a has, a's row in b and c
    assert any(t not in va and t in vb and t in vc for t in v)
    _check_rows(child, p, weights, "a")
    config = json.loads((child / "config.json").read_text())
    assert config["vocab_size"] == len(v) == read_all(child)["lm_head.weight"].shape[0]
    tok = json.loads((child / "tokenizer_config.json").read_text())
    special = json.loads((child / "special_tokens_map.json").read_text())
    assert special["eos_token"] == tok["eos_token"] == "<|endoftext|>"
    assert v["<|endoftext|>"] == config["eos_token_id"] and v["<|pad|>"] == config["pad_token_id"]


def test_union_child_loads_generates_and_chats(tmp_path, vocab_parents):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = vocab_parents
    child = _merge(tmp_path, _manifest(p, {"a": 0.4, "b": 0.6}, "tokenizer_source: union\nchat_template: chatml"))
    tok = AutoTokenizer.from_pretrained(child)
    model = AutoModelForCausalLM.from_pretrained(child)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "zebra <tool> fox"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nzebra <tool> fox<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids[0] and tok.convert_tokens_to_ids("<tool>") in ids[0]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4 and int(out.max()) < len(tok)


def test_base_keeps_the_base_vocabulary(tmp_path, vocab_parents):
    p = vocab_parents
    weights = {"a": 0.3, "b": 0.7}
    child = _merge(tmp_path, _manifest(p, weights, "tokenizer_source: base"))
    assert _vocab(child) == _vocab(p["a"])
    _check_rows(child, p, weights, "a")  # b's rows re-ordered to a's tokens


def test_a_model_gives_its_vocabulary(tmp_path, vocab_parents):
    p = vocab_parents
    weights = {"a": 0.3, "b": 0.7}
    child = _merge(tmp_path, _manifest(p, weights, f"tokenizer_source: {p['b']}"))
    assert _vocab(child) == _vocab(p["b"])
    _check_rows(child, p, weights, "a")
    assert json.loads((child / "config.json").read_text())["vocab_size"] == len(_vocab(p["b"]))


class _From:
    """A configured token's row in the reference: fn(rows by parent) -> row."""

    def __init__(self, fn, force: bool = False):
        self.fn, self.force = fn, force

    def __call__(self, rows):
        return self.fn(rows)


def test_tokens_section(tmp_path, vocab_parents):
    p = vocab_parents
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    extra = (
        "tokenizer:\n  tokens:\n"
        f"    <|im_start|>: {{source: {p['c']}, force: true}}\n"
        "    <tool>: {source: {kind: zero}}\n"
        f"    <|im_end|>: {{source: {{kind: model_token, model: {p['a']}, token: <|endoftext|>}}}}\n"
        f"    <newtok>: {{source: {{kind: model_token, model: {p['b']}, token_id: 5}}}}\n"
        "chat_template: auto"
    )
    child = _merge(tmp_path, _manifest(p, weights, extra))
    v, va, vc = _vocab(child), _vocab(p["a"]), _vocab(p["c"])
    assert "<newtok>" in v and v["<newtok>"] == len(v) - 1  # added after the union
    eot = va["<|endoftext|>"]
    configured = {
        "<|im_start|>": _From(lambda r: r["c"][vc["<|im_start|>"]], force=True),
        "<tool>": _From(lambda r: torch.zeros_like(r["a"][0])),
        "<|im_end|>": _From(lambda r: r["a"][eot]),
        "<newtok>": _From(lambda r: r["b"][5]),
    }
    _check_rows(child, p, weights, "a", configured)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(child).chat_template.strip() == C_TEMPLATE.strip()  # only c has one


def test_chat_template_alone_changes_only_the_template(tmp_path, vocab_parents):
    from transformers import AutoTokenizer

    p = vocab_parents
    text = _manifest(p, {"a": 1.0}, "chat_template: llama3")
    child = _merge(tmp_path, text)
    tok = AutoTokenizer.from_pretrained(child)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(p["a"]).get_vocab()
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
    assert torch.equal(read_all(child)["model.embed_tokens.weight"], read_all(p["a"])["model.embed_tokens.weight"])


def test_gathered_rows_stream_in_chunks_and_breed_in_place(tmp_path, vocab_parents):
    p = vocab_parents
    text = _manifest(p, {"a": 0.5, "b": 0.3, "c": 0.2}, "tokenizer_source: union")
    plan = load_plan(text)
    emb = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert all(r.rows for r in emb.sources())
    budget = 1 << 20
    workers = engine.worker_count()
    assert engine.chunk_rows(plan, emb, budget, workers) < emb.shape[0] / 2  # several tasks for one matrix
    small = _merge(tmp_path, text, "small", memory_budget=budget)
    big = _merge(tmp_path, text, "big")
    a, b = read_all(small), read_all(big)
    assert all(torch.equal(a[k], b[k]) for k in b)
    bred = dict(engine.iter_tensors(Plan.from_json(plan.to_json()), workers=1))
    assert all(torch.equal(bred[k], b[k]) for k in b)


def test_a_union_plan_breeds_into_the_transformers_backend(tmp_path, vocab_parents):
    """Bred in place, the child has the union vocabulary and its tokenizer, as the disk child has."""
    from darwin_stream.score.backend import open_backend

    text = _manifest(vocab_parents, {"a": 0.4, "b": 0.6}, "tokenizer_source: union")
    plan = load_plan(text)
    disk = read_all(_merge(tmp_path, text))
    backend = open_backend("hf", plan, dtype="float32")
    try:
        assert len(backend.tokenizer) == plan.tokenizer["vocab_size"] == disk["lm_head.weight"].shape[0]
        emb = backend.model.get_input_embeddings().weight
        assert torch.equal(emb.detach().to(torch.bfloat16), disk["model.embed_tokens.weight"])
    finally:
        backend.close()


def test_pad_to_multiple_of(tmp_path, vocab_parents):
    """mergekit's tokenizer.pad_to_multiple_of: the vocabulary tensors padded up to the multiple,
    each padding row the mean of the model's rows for the real tokens (before the merge), the
    config's vocab_size padded and the tokenizer not; streamed in chunks, bred in place the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = vocab_parents
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    text = _manifest(p, weights, "tokenizer:\n  source: union\n  pad_to_multiple_of: 64")
    child = _merge(tmp_path, text)
    v = _vocab(child)
    rows = -(-len(v) // 64) * 64
    assert rows > len(v)  # the test parents' union is not already a multiple of 64
    got = read_all(child)
    assert all(got[t].shape[0] == rows for t in VOCAB_TENSORS)
    _check_rows(child, p, weights, "a", pad_to=rows)
    assert json.loads((child / "config.json").read_text())["vocab_size"] == rows
    tok = AutoTokenizer.from_pretrained(child)
    assert len(tok) == len(v)
    model = AutoModelForCausalLM.from_pretrained(child)
    ids = tok("the fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
    small = read_all(_merge(tmp_path, text, "small", memory_budget=1 << 20))  # the padding rows' own task
    assert all(torch.equal(small[k], got[k]) for k in got)
    bred = dict(engine.iter_tensors(load_plan(text), workers=1))
    assert all(torch.equal(bred[k], got[k]) for k in got)
