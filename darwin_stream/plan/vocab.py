"""The tokenizer part of a plan: the child's vocabulary, its config, and its vocabulary tensors' rows
(what plan/merge.py asks for when a manifest has tokenizer_source, `tokenizer:` or chat_template)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from darwin_stream.errors import PlanError
from darwin_stream.plan.types import SourceRef, TensorPlan
from darwin_stream.plan.vocab_rows import Input, TokenSource, default_rows, input_runs
from darwin_stream.tokenizer import chat
from darwin_stream.tokenizer.files import SPECIAL_IDS, ids_of, parent_vocabs, remap, tokenizers_of
from darwin_stream.tokenizer.vocab import ChildVocab, build_vocab, vocab_digest

if TYPE_CHECKING:
    from darwin_stream.manifest import Manifest
    from darwin_stream.sources import Parent

VOCAB_ROLES = ("embed", "lm_head")  # token-indexed rows: mergekit's vocabulary_axis weights


@dataclass
class TokenizerPlan:
    spec: dict[str, Any]  # Plan.tokenizer
    overrides: dict[str, Any]  # config.json: vocab_size, special token ids
    vocab: ChildVocab | None  # None: only the chat template changes
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None  # mergekit's tokenizer.pad_to_multiple_of

    @property
    def rows(self) -> int:
        """Rows of the child's vocabulary tensors: the vocabulary, padded up to the multiple."""
        assert self.vocab is not None
        return padded_rows(self.vocab.size, self.pad_to_multiple_of)

    def reindexes(self, role: str | None) -> bool:
        """Whether a tensor of this role takes its rows in the child's token order."""
        if self.vocab is not None and role == "per_layer_embed":
            raise PlanError("a tokenizer source with per-layer token embeddings (Gemma 3n/4) is not supported")
        return self.vocab is not None and role in VOCAB_ROLES

    def gathered(self, tp: TensorPlan, order: Sequence[tuple[str, str, int]], base: str | None) -> TensorPlan:
        """`tp` (shaped for the child's vocabulary) with each input's rows gathered in child order.

        `order` is every input of the tensor as (parent key, tensor, stored rows), in source order:
        the order mergekit averages in and picks a token's single donor by."""
        assert self.vocab is not None
        inputs = [Input(k, t, n) for k, t, n in order]
        defaults = default_rows(self.vocab, inputs, base, self.tokens, tp.name)
        forced = {self.vocab.vocab[t] for t, s in self.tokens.items() if s.force}
        by = {(i.key, i.tensor): i for i in inputs}

        def g(ref: SourceRef) -> SourceRef:
            return replace(ref, rows=input_runs(self.vocab, by[(ref.parent, ref.tensor)], defaults, forced, self.rows))

        return replace(tp, base=g(tp.base) if tp.base else None, models=tuple(g(m) for m in tp.models))


def padded_rows(size: int, multiple: int | None) -> int:
    """mergekit's rule: the vocabulary size rounded up to a multiple of `multiple` (None: as it is)."""
    if not multiple or size % multiple == 0:
        return size
    return size + multiple - size % multiple


def _source(manifest: Manifest) -> str | None:
    if manifest.tokenizer is not None:
        return manifest.tokenizer.source
    return manifest.tokenizer_source


