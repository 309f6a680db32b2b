"""Tiny real-architecture parents, built locally from transformers configs (no download).

The README's first command, the tests and the benchmarks all breed from these. Two parents of one
architecture differ only by their random initialisation seed; they share one tokenizer, trained here
on a few sentences so that a child can tokenize, generate and be scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a merge blends the weights of two parents into one child without training. "
    "one two three four five six seven eight nine ten. "
    "paris is the capital of france. berlin is the capital of germany. "
    "question: what is two plus two? answer: four. "
) * 4

VOCAB_SIZE = 320

# Small enough to build in a second, large enough for vLLM's CPU kernels (head_dim 64).
TINY_CONFIGS: dict[str, dict] = {
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # Breeding pairs (issue 4): a Gemma-4 text father and a hybrid Qwen3.5 text mother with the same
    # hidden size (128) and different FFN widths, so a transplant must pad; gemma3 for a third layout.
    "gemma4": dict(
        model_type="gemma4_text",
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        global_head_dim=64,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB_SIZE,
        sliding_window=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen3_5": dict(
        model_type="qwen3_5_text",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}

# Multimodal parents (`...ForConditionalGeneration`): the text model under `model.language_model.`
# and a vision tower beside it, as the real Gemma-4 checkpoints are published.
TINY_MULTIMODAL_CONFIGS: dict[str, dict] = {
    "gemma4": dict(
        model_type="gemma4",
        text_config={k: v for k, v in TINY_CONFIGS["gemma4"].items() if k != "model_type"},
        vision_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            patch_size=4,
            position_embedding_size=64,
        ),
        audio_config=None,
        # Special tokens inside the tiny vocabulary.
        image_token_id=VOCAB_SIZE - 1,
        boi_token_id=VOCAB_SIZE - 2,
        eoi_token_id=VOCAB_SIZE - 3,
        video_token_id=VOCAB_SIZE - 4,
        boa_token_id=VOCAB_SIZE - 5,
        eoa_token_index=VOCAB_SIZE - 6,
        audio_token_id=VOCAB_SIZE - 7,
    ),
}


def build_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer trained on CORPUS, saved in Hugging Face's format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)


def build_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "200KB",
    overrides: dict | None = None,
) -> Path:
    """Save a randomly initialised tiny `arch` model (several shards) with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's output is the child, not shard-writing bars
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {**TINY_CONFIGS[arch], **(overrides or {})}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type, **{"vocab_size": VOCAB_SIZE, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, **spec}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norms at 1.0 in both parents; perturb them so every tensor differs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    build_tokenizer(out)
    gen = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def build_vocab_model(
    out_dir: str | Path,
    seed: int,
    *,
    extra_corpus: str = "",
    vocab_size: int = VOCAB_SIZE,
    added: tuple[str, ...] = (),
    special: tuple[str, ...] = (),
    chat_template: str | None = None,
) -> Path:
    """A tiny qwen3 model whose vocabulary is its own: a BPE trained on CORPUS + `extra_corpus`
    (ordinary tokens in another order), then `added` and `special` tokens, with one embedding and
    lm_head row per token. Parents for the tokenizer modes (tokenizer_source: union, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS + extra_corpus], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.add_tokens(list(added))
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    if chat_template:
        fast.chat_template = chat_template
    out = build_model(out_dir, seed=seed, overrides={"vocab_size": len(fast.get_vocab())})
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / f).unlink(missing_ok=True)
    fast.save_pretrained(out)
    return out


def build_multimodal_model(
    out_dir: str | Path,
    arch: str = "gemma4",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "200KB",
    overrides: dict | None = None,
) -> Path:
    """Save a tiny multimodal (`...ForConditionalGeneration`) model with its tokenizer.

    `overrides` update the text config (the part breeding changes). Why a separate builder: these
    models are not AutoModelForCausalLM classes, and their config nests the text model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(TINY_MULTIMODAL_CONFIGS[arch]))
    model_type = spec.pop("model_type")
    spec["text_config"].update(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=0, pad_token_id=1, **(overrides or {}))
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    build_tokenizer(out)
    gen = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


DEMO_MANIFEST = """\
# darwin-stream demo: a mergekit-style slerp of two tiny Qwen3 parents.
merge_method: slerp
base_model: {father}
models:
  - model: {father}
  - model: {mother}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3, 0.7, 1.0]
    - filter: mlp
      value: [1.0, 0.5, 0.7, 0.3, 0.0]
    - value: 0.5
dtype: bfloat16
"""


def build_demo(workdir: str | Path) -> Path:
    """Two tiny parents and a manifest that merges them; returns the manifest's path."""
    work = Path(workdir)
    father = build_model(work / "parents" / "father", seed=1)
    mother = build_model(work / "parents" / "mother", seed=2)
    manifest = work / "demo.yaml"
    manifest.write_text(DEMO_MANIFEST.format(father=father, mother=mother))
    return manifest
