"""The child's vocabulary, and where each of its tokens sits in each parent (mergekit's build.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from darwin_stream.errors import PlanError
from darwin_stream.tokenizer.load import reload, strip_tokenizer


@dataclass
class ParentVocab:
    key: str  # plan key of the parent
    tokenizer: Any  # None: it ships none, and is taken to share the base's (as mergekit assumes)
    vocab_size: int | None  # rows its config declares


@dataclass
class ChildVocab:
    tokenizer: Any  # the child's tokenizer (transformers)
    vocab: dict[str, int]  # child token -> child id (= row)
    positions: dict[str, list[int]]  # parent key -> for each child id, its row in that parent, or -1
    original: dict[str, dict[str, int]]  # parent key -> that parent's own vocabulary

    @property
    def size(self) -> int:
        return len(self.vocab)


def vocab_digest(vocab: Mapping[str, int]) -> str:
    """What says that a rebuilt tokenizer is the one planned: the token -> id map."""
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _union(base: ParentVocab, others: Sequence[ParentVocab]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokenizer, then every other parent's ordinary
    tokens it lacks (as added tokens, in parent order), then every added token (first settings win).

    Within a parent, tokens are taken in id order. mergekit takes them in the iteration order of
    the dict `get_vocab()` returns, which the tokenizers library builds from a hash map: measured,
    two runs on the same parents gave 10 of 15 new tokens other ids. So a union child's extra
    tokens match mergekit's by token, not by id (tools/parity_methods.py compares rows by token).
    """
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for pv in (base, *others):
        tok = pv.tokenizer
        n = pv.vocab_size or tok.vocab_size
        decoder = tok.added_tokens_decoder
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < n:
                ordinary.setdefault(t, None)
        for i, info in decoder.items():
            if i < n:
                added.setdefault(info.content, info)
    out = reload(base.tokenizer)
    base_vocab = base.tokenizer.get_vocab()
    for t in ordinary:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocab(
    source: str,
    base: ParentVocab,
    others: Sequence[ParentVocab],
    add_tokens: Sequence[str],
) -> ChildVocab:
    """`source` is "union", "base" or a parent key. `base` is stripped to its rows first (mergekit
    strips only the base); a parent whose tokenizer is None is aligned as if it were the base's."""
    base = ParentVocab(base.key, strip_tokenizer(base.key, base.tokenizer, base.vocab_size), base.vocab_size)
    loaded = [pv for pv in others if pv.tokenizer is not None]
    if source == "union":
        child = _union(base, loaded)
    elif source == "base":
        child = base.tokenizer
    else:
        (pv,) = [p for p in (base, *others) if p.key == source] or [None]
        if pv is None or pv.tokenizer is None:
            raise PlanError(f"tokenizer source {source}: that parent ships no tokenizer")
        child = reload(pv.tokenizer)
    have = set(child.get_vocab())
    for t in add_tokens:
        if t not in have:
            child.add_tokens(t)
            have.add(t)
    vocab = dict(child.get_vocab())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PlanError(f"the child's tokenizer has {len(vocab)} tokens but ids up to {max(vocab.values())}; "
                        "its ids must be 0..n-1 to index embedding rows")
    positions: dict[str, list[int]] = {}
    original: dict[str, dict[str, int]] = {}
    for pv in (base, *others):
        own = (pv.tokenizer or base.tokenizer).get_vocab()
        n = pv.vocab_size or len(own)
        at = [-1] * len(vocab)
        for t, i in vocab.items():
            j = own.get(t, -1)
            at[i] = j if j < n else -1  # a token beyond the parent's rows has no row there
        positions[pv.key] = at
        if pv.tokenizer is not None:
            original[pv.key] = dict(own)
    return ChildVocab(child, vocab, positions, original)
