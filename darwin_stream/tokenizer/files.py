"""The child's tokenizer files, built again at write time from the plan's tokenizer part."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from darwin_stream.errors import DarwinError
from darwin_stream.tokenizer.load import config_vocab_size, has_tokenizer, load_tokenizer, reload
from darwin_stream.tokenizer.vocab import ParentVocab, build_vocab, vocab_digest

if TYPE_CHECKING:
    from darwin_stream.plan.types import Plan
    from darwin_stream.sources import Parent

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizers_of(keys: Sequence[str], parent_of: Callable[[str], Parent], specs: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for k in keys:
        aux = parent_of(specs[k]).read_aux()
        out[k] = load_tokenizer(specs[k], aux) if has_tokenizer(aux) else None
    return out


def parent_vocabs(keys: Sequence[str], toks: Mapping[str, Any], parent_of: Callable[[str], Parent],
                   specs: Mapping[str, str]) -> list[ParentVocab]:
    return [ParentVocab(k, toks[k], config_vocab_size(parent_of(specs[k]).config)) for k in keys]


def ids_of(config: Mapping[str, Any], name: str) -> list[int]:
    v = config.get(name)
    vs = v if isinstance(v, list) else [v]
    return [x for x in vs if isinstance(x, int) and not isinstance(x, bool)]


def remap(cfg: Mapping[str, Any], ids: Mapping[int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SPECIAL_IDS:
        v = cfg.get(name)
        if isinstance(v, list):
            new = [ids.get(x, x) if isinstance(x, int) else x for x in v]
        elif isinstance(v, int) and not isinstance(v, bool):
            new = ids.get(v, v)
        else:
            continue
        if new != v:
            out[name] = new
    return out


# --- the child's files ----------------------------------------------------------------------------


def _child_tokenizer(plan: Plan, parent_of: Callable[[str], Parent]) -> Any:
    """The tokenizer the plan describes, built again from its parents (and checked to be the same)."""
    spec = plan.tokenizer
    keys = list(spec["models"])
    toks = tokenizers_of(keys, parent_of, plan.parents)
    if spec.get("source") is None:
        tok = reload(toks[spec["base"]])
    else:
        pvs = parent_vocabs(keys, toks, parent_of, plan.parents)
        tok = build_vocab(spec["source"], pvs[0], pvs[1:], spec.get("add_tokens", [])).tokenizer
        if vocab_digest(tok.get_vocab()) != spec["digest"]:
            raise DarwinError("a parent's tokenizer changed since the plan was made; plan the merge again")
    if spec.get("chat_template"):
        tok.chat_template = spec["chat_template"]
    return tok


_LOAD_KEYS = ("is_local", "local_files_only")  # load-time arguments transformers saves back


def child_tokenizer_files(plan: Plan, parent_of: Callable[[str], Parent]) -> dict[str, bytes] | None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and chat_template.jinja) for
    a plan with a tokenizer part, plus generation_config.json with its special ids remapped;
    None when the child takes its tokenizer's files from `tokenizer_from` unchanged."""
    if not plan.tokenizer:
        return None
    tok = _child_tokenizer(plan, parent_of)
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="darwin-tok-") as d:
        tok.save_pretrained(d)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                files[name] = f.read()
    if "tokenizer_config.json" in files:
        cfg = json.loads(files["tokenizer_config.json"])
        for k in _LOAD_KEYS:
            cfg.pop(k, None)
        files["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()
    if "special_tokens_map.json" not in files and tok.special_tokens_map:
        files["special_tokens_map.json"] = (json.dumps(tok.special_tokens_map, indent=2, ensure_ascii=False) + "\n").encode()
    gen = parent_of(plan.parents[plan.config_from]).read_aux().get("generation_config.json")
    ids = {int(a): b for a, b in plan.tokenizer.get("ids", {}).items()}
    if gen is not None and ids:
        g = json.loads(bytes(gen))
        if isinstance(g, dict):
            files["generation_config.json"] = (json.dumps(g | remap(g, ids), indent=2) + "\n").encode()
    return files
