"""The child's tokenizer when the manifest asks for one: mergekit's tokenizer_source, `tokenizer:`
section and chat_template (docs/manifest.md, "Tokenizers").

    load.py   a parent's tokenizer from its files (offline, trust_remote_code=False), stripped
              to the rows its config declares
    vocab.py  the child's vocabulary (union, base or one model, plus added tokens) and, for each
              parent, where each child token sits in it
    chat.py   chat templates: the names mergekit ships (darwin-stream's own text), Jinja, auto
    files.py  the files a child gets (built again from the plan at write time)

The planning side is plan/vocab.py (the plan's tokenizer part) and plan/vocab_rows.py (mergekit's
rule for the rows a parent lacks). transformers is imported only inside the functions that build
tokenizers: it is heavy, and a plan without a tokenizer section never needs it.
"""

from __future__ import annotations

from darwin_stream.tokenizer.files import child_tokenizer_files

__all__ = ["child_tokenizer_files"]
