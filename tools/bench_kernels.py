"""Per-method kernel time: a selection or random method's statistic and blend on one tensor.

Why this exists: issue 11 wants ties, dare_*, breadcrumbs(_ties), della(_linear) and sce at least 2x
faster than mergekit on the 0.6B geometry, and those merges are CPU-bound in their kernels (the
elementwise methods already reach 5-9x). An end-to-end merge takes minutes on the shared machine
and mixes in reads and writes; this times only what the kernels do to one tensor, the way the
engine drives them (row blocks of `engine.block_rows`' size for a 256 MiB budget and 2 workers,
each block upcast from bf16 into reused float32 buffers, partials folded block by block), single
thread, median of `--reps`.

    .venv/bin/python tools/bench_kernels.py                       # this checkout
    .venv/bin/python tools/bench_kernels.py --against HEAD~3      # and an older commit, same run

`--against REV` extracts that commit's `darwin_stream/` (git archive) into a temporary directory
and runs this same script over it in a subprocess, so old and new are timed under the same load.
The parents are tools/bench.py's: independent N(0, 0.02) bf16 tensors for the base and each model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce")
SHAPES = ((3072, 1024), (1024, 1024))
BUDGET = 256 * 2**20
WORKERS = 2


def _model_params(method: str) -> list[dict]:
    """tools/bench_methods.py's per-model parameters (weights 0.6/0.4, densities 0.5/0.3)."""
    from darwin_stream import methods

    if method not in METHODS:  # another method, for comparison: its defaults, weights 0.6/0.4
        m = methods.get(method)
        n = 3 if m.base.value in ("input", "none") else 2
        return [{"weight": w} if "weight" in m.model_param_defaults else {} for w in (0.6, 0.4, 0.2)[:n]]
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    if method.startswith("breadcrumbs"):
        extra = {"gamma": 0.01}
    if method == "sce":
        return [{"weight": 1.0}, {"weight": 1.0}]
    return [{"weight": 0.6, "density": 0.5, **extra}, {"weight": 0.4, "density": 0.3, **extra}]


def _params(method: str) -> dict:
    from darwin_stream import methods

    params = {k: v for k, v in methods.get(method).param_defaults.items() if k != "int8_mask"}
    params.update({k: 0.5 for k, v in params.items() if repr(v) == "REQUIRED"})  # slerp's, nearswap's t
    if method == "sce":
        params["select_topk"] = 0.3
    return params


