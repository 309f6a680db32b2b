"""Read path benchmark: Parent.read_rows by mmap vs the zarr reference view (docs/benchmarks.md).

    .venv/bin/python tests/store/readpath_bench.py [WORKDIR]

Builds a ~1 GiB synthetic bf16 parent of Qwen3-0.6B-like geometry (28 layers of four 1024x3072
matrices and a norm, plus a 151936x1024 embedding: 0.95 GiB), times a reference ingest, then reads every tensor in
row chunks of ~16 MiB, warm page cache, median of 3, through both paths: once materialising each
chunk's bytes (mmap gives a zero-copy view, so it is cloned; zarr returns a fresh array) and once
converting each chunk to float32, which is what a blend does with it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from darwin_stream.pool import open_parent
from darwin_stream.store import ingest

CHUNK = 16 * 2**20


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if (root / "model-2.safetensors").exists():
        return root
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(28):
        for proj in ("gate_proj", "up_proj", "q_proj"):
            layers[f"model.layers.{i}.mlp.{proj}.weight"] = torch.randn(3072, 1024, generator=g).bfloat16()
        layers[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(1024, 3072, generator=g).bfloat16()
        layers[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(1024, generator=g).bfloat16()
    save_file(layers, str(root / "model-1.safetensors"), metadata={"format": "pt"})
    emb = {"model.embed_tokens.weight": torch.randn(151936, 1024, generator=g).bfloat16()}
    save_file(emb, str(root / "model-2.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text('{"model_type": "qwen3"}')
    return root


def read_all(parent, via_zarr: bool, to_float: bool = True) -> float:
    t0 = time.perf_counter()
    for name, t in parent.tensors.items():
        step = max(1, CHUNK // t.row_bytes)
        arr = parent.array(name) if via_zarr else None
        for r0 in range(0, t.rows, step):
            r1 = min(r0 + step, t.rows)
            if via_zarr:
                block = np.asarray(arr[r0:r1])
                x = torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
                x = x.float() if to_float else x
            else:
                x = parent.read_rows(name, r0, r1)
                x = x.float() if to_float else x.clone()
            del x
    return time.perf_counter() - t0


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    root = build(work / "parent")
    parent = open_parent(root)
    gib = sum(t.nbytes for t in parent.tensors.values()) / 2**30
    print(f"parent: {len(parent.tensors)} tensors, {gib:.2f} GiB")
    for checksum in (False, True):
        times = []
        for _ in range(3):
            r = ingest(root, work / "ref.json", checksum=checksum)
            times.append(r["seconds"])
        print(f"reference ingest (checksum={checksum}): median {statistics.median(times):.3f} s, {r['references']} refs")
    read_all(parent, False)  # warm the page cache
    cases = [(via, to_float) for to_float in (False, True) for via in (False, True)]
    times: dict[tuple[bool, bool], list[float]] = {c: [] for c in cases}
    for _ in range(3):  # interleaved, so that a noisy neighbour hurts every case alike
        for c in cases:
            times[c].append(read_all(parent, *c))
    for (via, to_float), ts in times.items():
        label = "zarr reference view" if via else "mmap read_rows"
        what = "rows -> float32" if to_float else "rows, bytes materialised"
        med = statistics.median(ts)
        print(f"{label}, {what}: median {med:.3f} s ({gib / med:.2f} GiB/s)")


if __name__ == "__main__":
    main()
