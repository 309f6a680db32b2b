"""transformers backend: the same interface as the vLLM one, for machines without vLLM and for
cross-checking vLLM's numbers (both backends are handed identical token ids by tasks.py).

A plan child is bred in place: the backend keeps one model, made from the first plan's config, and
copies each tensor of every later child into its existing parameters as `engine.iter_tensors`
produces it (parents read by memory-map, nothing written to disk). Tensors whose plan did not
change since the last child are not bred again (score/breeding.py). A checkpoint directory is
loaded with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from darwin_stream.errors import PlanError
from darwin_stream.plan import Plan
from darwin_stream.score.breeding import changed_tensors, snapshot
from darwin_stream.score.child import Child, plan_config, resolve_dtype, write_skeleton
from darwin_stream.threads import torch_threads

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
        from transformers.utils import logging as hf_logging

        # A bar per checkpoint load ("Loading weights: 47/47") would scroll an evolution's display away.
        hf_logging.disable_progress_bar()
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
            # a plan with its own vocabulary (tokenizer_source) has no parent whose tokenizer it is
            tok_src = write_skeleton(child) if child.tokenizer else child.parents[child.tokenizer_from]
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
        todo = changed_tensors(self._bred, plan)
        self._bred = None  # a copy that fails half-way leaves a model of two children
        self._copy_in(dataclasses.replace(plan, tensors=todo))
        self._bred = snapshot(plan)
        return {"bred": len(todo), "skipped": len(plan.tensors) - len(todo)}

    def _build(self, config: dict[str, Any], names: tuple[str, ...]) -> None:
        """A model with the child's architecture and shapes, its weights left uninitialised: every
        one is overwritten by the breed that follows, and random init was most of a first load
        (0.6B geometry in float32, one thread: from_config 15.3 s with init, 0.22 s without)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self._forget()
        # for_model only instantiates transformers' own config classes: it cannot run remote code
        # (and a trust_remote_code keyword would become a config attribute).
        cfg = AutoConfig.for_model(**config)
        with skipped_init():
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype, trust_remote_code=False)
        model.tie_weights()  # post_init ties inside the init that was skipped
        model = model.to(self.device).eval()
        self._targets = targets(model, names)
        self.model, self._config, self._names = model, config, names

    @torch.no_grad()
    def _copy_in(self, plan: Plan) -> None:
        from darwin_stream import engine

        # Blended on the CPU, whatever the model's device: the same arithmetic as a disk merge, so
        # the bred child is the disk child bit for bit; the copy casts to the model's dtype.
        with torch_threads(1):
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



def skipped_init() -> contextlib.AbstractContextManager:
    """transformers' context that skips weight initialisation (buffers such as rotary frequencies
    are still computed by their modules); none where this transformers lacks the (internal) API."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


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
    (a missing `model.` prefix, legacy multimodal layouts). Tied weights follow from_pretrained:
    a tied copy that the plan lacks (lm_head of tied embeddings: the checkpoints omit it) shares
    its source; one that the plan has too is untied (untie_filled).
    """
    state = model.state_dict(keep_vars=True)
    key = renamer(model, state)
    keys = {name: name if name in state else key(name) for name in names}
    filled = set(keys.values())
    tied = untie_filled(model, filled)
    state = model.state_dict(keep_vars=True)
    unexpected = [name for name, k in keys.items() if k not in state]
    missing = [k for k in state if k not in filled and tied.get(k) not in filled]
    if missing or unexpected:
        raise PlanError(f"the plan does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
                        f" ({len(missing)} and {len(unexpected)} in all)")
    return {name: state[k].data for name, k in keys.items()}


def untie_filled(model: Any, filled: set[str]) -> dict[str, str]:
    """Give a tied weight whose both halves the plan fills a parameter of its own; return the ties
    left (target -> source). from_pretrained (transformers 5.19) does not tie a pair that a
    checkpoint holds with different values, and a bred pair may differ; an equal pair computes
    the same untied."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in list(tied.items()):
        if target in filled and source in filled:
            module_name, _, attr = target.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, torch.nn.Parameter(torch.empty_like(getattr(module, attr))))
            del tied[target]
            model.all_tied_weights_keys.pop(target, None)
    return tied


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