def _block_rows(method, shape: tuple[int, ...], n_inputs: int) -> int:
    """engine.block_rows without a plan (bf16 inputs, no padding): what a merge blocks this tensor by."""
    import torch

    from darwin_stream import engine

    cap = engine.INPLACE_BLOCK if method.inplace else getattr(engine, "SELECT_BLOCK", engine.HEAP_BLOCK)
    if hasattr(method, "block_cap") and method.block_cap is not None:
        cap = method.block_cap
    stat = method.statistic
    per_elem = 4 * n_inputs + (stat.dtype.itemsize * n_inputs if stat and stat.dtype != torch.float32 else 0)
    per_elem += 4 + method.temp_bytes(n_inputs)
    elems = min(cap, engine._share(BUDGET, WORKERS) // 2 // per_elem)
    return max(1, min(shape[0], elems // shape[1]))


def _chunks(method, raw: list, shape, params, model_params, dtype, rows: int, buffers: dict):
    """The engine's blocks (Task.blocks): each input's rows upcast into this run's reused buffers."""
    import torch

    from darwin_stream import methods

    numel = shape[0] * shape[1]
    for r0 in range(0, shape[0], rows):
        r1 = min(r0 + rows, shape[0])
        filled = []
        for i, t in enumerate(raw):
            n = (r1 - r0) * shape[1]
            buf = buffers.get((i, dtype))
            if buf is None or buf.numel() < n:
                buf = buffers[(i, dtype)] = torch.empty(rows * shape[1], dtype=dtype)
            filled.append(buf[:n].view(r1 - r0, shape[1]).copy_(t[r0:r1]))
        out = None
        if method.inplace:
            out = torch.empty((r1 - r0, shape[1]), dtype=dtype)
        base, models = (filled[0], filled[1:]) if len(filled) > len(model_params) else (None, filled)
        yield r0, r1, methods.Chunk(models=models, model_params=model_params, params=params, base=base,
                                    offset=r0 * shape[1], numel=numel, shape=shape, seed=1234, out=out)


AGGREGATE = statistics.median  # --min: the fastest run, steadier on a machine shared with other jobs


def time_method(name: str, shape: tuple[int, int], reps: int) -> dict:
    import torch

    from darwin_stream import methods

    torch.set_num_threads(1)
    method = methods.get(name)
    g = torch.Generator().manual_seed(0)
    mp = _model_params(name)
    n_inputs = len(mp) + int(method.base.value in ("required", "optional"))
    raw = [(torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for _ in range(n_inputs)]
    params = _params(name)
    rows = _block_rows(method, shape, len(raw))
    stat = method.statistic
    buffers: dict = {}
    stat_dtype = stat.dtype if stat is not None else torch.float32

    def statistic():
        state = None
        if stat is None:
            return None
        for _ in range(methods.pass_count(stat, shape, params)):
            acc = None
            for _, _, chunk in _chunks(method, raw, shape, params, mp, stat_dtype, rows, buffers):
                part = stat.partial(chunk, state)
                acc = part if acc is None else stat.combine([acc, part])
            state = stat.finish(acc, state)
        return state

    out = torch.empty(shape, dtype=torch.bfloat16)

    def blend(state):
        for r0, r1, chunk in _chunks(method, raw, shape, params, mp, torch.float32, rows, buffers):
            out[r0:r1].copy_(method.blend(chunk, state).reshape(r1 - r0, shape[1]))

    st, bl = [], []
    state = statistic()
    blend(state)  # warm: buffers allocated, code paths loaded
    for _ in range(reps):
        t0 = time.thread_time()
        state = statistic()
        t1 = time.thread_time()
        blend(state)
        t2 = time.thread_time()
        st.append(t1 - t0)
        bl.append(t2 - t1)
    digest = hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {"method": name, "shape": list(shape), "block_rows": rows, "statistic_s": AGGREGATE(st),
            "blend_s": AGGREGATE(bl), "digest": digest}


def measure(names: list[str], reps: int) -> list[dict]:
    return [time_method(n, s, reps) for n in names for s in SHAPES]


def _as_in_a_merge(heap_block: int | None) -> None:
    """The allocator as a merge sets it (engine.bound_allocator), for `heap_block` if given."""
    from darwin_stream import engine

    if heap_block:
        engine.HEAP_BLOCK = heap_block
        engine.MMAP_THRESHOLD = 16 * heap_block
    engine.bound_allocator()


def _extract(rev: str, into: Path) -> Path:
    """`rev`'s darwin_stream/ package, unpacked under `into` (importable with PYTHONPATH=into)."""
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "darwin_stream"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_other(src: Path, name: str, reps: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--json", "--reps", str(reps), "--methods", name,
           *(["--min"] if AGGREGATE is min else [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def compare(rev: str, names: list[str], reps: int) -> tuple[list[dict], list[dict]]:
    """This checkout and `rev`, method by method in turn, so that both see the same load."""
    new: list[dict] = []
    old: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = _extract(rev, Path(tmp))
        for name in names:
            old += _run_other(src, name, reps)
            new += [time_method(name, s, reps) for s in SHAPES]
    return new, old


def _table(new: list[dict], old: list[dict] | None, rev: str | None) -> str:
    head = "| method | shape | block rows | statistic s | blend s | total s |"
    sep = "| --- | --- | ---: | ---: | ---: | ---: |"
    if old is not None:
        head += f" {rev} total s | speed-up | same bits |"
        sep += " ---: | ---: | --- |"
    lines = [head, sep]
    for i, r in enumerate(new):
        total = r["statistic_s"] + r["blend_s"]
        line = (f"| {r['method']} | {r['shape'][0]}x{r['shape'][1]} | {r['block_rows']} | {r['statistic_s']:.3f} | "
                f"{r['blend_s']:.3f} | {total:.3f} |")
        if old is not None:
            o = old[i]
            ot = o["statistic_s"] + o["blend_s"]
            same = "yes" if o["digest"] == r["digest"] else "no"
            line += f" {ot:.3f} ({o['statistic_s']:.3f} + {o['blend_s']:.3f}) | {ot / total:.1f}x | {same} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--against", metavar="REV", help="also time this commit's darwin_stream, in the same run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--heap-block", type=int, help="try another engine.HEAP_BLOCK (elements)")
    ap.add_argument("--min", action="store_true", help="the fastest of the reps instead of their median")
    args = ap.parse_args(argv)
    global AGGREGATE
    AGGREGATE = min if args.min else statistics.median
    _as_in_a_merge(args.heap_block)
    names = [n for n in args.methods.split(",") if n]
    if args.against:
        new, old = compare(args.against, names, args.reps)
    else:
        new, old = measure(names, args.reps), None
    if args.json:
        print(json.dumps(new))
        return 0
    how = "fastest" if args.min else "median"
    print(f"torch threads 1, budget {BUDGET >> 20} MiB, {WORKERS} workers, {how} of {args.reps}")
    print(_table(new, old, args.against))
    return 0


if __name__ == "__main__":
    sys.exit(main())
