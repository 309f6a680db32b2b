"""transformers backend: the same interface as the vLLM one, for machines without vLLM and for
cross-checking vLLM's numbers (both backends are handed identical token ids by tasks.py).

A plan child is bred in place: the backend keeps one model, made from the first plan's config, and
copies each tensor of every later child into its existing parameters as `engine.iter_tensors`
produces it (parents read by memory-map, nothing written to disk). Tensors whose plan did not
change since the last child are not bred again (score/breeding.py). A checkpoint directory is
loaded with `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from darwin_stream.errors import PlanError
from darwin_stream.plan import Plan
from darwin_stream.score.backend import Child, plan_config, resolve_dtype
from darwin_stream.score.breeding import changed_tensors

BATCH = 16

# Prompts per generate() call. Measured on the tiny demo Qwen3 (float32, one torch thread on the 2
# shared cores, prompts of 2-20 tokens, 16 new tokens, median of 5): 64 prompts take 4.2 s one at a
# time, 0.61 s in batches of 8, 0.42 s of 16, 0.36 s of 32, 0.23 s of 64; 128 prompts take 0.39 s
# in batches of 32, 0.33 s of 64, 0.27 s of 128. Past 64 the gain is small while the KV cache grows
# with every row, hence 64, and GEN_TOKENS also bounds the cache a batch holds: 2^14 tokens (rows x
# (prompt + new tokens)) are 3.5 GiB on the 0.6B geometry in float32 (224 KiB a token).
GEN_BATCH = 64
GEN_TOKENS = 2**14


class HfBackend:
    name = "hf"

    def __init__(self, first: Child, *, dtype: torch.dtype | str = "auto", device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, resolve_dtype(dtype, first, on_gpu=self.device.startswith("cuda")))
        self.dtype = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self._config: dict[str, Any] | None = None  # the plan config the model was built from
        self._names: tuple[str, ...] = ()  # the plan tensor names it was built for
        self._targets: dict[str, torch.Tensor] = {}  # plan tensor name -> the model tensor it fills
        self._bred: Plan | None = None  # the plan whose child the model holds; None when unknown
        self.load(first)

    def load(self, child: Child) -> dict[str, Any]:
        """Make `child` the live model; for a plan, say how many tensors were bred and skipped."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if isinstance(child, Plan):
            info = self._breed(child)
            tok_src = child.parents[child.tokenizer_from]
        else:
            self._forget()
            model = AutoModelForCausalLM.from_pretrained(child, dtype=self.dtype, trust_remote_code=False)
            self.model = model.to(self.device).eval()
            tok_src = child
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=False)
        return {"seconds": time.perf_counter() - t0, **info}

    def _forget(self) -> None:
        self.model, self._config, self._names, self._targets, self._bred = None, None, (), {}, None

    def _breed(self, plan: Plan) -> dict[str, int]:
        config = plan_config(plan)
        names = tuple(tp.name for tp in plan.tensors)
        if self.model is None or config != self._config or names != self._names:
            self._build(config, names)
        # A tied copy (lm_head of tied embeddings) has no target of its own: it is its source.
        todo = [tp for tp in changed_tensors(self._bred, plan) if tp.name in self._targets]
        self._bred = None  # a copy that fails half-way leaves a model of two children
        self._copy_in(dataclasses.replace(plan, tensors=todo))
        self._bred = plan
        return {"bred": len(todo), "skipped": len(plan.tensors) - len(todo)}

    def _build(self, config: dict[str, Any], names: tuple[str, ...]) -> None:
        """A model with the child's architecture and shapes (its random weights are all overwritten)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self._forget()
        # for_model only instantiates transformers' own config classes: it cannot run remote code
        # (and a trust_remote_code keyword would become a config attribute).
        cfg = AutoConfig.for_model(**config)
        model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype, trust_remote_code=False)
        model = model.to(self.device).eval()
        self._targets = targets(model, names)
        self.model, self._config, self._names = model, config, names

    @torch.no_grad()
    def _copy_in(self, plan: Plan) -> None:
        from darwin_stream import engine

        # Blended on the CPU, whatever the model's device: the same arithmetic as a disk merge, so
        # the bred child is the disk child bit for bit; the copy casts to the model's dtype.
        for name, t in engine.iter_tensors(plan):
            target = self._targets[name]
            if tuple(target.shape) != tuple(t.shape):
                raise PlanError(f"{name}: the plan makes shape {tuple(t.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(t)

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """Right-padded batches, float32 log-softmax over the model's logits."""
        out: list[list[float] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for lo in range(0, len(order), BATCH):
            idx = order[lo : lo + BATCH]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            lps = torch.log_softmax(logits.float(), dim=-1)
            got = lps[:, :-1].gather(-1, ids[:, 1:, None].to(self.device))[..., 0].cpu()
            for r, i in enumerate(idx):
                out[i] = got[r, : len(seqs[i]) - 1].tolist()
        return [o or [] for o in out]

    @torch.no_grad()
    def generate(self, seqs: list[list[int]], max_tokens: int, stop: list[str]) -> list[str]:
        """Greedy, in left-padded batches (gen_batches); each output ends at its first end-of-sequence
        token and before its first stop string. transformers derives the position ids from the
        attention mask, so a padded prompt generates what it generates alone (tested)."""
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        texts: list[str] = [""] * len(seqs)
        for idx in gen_batches([len(s) for s in seqs], max_tokens):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(seqs[i]) :] = torch.tensor(seqs[i])
                mask[r, width - len(seqs[i]) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
            )
            for r, i in enumerate(idx):
                texts[i] = cut(self.tokenizer.decode(until(gen[r, width:].tolist(), eos), skip_special_tokens=True), stop)
        return texts

    def close(self) -> None:
        self._forget()


