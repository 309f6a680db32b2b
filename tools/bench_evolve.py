"""Evolution on the demo: subset against full fitness, and seconds per candidate, measured in one run.

    .venv/bin/darwin-stream demo                      # builds demo-out/ (once)
    .venv/bin/python tools/bench_evolve.py subset --workdir demo-out --items 20
    .venv/bin/python tools/bench_evolve.py seeds --workdir .bench/seeds --seeds 0 1 2
    .venv/bin/python tools/bench_evolve.py scorers --workdir demo-out --scorers 1 2 --repeats 3

- subset: runs the demo's evolution with `subset: {items: K}` in a fresh run directory, then scores
  every distinct candidate it searched on the full fitness set too, and reports the Spearman rank
  correlation between the two, the items scored per candidate, and the scoring seconds per candidate
  on each (median).
- seeds: runs the whole demo (build and evolution) for each seed and prints its held-out table and
  verdict: the evidence that hybrid vigor holds beyond the default seed.
- scorers: runs the demo's evolution (a fresh run directory each time) with each scorer count in
  turn, `--repeats` times, and reports per count the median wall time of the search (all its
  generations), of the references, and of the start of the engines, the scorers' utilisation, and
  whether every run's history equals the first one's (timings aside).

Results go to .bench/evolve-*.json; nothing under docs/ is touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def bench_subset(workdir: Path, items: int, out: Path) -> dict:
    from darwin_stream.evolution import fitness as fit
    from darwin_stream.evolution.demo import demo_manifest
    from darwin_stream.evolution.history import RunDir
    from darwin_stream.evolution.run import evolve
    from darwin_stream.manifest import load_manifest
    from darwin_stream.plan import build_plan
    from darwin_stream.plan.template import Template
    from darwin_stream.score.backend import open_backend

    manifest = demo_manifest(workdir, 0, lambda t: t.replace(
        "  backend:", f"    subset: {{items: {items}, rescore_top: 4}}\n  backend:"))
    run_dir = workdir / "bench-subset"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    report = evolve(manifest, run_dir)
    wall = time.perf_counter() - t0
    history = RunDir(run_dir).read_history()
    m, text = load_manifest(manifest)
    tpl = Template(build_plan(m, text), m)
    full = [fit.load_task(p) for p in sorted((run_dir / "tasks" / "fitness").glob("*.jsonl"))]
    distinct = {tuple(c.genome): c for c in history if not c.cached}
    scorer = fit.Scorer(open_backend("hf", tpl.apply(history[0].genome), dtype="float32"))
    import torch

    torch.set_num_threads(1)
    sub_s, full_s, pairs = [], [], []
    try:
        for c in distinct.values():
            scorer.load(tpl.apply(c.genome))
            r = scorer.score(full)
            pairs.append((c.fitness, r["fitness"]))
            full_s.append(r["seconds"])
            sub_s.append(c.score_s)
    finally:
        scorer.close()
    result = {
        "candidates": len(distinct), "items_subset": report.subset["items"], "items_full": report.subset["full_items"],
        "items_ratio": report.subset["full_items"] / report.subset["items"],
        "spearman_all_candidates": fit.spearman([a for a, _ in pairs], [b for _, b in pairs]),
        "score_s_subset_median": statistics.median(sub_s), "score_s_full_median": statistics.median(full_s),
        "evolve_wall_s": wall, "heldout": report.heldout,
    }
    out.write_text(json.dumps(result, indent=2))
    return result


def bench_seeds(workdir: Path, seeds: list[int], out: Path) -> dict:
    from darwin_stream.evolution.demo import format_table, run_demo

    result = {}
    for seed in seeds:
        t0 = time.perf_counter()
        r = run_demo(workdir / f"seed{seed}", seed=seed)
        result[seed] = {"vigor": r.vigor, "margin": r.margin, "one_item": r.one_item,
                        "rows": r.rows, "wall_s": time.perf_counter() - t0, "build_s": r.build_seconds}
        print(f"seed {seed}:\n{format_table(r)}", file=sys.stderr)
    out.write_text(json.dumps(result, indent=2))
    return result


def bench_scorers(workdir: Path, counts: list[int], repeats: int, generations: int | None, out: Path) -> dict:
    import os

    from darwin_stream.evolution.demo import demo_manifest
    from darwin_stream.evolution.history import RunDir
    from darwin_stream.evolution.run import evolve

    edit = None
    if generations:
        def edit(t: str) -> str:
            return t.replace("max_generations: 12", f"max_generations: {generations}")
    manifest = demo_manifest(workdir, 0, edit)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    first = None
    for rep in range(repeats):
        for n in counts:
            run_dir = workdir / f"bench-scorers-{n}"
            shutil.rmtree(run_dir, ignore_errors=True)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            report = evolve(manifest, run_dir, scorers=n)
            wall = time.perf_counter() - t0
            hist = [(c.generation, c.index, c.genome, c.fitness, c.tasks, c.cached) for c in RunDir(run_dir).read_history()]
            first = first or hist
            sc = report.scorers or {}
            row = {"wall_s": wall, **report.seconds, "utilisation": sc.get("utilisation"), "jobs": sc.get("jobs"),
                   "same_history": hist == first, "load_before": load, "evaluations": report.evaluations}
            runs[n].append(row)
            print(f"repeat {rep} scorers {n}: search {row['search']:.1f} s, total {wall:.1f} s, "
                  f"utilisation {row['utilisation']}, same history {row['same_history']}, load {load:.1f}",
                  file=sys.stderr)
    med = {n: {k: statistics.median(r[k] for r in rows) for k in ("search", "references", "engine_start", "wall_s")}
           for n, rows in runs.items()}
    result = {"median": med, "runs": runs}
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["subset", "seeds", "scorers"])
    ap.add_argument("--workdir", default="demo-out")
    ap.add_argument("--items", type=int, default=20, help="subset: items per task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scorers", type=int, nargs="+", default=[1, 2], help="scorers: the counts to compare")
    ap.add_argument("--repeats", type=int, default=3, help="scorers: runs per count")
    ap.add_argument("--generations", type=int, help="scorers: fewer generations than the demo's 12")
    args = ap.parse_args()
    bench = Path(".bench")
    bench.mkdir(exist_ok=True)
    work = Path(args.workdir)
    if args.what == "subset":
        res = bench_subset(work, args.items, bench / "evolve-subset.json")
    elif args.what == "scorers":
        res = bench_scorers(work, args.scorers, args.repeats, args.generations, bench / "evolve-scorers.json")
    else:
        res = bench_seeds(work, args.seeds, bench / "evolve-seeds.json")
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
