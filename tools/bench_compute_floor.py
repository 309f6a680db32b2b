"""The arithmetic alone of a linear merge: two bf16 streams blended into bf16, from RAM, no I/O.

Why this exists: issue 11 asks for a merge within 1.2x the physical I/O floor, warm, on the 4B
geometry, where that floor is only the O_DIRECT write of the child (about 4 s). This measures what
the blend itself costs on the machine, the way the engine does it (row blocks of 2^18 elements
upcast to float32 scratch, weights 0.6/0.4, rounded once to bf16; one torch thread per worker
thread), over as many elements as the geometry has, so that a merge's CPU time can be split into
arithmetic and everything else (page faults, writes, Python per block).

    .venv/bin/python tools/bench_compute_floor.py --geometry 4b
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

from darwin_stream.engine import INPLACE_BLOCK, bound_allocator

SOURCE = 2**27  # elements per source stream: 256 MiB of bf16, far beyond any cache


def blend(a: torch.Tensor, b: torch.Tensor, n: int, first: int, stride: int) -> None:
    """`n` elements of a * 0.6 + b * 0.4 into bf16, block by block, walking the sources cyclically."""
    fa, fb = torch.empty(INPLACE_BLOCK), torch.empty(INPLACE_BLOCK)
    out = torch.empty(INPLACE_BLOCK, dtype=torch.bfloat16)
    done, pos = 0, first
    while done < n:
        s = pos % (a.numel() - INPLACE_BLOCK)
        fa.copy_(a[s : s + INPLACE_BLOCK])
        fb.copy_(b[s : s + INPLACE_BLOCK])
        fa.mul_(0.6).add_(fb, alpha=0.4)
        out.copy_(fa)
        done += INPLACE_BLOCK
        pos += stride


def timed(a: torch.Tensor, b: torch.Tensor, elements: int, threads: int) -> float:
    workers = [threading.Thread(target=blend, args=(a, b, elements // threads, i * INPLACE_BLOCK, threads * INPLACE_BLOCK))
               for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="4b", choices=sorted(bench.GEOMETRIES))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bound_allocator()
    elements = bench.GEOMETRIES[args.geometry].nbytes() // 2
    source = max(2 * INPLACE_BLOCK, min(SOURCE, elements))
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(source, generator=g) * 0.02).to(torch.bfloat16)
    b = (torch.randn(source, generator=g) * 0.02).to(torch.bfloat16)
    for threads in (1, 2):
        t = statistics.median(timed(a, b, elements, threads) for _ in range(args.reps))
        print(f"{args.geometry}: {elements / 1e9:.2f}e9 elements, {threads} thread(s): {t:.2f} s "
              f"({t / elements * 1e9 * threads:.2f} ns per element per thread; median of {args.reps})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
