"""Chat template resolution: names, Jinja text, and auto (no models needed)."""

from __future__ import annotations

from types import SimpleNamespace

from darwin_stream.tokenizer import chat


def test_chat_templates():
    tok = SimpleNamespace
    assert chat.resolve(None, []) is None
    assert chat.resolve("chatml", []) == chat.TEMPLATES["chatml"]
    assert chat.resolve("{% if x %}{{ y }}{% endif %} custom", []) == "{% if x %}{{ y }}{% endif %} custom"
    many = [tok(chat_template="T2"), tok(chat_template=" T1 "), tok(chat_template={"default": "T1"}), None,
            tok(chat_template=None)]
    assert chat.resolve("auto", many) == "T1"  # the plurality, stripped; dict templates' default
    assert chat.resolve("auto", [tok(chat_template="T2"), tok(chat_template="T1")]) == "T2"  # a tie: the first
    assert chat.resolve("auto", [tok(chat_template=None)]) is None
