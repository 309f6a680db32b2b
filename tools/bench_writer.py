"""Writer benchmark: the child's shards written with O_DIRECT (the default) or through the page cache.

Why this exists: the writer's O_DIRECT spans (child_writer.Span) are justified by a measurement, and the
measurement must be repeatable. Both modes run the same manifest back to back, alternating, in the
same page-cache state (parents warm or cold), and the ratio is taken per repetition before the
median, as in bench.py. The parents and manifests are bench.py's (under .bench/), generated here
when missing; results go to .bench/results/writer-*.json and the table to stdout.

    .venv/bin/python tools/bench_writer.py --geometry tiny --reps 1    # seconds: try the tool
    .venv/bin/python tools/bench_writer.py --geometry 4b --reps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import bench_common as bc

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CLI = str(bc.darwin_cli(ROOT))
MODES = {"O_DIRECT": [], "page cache": ["--page-cache"]}


def one(manifest: Path, parents: list[Path], state: str, flags: list[str]) -> dict:
    out = BENCH / "children" / "writer-bench"
    shutil.rmtree(out, ignore_errors=True)
    resident = bc.cache_state(state, parents)
    m = bc.measure([CLI, "merge", str(manifest), str(out), "--quiet", "--json", *flags],
                   log=BENCH / "logs" / "writer-bench")
    if m.rc != 0:
        raise SystemExit(f"merge failed: {m.stderr_tail}")
    report = json.loads(m.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": m.wall_s, "merge_s": report["wall_s"], "cpu_s": m.cpu_s, "sys_s": m.sys_s,
            "load_before": m.load_before, "resident_before": resident}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="4b", choices=list(bench.GEOMETRIES))
    ap.add_argument("--methods", default="linear,slerp")
    ap.add_argument("--states", default="warm")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    geometry = bench.GEOMETRIES[args.geometry]
    geom = geometry.name
    parents = bench.ensure_parents(geometry)  # generated once, then kept (the 4B pair takes minutes)
    manifests = bench.write_manifests(geometry, parents)
    runs = []
    for rep in range(args.reps):
        for method in args.methods.split(","):
            for state in args.states.split(","):
                manifest = manifests[method]
                order = list(MODES.items()) if rep % 2 == 0 else list(reversed(MODES.items()))
                for mode, flags in order:
                    r = {"method": method, "state": state, "mode": mode, "rep": rep,
                         **one(manifest, parents, state, flags)}
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    bc.dump(BENCH / "results" / f"writer-{stamp}.json", {"argv": sys.argv[1:], "runs": runs})

    print(f"\n{geom}, median of {args.reps} (seconds; ratio = page cache / O_DIRECT, per repetition)\n")
    print("| method | cache | mode | process wall | merge() | CPU | of which system | page cache / O_DIRECT (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for state in args.states.split(","):
            sel = [r for r in runs if r["method"] == method and r["state"] == state]
            ratios = []
            for rep in range(args.reps):
                d = {r["mode"]: r["wall_s"] for r in sel if r["rep"] == rep}
                ratios.append(d["page cache"] / d["O_DIRECT"])
            for mode in MODES:
                rs = [r for r in sel if r["mode"] == mode]
                med = {k: bc.median(r[k] for r in rs) for k in ("wall_s", "merge_s", "cpu_s", "sys_s")}
                ratio = f"{bc.median(ratios):.2f}×" if mode == "page cache" else ""
                print(f"| {method} | {state} | {mode} | {med['wall_s']:.1f} | {med['merge_s']:.1f} | "
                      f"{med['cpu_s']:.1f} | {med['sys_s']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
