"""Code that runs inside vLLM's worker process (`worker_extension_cls`).

vLLM mixes this class into its worker, so its methods can be called from the scorer's process with
`llm.collective_rpc("darwin_breed", args=(plan_json,))`. Only small, plain data crosses the process
boundary (a plan as JSON text, a path); tensors cannot (they are not serialisable there), so the
worker reads the parents itself, by memory-map, and blends them with the merge engine's own method
functions. Nothing is written to disk.

Method names carry a `darwin_` prefix because vLLM refuses an extension attribute that clashes with
one of the worker's own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def iter_dir(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a local safetensors checkpoint, one at a time, by memory-map."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, sf.get_tensor(name)


class BreedWorker:
    """Extension methods for vLLM's worker; `self` is the worker (it has `model_runner`)."""

    model_runner: Any  # provided by vLLM's worker class

    def _darwin_feed(self, tensors: Iterable[tuple[str, torch.Tensor]], digests: bool) -> dict[str, Any]:
        """Stream `tensors` into the live model; return timing and, if asked, a digest per tensor."""
        sums: dict[str, str] = {}
        count = 0

        def feed() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, t in tensors:
                if digests:
                    sums[name] = tensor_digest(t)
                count += 1
                yield name, t

        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=feed())
        return {"seconds": time.perf_counter() - t0, "tensors": count, "digests": sums}

    def darwin_breed(self, plan_json: str, digests: bool = False) -> dict[str, Any]:
        """Breed the child described by `plan_json` into the live model, tensor by tensor."""
        from darwin_stream import engine
        from darwin_stream.plan import Plan

        plan = Plan.from_json(plan_json)
        device = str(getattr(self.model_runner, "device", "cpu"))
        # Blend in this thread: vLLM binds its OpenMP team to the cores from here, and torch ops run
        # across that team. A blending thread of our own starts a team of its own on the same cores.
        return self._darwin_feed(engine.iter_tensors(plan, device=device, workers=0), digests)

    def darwin_load_dir(self, path: str, digests: bool = False) -> dict[str, Any]:
        """Load a checkpoint directory by streaming its tensors (works whatever the engine's
        load_format, unlike reload_weights(weights_path=...), which needs a disk loader)."""
        return self._darwin_feed(iter_dir(path), digests)