def plan_tokenizer(manifest: Manifest, parent_of: Callable[[str], Parent], key_of: Callable[[str], str | None],
                   specs: Mapping[str, str], base_key: str) -> TokenizerPlan | None:
    """The child's tokenizer for a manifest with tokenizer_source, `tokenizer:` or chat_template.

    `specs` maps each parent key of the merge (base first, then in manifest order) to its spec,
    `key_of` maps a model reference as written to its key (None: not a model of this merge)."""
    source = _source(manifest)
    if source is None and manifest.chat_template is None:
        return None
    where = "tokenizer.source" if manifest.tokenizer is not None else "tokenizer_source"
    if source not in (None, "union", "base"):
        key = key_of(source)
        if key is None:
            raise PlanError(f"{where}: {source} is not a model of this merge (expected union, base or one of: "
                            f"{', '.join(specs.values())})")
        source = key
    keys = list(specs)
    toks = tokenizers_of(keys, parent_of, specs)
    if toks[base_key] is None:
        raise PlanError(f"parent {specs[base_key]}: ships no tokenizer, and the child's tokenizer is built from it")
    spec: dict[str, Any] = {"source": source, "base": base_key, "models": keys}
    vocab = None
    tokens: dict[str, TokenSource] = {}
    overrides: dict[str, Any] = {}
    if source is not None:
        entries = (manifest.tokenizer.tokens or {}) if manifest.tokenizer is not None else {}
        spec["add_tokens"] = list(entries)
        pvs = parent_vocabs(keys, toks, parent_of, specs)
        vocab = build_vocab(source, pvs[0], pvs[1:], spec["add_tokens"])
        tokens = _token_sources(entries, key_of, vocab)
        spec |= {"vocab_size": vocab.size, "digest": vocab_digest(vocab.vocab)}
        pad = manifest.tokenizer.pad_to_multiple_of if manifest.tokenizer is not None else None
        if pad:
            spec |= {"pad_to_multiple_of": pad, "rows": padded_rows(vocab.size, pad)}
        config = parent_of(specs[base_key]).config
        ids = _id_map(config, vocab, base_key)
        spec["ids"] = {str(a): b for a, b in ids.items()}
        overrides = _config_overrides(config, padded_rows(vocab.size, pad), ids)
    else:
        pad = None
    spec["chat_template"] = chat.resolve(manifest.chat_template, [toks[k] for k in keys])
    return TokenizerPlan(spec, overrides, vocab, tokens, pad)


def _token_sources(entries: Mapping[str, Any], key_of: Callable[[str], str | None],
                   vocab: ChildVocab) -> dict[str, TokenSource]:
    from darwin_stream.manifest import ModelTokenEmbedding, ZeroEmbedding

    out = {}
    for token, e in entries.items():
        where = f"tokenizer.tokens.{token}.source"
        src = e.source
        if src is None:
            continue  # mergekit's default rule decides
        if isinstance(src, ZeroEmbedding):
            out[token] = TokenSource("zero", force=e.force, where=where)
            continue
        model = src.model if isinstance(src, ModelTokenEmbedding) else src
        key = key_of(model)
        if key is None:
            raise PlanError(f"{where}: {model} is not a model of this merge")
        row = None
        if isinstance(src, ModelTokenEmbedding):
            row = src.token_id
            if src.token is not None:
                if src.token not in vocab.original.get(key, {}):
                    raise PlanError(f"{where}: token {src.token!r} is not in the vocabulary of {model}")
                row = vocab.original[key][src.token]
        elif vocab.positions[key][vocab.vocab[token]] < 0 and e.force:
            raise PlanError(f"{where}: token {token!r} is not in the vocabulary of {model}")
        kind = "model_token" if isinstance(src, ModelTokenEmbedding) else "model"
        out[token] = TokenSource(kind, key, row, e.force, where)
    return out


def _id_map(config: Mapping[str, Any], vocab: ChildVocab, base_key: str) -> dict[int, int]:
    """The base's special token ids (config bos/eos/pad) -> the same tokens' ids in the child."""
    by_id = {i: t for t, i in vocab.original.get(base_key, {}).items()}
    out: dict[int, int] = {}
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping):
            for name in SPECIAL_IDS:
                for i in ids_of(cfg, name):
                    tok = by_id.get(i)
                    if tok is not None and tok in vocab.vocab:
                        out[i] = vocab.vocab[tok]
                    else:  # that token is gone: the child tokenizer's own one, if it has it
                        own = getattr(vocab.tokenizer, name, None)
                        if isinstance(own, int):
                            out[i] = own
    return out


def _config_overrides(config: Mapping[str, Any], size: int, ids: Mapping[int, int]) -> dict[str, Any]:
    """vocab_size and special ids, where the config keeps them (a multimodal one: in text_config)."""
    out: dict[str, Any] = {}
    text = config.get("text_config")
    if isinstance(text, Mapping) and "vocab_size" in text and "vocab_size" not in config:
        out["text_config"] = {"vocab_size": size, **remap(text, ids)}
    else:
        out["vocab_size"] = size
        if isinstance(text, Mapping) and remap(text, ids):
            out["text_config"] = remap(text, ids)
    return out | remap(config, ids)


