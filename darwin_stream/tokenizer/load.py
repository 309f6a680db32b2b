"""A parent's tokenizer, loaded from the files it ships, and its vocabulary's size."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from darwin_stream.bounded import clip
from darwin_stream.errors import PlanError
from darwin_stream.sources import TOKENIZER_FILES


def has_tokenizer(aux: Mapping[str, bytes]) -> bool:
    return any(n in aux for n in TOKENIZER_FILES)


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The rows a parent's config declares (a multimodal config keeps it under text_config)."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def load_tokenizer(spec: str, aux: Mapping[str, bytes]) -> Any:
    """A parent's tokenizer from its files, through a private directory (a parent may be a URL or a
    store, so its files are what we have, not a path): AutoTokenizer, offline, no remote code."""
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is built

    with tempfile.TemporaryDirectory(prefix="darwin-tok-") as d:
        for name in (*TOKENIZER_FILES, "config.json"):
            if name in aux:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(bytes(aux[name]))
        try:
            return AutoTokenizer.from_pretrained(d, trust_remote_code=False, use_fast=True, local_files_only=True)
        except Exception as e:  # a tokenizer that does not load is the parent's problem, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PlanError(f"parent {spec}: its tokenizer cannot be loaded: {clip(first)}") from None


def strip_tokenizer(spec: str, tok: Any, vocab_size: int | None) -> Any:
    """The tokenizer without tokens at ids >= the config's vocab_size (they have no rows), as
    mergekit's get_stripped_tokenizer does for the base model: only a BPE tokenizer can be cut."""
    n = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= n}
    if not unused:
        return tok
    import tokenizers  # heavy: only when a tokenizer is built

    tok = reload(tok)  # the parent's own tokenizer stays whole (tokenizer_source: <base> wants it)
    data = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else None
    if data is None or data.get("model", {}).get("type") != "BPE":
        kind = "a slow tokenizer" if data is None else f"a {data['model'].get('type')} tokenizer"
        raise PlanError(f"parent {spec}: {len(unused)} tokens lie beyond its vocab_size {n}, and {kind} cannot be cut to it")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < n]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def reload(tok: Any) -> Any:
    """A fresh copy of a tokenizer (saved and loaded again), so that adding tokens leaves it alone."""
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is built

    with tempfile.TemporaryDirectory(prefix="darwin-tok-") as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False, use_fast=True, local_files_only=True)