def gen_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Prompt indices in batches of similar lengths (sorted, so a batch pads little), at most
    GEN_BATCH rows and, past its first row, GEN_TOKENS tokens of cache (rows x (longest + new))."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        rows = out[-1] if out else []
        if not rows or len(rows) == GEN_BATCH or (len(rows) + 1) * (lengths[i] + max_tokens) > GEN_TOKENS:
            out.append([i])
        else:
            rows.append(i)
    return out


def until(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens before the first end-of-sequence one (after it, a finished row holds padding)."""
    for k, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:k]
    return tokens


def cut(text: str, stop: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    at = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:at] if at >= 0 else text


def targets(model: Any, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Plan tensor name -> the model tensor (parameter or persistent buffer) it is copied into.

    Checkpoint names are the model's own state-dict keys for the dense Qwen3, Llama and Gemma
    families in transformers 5; other names go through transformers' own load-time renamings
    (a missing `model.` prefix, legacy multimodal layouts). A tied copy (lm_head of tied
    embeddings, whose checkpoint usually omits it) is left out when its source is in the plan:
    from_pretrained ties it to the source, so the source's values win there too.
    """
    state = model.state_dict(keep_vars=True)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source, when tied
    key = renamer(model, state)
    keys = {name: name if name in state else key(name) for name in names}
    filled = set(keys.values())
    unexpected = [name for name, k in keys.items() if k not in state]
    missing = [k for k in state if k not in filled and tied.get(k) not in filled]
    if missing or unexpected:
        raise PlanError(f"the plan does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
                        f" ({len(missing)} and {len(unexpected)} in all)")
    return {name: state[k].data for name, k in keys.items() if tied.get(k) not in filled}


def renamer(model: Any, state: dict[str, Any]):
    """A checkpoint name -> state-dict key function using transformers' renamings, or the identity
    where this transformers has none. Conversions that fuse tensors (MoE experts) are not applied:
    one plan tensor must fill one model tensor, so such names stay unmatched and are reported."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older or newer transformers without this (internal) API
        return lambda name: name
    renamings = [c for c in get_model_conversion_mapping(model) if not isinstance(c, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    return lambda name: rename_source_key(name, renamings, [], prefix, state)[0]
