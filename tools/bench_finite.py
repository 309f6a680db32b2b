"""What checking every block for NaN/Inf costs (issue 10): merges with the check on and off.

The engine checks each input block as it lands in scratch and each child block in the child's
dtype (`engine.finite`: one sum per block). This times the same merges with
`darwin: {allow_nonfinite: true}` (no checks) and without (checks), alternating, and reports
the fastest run of each (on a shared machine, the least disturbed); both to disk (`api.merge`) and in memory (`engine.iter_tensors`, no I/O noise).

    .venv/bin/python tools/bench_finite.py --reps 7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from darwin_stream import api, engine


def medium_pair(root: Path, layers: int = 4, dim: int = 1024) -> list[Path]:
    """Two parents of `layers` x (4 dim x dim bf16 matrices + a norm): 32 MiB each at the defaults."""
    out = []
    for k in range(2):
        d = root / f"p{k}"
        d.mkdir()
        g = torch.Generator().manual_seed(k)
        t = {}
        for i in range(layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(dim, dim, generator=g).to(torch.bfloat16)
            t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": layers}))
        out.append(d)
    return out


def manifest(a: Path, b: Path, method: str, allow: bool) -> str:
    extra = "darwin: {allow_nonfinite: true}\n" if allow else ""
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n{extra}"
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\n{extra}")


def time_once(text: str, out: Path, in_memory: bool) -> float:
    """CPU seconds of the merge, all threads: on a shared machine, wall time measures the neighbours."""
    plan = api.load_plan(text)
    t0 = time.process_time()
    if in_memory:
        for _ in engine.iter_tensors(plan, workers=0):
            pass
    else:
        api.merge(plan, out, overwrite=True)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)  # in memory: one thread, so CPU time is the blend's own
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from darwin_stream.demo import build_model

        tiny = [build_model(root / "tiny" / n, seed=s) for n, s in (("father", 1), ("mother", 2))]
        (root / "medium").mkdir()
        medium = medium_pair(root / "medium")
        for label, (a, b) in (("tiny qwen3", tiny), ("medium 2x32 MiB", medium)):
            for method in ("linear", "slerp"):
                for in_memory in (False, True):
                    times: dict[bool, list[float]] = {True: [], False: []}
                    for _ in range(args.reps):
                        for allow in (True, False):
                            times[allow].append(time_once(manifest(a, b, method, allow), root / "child", in_memory))
                    off, on = min(times[True]), min(times[False])  # the least-disturbed run of each
                    where = "in memory" if in_memory else "to disk"
                    print(f"{label:16s} {method:6s} {where:9s}: unchecked {off * 1e3:7.1f} ms CPU, "
                          f"checked {on * 1e3:7.1f} ms, overhead {100 * (on - off) / off:+5.1f}%")
                    engine.release_parents()


if __name__ == "__main__":
    main()
