"""A child as the backends see it, and what both backends need from it (config, skeleton, dtype).

A leaf of score/: backend.py opens one of the backends, and each backend imports only this, so the
backends and their chooser do not import each other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from darwin_stream.plan import Plan

Child = str | Plan


def plan_config(plan: Plan) -> dict[str, Any]:
    """The child's config.json, as a disk merge would write it."""
    from darwin_stream.api import child_config

    return child_config(plan)


def write_skeleton(plan: Plan, out: Path | None = None) -> Path:
    """A weightless model directory (config, tokenizer, generation config) for a plan child.

    An engine whose first child is a plan has no checkpoint to start from; it starts from this
    skeleton with dummy weights, and the child is then bred in. The files are those a disk merge
    writes next to the weights, so the engine sees the same model either way.
    """
    from darwin_stream.api import child_files

    out = Path(out or tempfile.mkdtemp(prefix="darwin-skeleton-"))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in child_files(plan).items():
        (out / name).write_bytes(data)
    return out


DTYPES = ("auto", "bfloat16", "float16", "float32")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: keep the checkpoint's dtype
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weight_bytes(child: Child) -> int:
    """The child's weights as stored (bf16 for the children this tool makes)."""
    if isinstance(child, Plan):
        from darwin_stream.child_writer import layout

        return layout(child, 2**62).nbytes
    p = Path(child)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else 0


def resolve_dtype(requested: str, child: Child, *, on_gpu: bool, has_bf16: bool | None = None,
                  available: int | None = None) -> str:
    """The dtype a backend computes in. `auto` picks float32 on a CPU without native bf16, where it
    scores several times faster (measured: 0.6B geometry, 10 s vs 64 s per candidate), as long as the
    float32 weights take under a third of the available memory; bfloat16 otherwise."""
    if requested != "auto":
        return requested
    if on_gpu or (cpu_has_bf16() if has_bf16 is None else has_bf16):
        return "bfloat16"
    room = mem_available() if available is None else available
    return "float32" if 2 * weight_bytes(child) * 3 < room else "bfloat16"


