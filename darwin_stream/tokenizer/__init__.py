"""The child's tokenizer when the manifest asks for one: mergekit's tokenizer_source, `tokenizer:`
section and chat_template (docs/manifest.md, "Tokenizers").

    load.py   a parent's tokenizer from its files (offline, trust_remote_code=False), stripped
              to the rows its config declares
    vocab.py  the child's vocabulary (union, base or one model, plus added tokens) and, for each
              parent, where each child token sits in it
    rows.py   mergekit's rule for the rows a parent lacks, as plan data (RowRun) per input
    chat.py   chat templates: the names mergekit ships (darwin-stream's own text), Jinja, auto
    plan.py   what the planner calls: the tokenizer part of a Plan, and the files a child gets

transformers is imported only inside the functions that build tokenizers (it is heavy, and a plan
without a tokenizer section never needs it).
"""

from __future__ import annotations

from darwin_stream.tokenizer.plan import TokenizerPlan, child_tokenizer_files, plan_tokenizer

__all__ = ["TokenizerPlan", "child_tokenizer_files", "plan_tokenizer"]
