"""vLLM backend: one live engine, many children swapped or bred into it.

Starting a vLLM engine costs about 30 s here, so a backend creates one `vllm.LLM` and keeps it:
- a checkpoint child is swapped in with `collective_rpc("reload_weights", weights_path=...)`;
- a plan child is bred inside the worker (`worker.BreedWorker.darwin_breed`): only the plan's JSON
  crosses the process boundary, the worker reads the parents by memory-map and feeds the blended
  tensors straight into the model. Nothing is written to disk.
After either, the prefix cache is reset: cached KV blocks were computed with the old weights.

This module is imported only by score/: the core merge path never imports vLLM.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from darwin_stream.errors import ScoreError
from darwin_stream.plan import Plan
from darwin_stream.score.child import Child, plan_config, resolve_dtype, write_skeleton

WORKER_CLS = "darwin_stream.score.worker.BreedWorker"
DEFAULT_MAX_MODEL_LEN = 2048


def _max_model_len(config: dict[str, Any], wanted: int | None) -> int:
    """Small by default (KV cache is sized for it); never above what the model supports."""
    limit = config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    return min(wanted or DEFAULT_MAX_MODEL_LEN, int(limit))


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        first: Child,
        *,
        max_model_len: int | None = None,
        dtype: str = "auto",
        engine_args: dict[str, Any] | None = None,
    ):
        # CPU: vLLM's default KV cache reservation is large; 1 GiB is plenty for scoring short items.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self._skeleton: Path | None = None
        if isinstance(first, Plan):
            # No checkpoint to start from: a weightless skeleton with dummy weights, then breed in.
            self._skeleton = write_skeleton(first)
            model, load_format = str(self._skeleton), "dummy"
            config = plan_config(first)
        else:
            model, load_format = first, "auto"
            # Never the parent's own Python: with auto_map and an unknown model type, transformers
            # would otherwise ask "run the custom code? [y/N]" on stdout, and a "y" runs it.
            try:
                config = AutoConfig.from_pretrained(first, trust_remote_code=False).to_dict()
            except ValueError as e:
                raise ScoreError(f"{first}: cannot load its config.json ({str(e).splitlines()[0][:200]})") from None
        self.load_format = load_format
        self.dtype = resolve_dtype(dtype, first, on_gpu=_on_gpu())
        self.geometry = _geometry(config)
        self.max_model_len = _max_model_len(config, max_model_len)
        self.llm = LLM(
            model=model,
            dtype=self.dtype,
            enforce_eager=True,  # no graph capture / compile: start-up time matters more here
            max_model_len=self.max_model_len,
            load_format=load_format,
            worker_extension_cls=WORKER_CLS,
            seed=0,
            **{**(engine_args or {}), "trust_remote_code": False},  # whatever the engine args say
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        self.current: Child = first
        if isinstance(first, Plan):
            self.load(first)

    def load(self, child: Child, *, digests: bool = False) -> dict[str, Any]:
        """Swap `child` into the live engine; returns {"seconds": ..., ...} (and digests if asked)."""
        t0 = time.perf_counter()
        _check_fits(self.geometry, child)
        if isinstance(child, Plan):
            info = self.llm.collective_rpc("darwin_breed", args=(child.to_json(), digests))[0]
        elif self.load_format == "auto" and not digests:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": _local_dir(child)})
            info = {}
        else:
            # An engine started from a skeleton has no disk loader: stream the files ourselves.
            info = self.llm.collective_rpc("darwin_load_dir", args=(_local_dir(child), digests))[0]
        self.llm.reset_prefix_cache()
        self.current = child
        return {**info, "seconds": time.perf_counter() - t0}

    def _check_len(self, seqs: list[list[int]], extra: int) -> None:
        for s in seqs:
            if len(s) + extra > self.max_model_len:
                raise ScoreError(
                    f"an item is {len(s)} tokens (+{extra} to generate), over max_model_len {self.max_model_len}"
                )

    def token_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """log P(token i | tokens < i) for i >= 1, from prompt logprobs: one prefill per sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_len(seqs, 1)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        result = []
        for seq, out in zip(seqs, outs, strict=True):
            plp = out.prompt_logprobs or []
            result.append([float(plp[i][seq[i]].logprob) for i in range(1, len(seq))])
        return result

    def generate(self, seqs: list[list[int]], max_tokens: int, stop: list[str]) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_len(seqs, max_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or None)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def close(self) -> None:
        """Shut the engine's processes down now, rather than at interpreter exit (where a crash in
        teardown can turn a finished evaluation into exit code 134)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):  # best effort: the results are already out
                llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._skeleton is not None:
            import shutil

            shutil.rmtree(self._skeleton, ignore_errors=True)
            self._skeleton = None


GEOMETRY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _geometry(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in GEOMETRY_KEYS}


def _check_fits(geometry: dict[str, Any], child: Child) -> None:
    """A live engine's tensors have fixed shapes: refuse, in one line, a child of another geometry
    (reloading it would fail deep inside vLLM, or silently load part of it)."""
    if isinstance(child, Plan):
        config = plan_config(child)
    else:
        p = Path(child) / "config.json"
        if not p.is_file():
            return  # a repo id: vLLM resolves it and reports mismatches itself
        import json

        config = json.loads(p.read_text())
    got = _geometry(config)
    diff = [f"{k} {geometry[k]} -> {got[k]}" for k in GEOMETRY_KEYS if None not in (got[k], geometry[k]) and got[k] != geometry[k]]
    if diff:
        raise ScoreError(f"cannot swap into this engine: the child's geometry differs ({', '.join(diff)}); score it in a separate run")


def _local_dir(spec: str) -> str:
    """vLLM's reload resolves repo ids itself; local paths are made absolute for the worker."""
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec
