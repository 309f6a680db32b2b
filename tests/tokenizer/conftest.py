"""Three tiny qwen3 parents whose vocabularies differ, built once per session (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
C_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="session")
def vocab_parents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a: the demo vocabulary + <|im_start|>, <|im_end|> (special); b: a BPE trained on more text (its
    ordinary tokens in another order, 15 of them new), a plain added token `zebra`, and <tool>,
    <|im_end|> (special, at another id than a's); c: a third BPE with <|im_start|>, <tool> and a chat
    template of its own."""
    from darwin_stream.demo import build_vocab_model

    root = tmp_path_factory.mktemp("vocab")
    return {
        "a": build_vocab_model(root / "a", 1, special=CHATML_TOKENS),
        "b": build_vocab_model(root / "b", 2, extra_corpus="zebras and giraffes graze on the savanna. " * 3,
                               vocab_size=330, added=("zebra",), special=("<tool>", "<|im_end|>")),
        "c": build_vocab_model(root / "c", 3, extra_corpus="the tool calls a function. " * 3, vocab_size=325,
                               special=("<|im_start|>", "<tool>"), chat_template=C_TEMPLATE),
    }
