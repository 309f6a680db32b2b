"""transformers backend: breeding a child in place against `from_pretrained` of the same child.

    .venv/bin/python tools/bench_hf_breed.py --model qwen3-0.6b --reps 3 --workdir .bench/hf-breed --docs
    .venv/bin/python tools/bench_hf_breed.py --model tiny --reps 5
    .venv/bin/python tools/bench_hf_breed.py --report .bench/results/hf-breed-....json   # docs only

Issue 14 asks the hf backend to keep one model and copy each bred tensor into it, instead of
building a new model and a whole state dict per child. This measures, in one run and one process:

- first load: the first plan child (model built from the config, then every tensor bred in);
- in place: a new child (slerp at another t: every tensor changes) bred into the live model;
- in place, one layer: a child that differs from the live one in one layer's t (the others skipped);
- in place, same child: the live child again (every tensor skipped);
- from disk: the same children merged to disk (`darwin_stream.merge`, through the page cache, as a
  child loaded right after its merge is), then `from_pretrained` into the backend (HfBackend.load of
  the directory). The merge itself is reported beside it, not inside it.

Parents are bench_score.py's (the synthetic Qwen3-0.6B geometry, or the tiny demo Qwen3). Prints
one JSON object; `--docs` also writes the table into docs/benchmarks.md under SECTION.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_score as bs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## transformers backend: breeding in place"


def sig(x: float) -> float:
    return float(f"{x:.3g}")


def median(xs: list[float]) -> float:
    return sig(statistics.median(xs))


def one_layer(plan, layer: int, t: float):
    """`plan` with slerp's t moved on one layer only (what a per-layer gene step often does)."""
    tensors = [dataclasses.replace(tp, params={**tp.params, "t": t}) if tp.layer == layer else tp for tp in plan.tensors]
    return dataclasses.replace(plan, tensors=tensors)


