"""transformers backend: the same interface as the vLLM one, for machines without vLLM and for
cross-checking vLLM's numbers (both backends are handed identical token ids by tasks.py).

A plan child is built in this process from `engine.iter_tensors(plan)` (parents read by memory-map,
nothing written to disk) and loaded into a model made from the child's config.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from darwin_stream.plan import Plan
from darwin_stream.score.backend import Child, plan_config, resolve_dtype

BATCH = 16


class HfBackend:
    name = "hf"

    def __init__(self, first: Child, *, dtype: torch.dtype | str = "auto", device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, resolve_dtype(dtype, first, on_gpu=self.device.startswith("cuda")))
        self.dtype = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.load(first)

    def load(self, child: Child) -> dict[str, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        if isinstance(child, Plan):
            from darwin_stream import engine

            config = AutoConfig.for_model(**plan_config(child))
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            state = {name: t for name, t in engine.iter_tensors(child)}
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
            if set(missing) - tied or unexpected:
                raise RuntimeError(f"plan does not fit its config: missing {missing}, unexpected {unexpected}")
            model.tie_weights()
            tok_src = child.parents[child.tokenizer_from]
        else:
            model = AutoModelForCausalLM.from_pretrained(child, dtype=self.dtype)
            tok_src = child
        self.model = model.to(self.device).eval()
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_src)
        return {"seconds": time.perf_counter() - t0}

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
        """Greedy, one sequence at a time (no padding subtleties); cut before the first stop string."""
        texts = []
        for s in seqs:
            ids = torch.tensor([s], device=self.device)
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
            text = self.tokenizer.decode(gen[0, len(s) :], skip_special_tokens=True)
            cut = min((text.find(x) for x in stop if x and x in text), default=-1)
            texts.append(text[:cut] if cut >= 0 else text)
        return texts

    def close(self) -> None:
        self.model = None