def run(args: argparse.Namespace, dtype: str) -> dict:
    from darwin_stream import engine
    from darwin_stream.api import merge
    from darwin_stream.score import hf_backend as hb
    from darwin_stream.score.backend import open_backend

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-hf-breed-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    father, mother = bs.parents(args.model, work / args.model)
    print(f"parents ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ts = [(k + 1) / (args.reps + 2) for k in range(args.reps + 1)]
    plans = [bs.plan_for(father, mother, t, work) for t in ts]
    load0 = os.getloadavg()[0]

    t0 = time.perf_counter()
    hf = open_backend("hf", plans[0], dtype=dtype)
    first = time.perf_counter() - t0
    inplace, bred = [], []
    for plan in plans[1:]:
        info = hf.load(plan)
        inplace.append(info["seconds"])
        bred.append(info["bred"])
    layer, same = [], []
    live = plans[-1]
    for k in range(args.reps):
        live = one_layer(live, 3 + k, 0.05 + 0.01 * k)
        info = hf.load(live)
        layer.append((info["seconds"], info["bred"]))
    for _ in range(args.reps):
        info = hf.load(live)
        same.append((info["seconds"], info["bred"]))

    blend = []  # the same children through iter_tensors alone: what the copy into the model adds
    for plan in plans[1:]:
        a = time.perf_counter()
        with hb.single_threaded_torch():
            for _ in engine.iter_tensors(plan):
                pass
        blend.append(time.perf_counter() - a)

    child = work / "child"
    merges, disk = [], []
    for plan in plans[1:]:
        a = time.perf_counter()
        merge(plan, child, overwrite=True, direct_io=False)
        merges.append(time.perf_counter() - a)
        disk.append(hf.load(str(child))["seconds"])
    hf.close()
    return {
        "model": args.model,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": str(hf.dtype).removeprefix("torch."),
        "tensors": len(plans[0].tensors),
        "parent_bytes": sum(f.stat().st_size for f in father.glob("*.safetensors")),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "reps": args.reps,
        "first_load_s": sig(first),
        "inplace_s": median(inplace), "inplace_all_s": [sig(x) for x in inplace], "inplace_bred": bred[0],
        "one_layer_s": median([x for x, _ in layer]), "one_layer_bred": layer[0][1],
        "same_child_s": median([x for x, _ in same]), "same_child_bred": same[0][1],
        "from_pretrained_s": median(disk), "from_pretrained_all_s": [sig(x) for x in disk],
        "merge_to_disk_s": median(merges),
        "blend_only_s": median(blend),
        "disk_route_s": sig(statistics.median([a + b for a, b in zip(merges, disk, strict=True)])),
        "inplace_over_from_pretrained": round(statistics.median(inplace) / statistics.median(disk), 2),
    }


def table(results: list[dict]) -> str:
    r = results[0]
    size = r["parent_bytes"]
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"

    def row(what: str, key: str, bred: str | None, bold: bool = False) -> str:
        cells = [f"**{x[key]}**" if bold else str(x[key]) for x in results]
        return f"| {what} | " + " | ".join(cells) + f" | {bred if bred is not None else r[key.replace('_s', '_bred')]} |"

    head = " | ".join(f"{x['dtype']}, s" for x in results)
    lines = [
        SECTION, "",
        "`tools/bench_hf_breed.py`: the hf backend (`--backend hf`, the demo's embedded default) keeps",
        "one model and copies each bred tensor into its parameters; tensors whose plan did not change",
        "since the live child are skipped (`score/breeding.py`). Every child is a slerp of the two",
        "parents at another t; \"from disk\" is the same child merged with `darwin_stream.merge` (through",
        "the page cache) and loaded by `from_pretrained` (`HfBackend.load(dir)`), in the same run.",
        "",
        f"    .venv/bin/python tools/bench_hf_breed.py --model {r['model']} --reps {r['reps']}"
        f" --threads {r['torch_threads']} --dtype {' '.join(x['dtype'] for x in results)} --docs",
        "",
        f"{r['model']} ({r['tensors']} tensors, {size_text} per parent, bf16), {r['date']}, {r['cores']} cores,",
        f"{r['torch_threads']} torch threads. The machine was **busy**: other engineers' jobs shared its 2 cores",
        f"(load average {r['loadavg'][0]} at the start, {results[-1]['loadavg'][1]} at the end), so the",
        f"ratios within a column mean more than the seconds. Median of {r['reps']} children:",
        "",
        f"| what | {head} | tensors bred |",
        "|---|" + "---|" * len(results) + "---|",
        row("first load (model built from the config, every tensor bred)", "first_load_s", str(r["tensors"])),
        row("**in place**: a new child (every tensor changed)", "inplace_s", None, bold=True),
        row("in place: one layer's t changed", "one_layer_s", None),
        row("in place: the same child again", "same_child_s", None),
        row("**from_pretrained** of the same child from disk", "from_pretrained_s", "all", bold=True),
        row("its merge to disk, before from_pretrained", "merge_to_disk_s", "all"),
        row("merge + from_pretrained (the disk route per child)", "disk_route_s", "all"),
        row("blend only (iter_tensors, nothing copied)", "blend_only_s", "all"),
        "| in place / from_pretrained | " + " | ".join(f"**{x['inplace_over_from_pretrained']}×**" for x in results) + " | |",
        "",
        "Reading it: breeding in place costs what blending the parents costs (the copy into the",
        "parameters adds " + ", ".join(f"{x['inplace_s'] - x['blend_only_s']:+.2f} s in {x['dtype']}" for x in results)
        + "), while from_pretrained of a child already on disk is a copy",
        "from the page cache (plus a cast in float32). A child reaches from_pretrained only after its merge,",
        "so per candidate the disk route costs " + ", ".join(f"{x['disk_route_s']} s in {x['dtype']}" for x in results)
        + " against " + ", ".join(f"{x['inplace_s']} s" for x in results) + " in place;",
        "a genome step that moves one layer re-breeds " + str(r["one_layer_bred"]) + " of " + str(r["tensors"])
        + " tensors (" + ", ".join(f"{x['one_layer_s']} s" for x in results) + ").",
        "The first load is the noisiest row: it includes, once per process, importing transformers'",
        "model code, the first touch of the model's fresh memory, and reading parents that were not cached.",
        "",
        "Each child, in place / from_pretrained: " + "; ".join(
            f"{x['dtype']} {x['inplace_all_s']} / {x['from_pretrained_all_s']}" for x in results) + ".",
        "",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    """Replace SECTION in docs/benchmarks.md (up to the next `## `), or append it."""
    doc = DOCS.read_text()
    start = doc.find(SECTION + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end + 1 :] if end >= 0 else "")
    DOCS.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "qwen3-0.6b"], default="tiny")
    ap.add_argument("--reps", type=int, default=3, help="children per measurement (median)")
    ap.add_argument("--dtype", nargs="+", default=["auto"],
                    help="the backend's dtype(s), one column each (auto: float32 on a CPU without bf16)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the whole run (default: torch's; breeding uses 1 anyway)")
    ap.add_argument("--workdir", default=None, help="where parents and the disk child go (default: a temp dir)")
    ap.add_argument("--docs", action="store_true", help=f"write the table into docs/benchmarks.md ({SECTION})")
    ap.add_argument("--report", metavar="RAW_JSON", help="only re-render docs/benchmarks.md from a saved run")
    args = ap.parse_args()
    if args.report:
        write_docs(table(json.loads(Path(args.report).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for dtype in args.dtype:
        results.append(run(args, dtype))
        print(json.dumps(results[-1]), flush=True)
    if args.docs:
        write_docs(table(results))
    raw = ROOT / ".bench" / "results"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"hf-breed-{args.model}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
