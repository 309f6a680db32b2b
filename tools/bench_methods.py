"""Every merge method on the 0.6B geometry: darwin-stream against mergekit 0.1.5, warm, in one run.

Why this exists: issue 11 (section 7) asks that each of the 20 methods be at least 2x faster than
mergekit and stay within `--memory-budget 256MiB` above the `plan` baseline (the private memory of
`darwin-stream plan` on the same manifest: Python, torch and the parents' indexes), karcher and the
sce/della statistics included. Both tools run the same mergekit YAML, back to back, with the parents
in the page cache (warm), so each ratio is measured in the same run and machine state; the
1-minute load average is recorded before every command, because the machine is shared.

    .venv/bin/python tools/bench_methods.py run --mergekit /tmp/mkvenv/bin/mergekit-yaml --reps 1
    .venv/bin/python tools/bench_methods.py run --geometry tiny --methods linear,ties   # seconds: try it
    .venv/bin/python tools/bench_methods.py report --write-docs   # the section of docs/benchmarks.md

The parents are tools/bench.py's synthetic Qwen3 pair (a, b) plus a third of the same geometry (c),
so that the methods that need two models besides a base (model_stock, sce, multislerp) get them.
Everything generated lives under .bench/ (git-ignored); children are deleted after each run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import bench_common as bc

SECTION = "## Every method on the 0.6B geometry"
BUDGET = "256MiB"
RESULTS = bench.BENCH / "results"

W2 = ("models:\n  - model: {b}\n    parameters: {{weight: 0.6, density: 0.5EXTRA}}\n"
      "  - model: {c}\n    parameters: {{weight: 0.4, density: 0.3EXTRA}}\n")
TWO = "models:\n  - model: {b}\n    parameters: {{weight: 0.6}}\n  - model: {c}\n    parameters: {{weight: 0.4}}\n"

# method -> YAML body in mergekit's form (after merge_method; base_model added where given)
BODIES: dict[str, tuple[bool, str]] = {
    "linear": (False, "models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
                      "  - model: {b}\n    parameters: {{weight: 0.4}}\n"),
    "slerp": (True, "models:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n"),
    "task_arithmetic": (True, W2.replace("EXTRA", "")),
    "ties": (True, W2.replace("EXTRA", "")),
    "dare_linear": (True, W2.replace("EXTRA", "")),
    "dare_ties": (True, W2.replace("EXTRA", "")),
    "breadcrumbs": (True, W2.replace("EXTRA", "")),
    "breadcrumbs_ties": (True, W2.replace("EXTRA", "")),
    "della": (True, W2.replace("EXTRA", ", epsilon: 0.1")),
    "della_linear": (True, W2.replace("EXTRA", ", epsilon: 0.1")),
    "model_stock": (True, "models:\n  - model: {b}\n  - model: {c}\n"),
    "nuslerp": (True, TWO),
    "multislerp": (True, TWO),
    "karcher": (False, "models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"),
    "sce": (True, "models:\n  - model: {b}\n  - model: {c}\nparameters: {{select_topk: 0.3}}\n"),
    "nearswap": (True, "models:\n  - model: {b}\nparameters: {{t: 0.001}}\n"),
    "arcee_fusion": (True, "models:\n  - model: {b}\n"),
    "passthrough": (False, "models:\n  - model: {b}\n"),
    "ram": (True, "models:\n  - model: {b}\n  - model: {c}\n"),
    "ramplus_tl": (True, "models:\n  - model: {b}\n  - model: {c}\n"),
}


def parents_for(geom: bench.Geometry) -> dict[str, Path]:
    """bench.py's pair (a, b) and a third parent c of the same geometry, each generated once."""
    a, b = bench.ensure_parents(geom)
    c = a.with_name("c")
    marker = c.with_name("c.done")
    want = json.dumps({"geometry": geom.__dict__, "seed": 3}, sort_keys=True)
    if not (c.is_dir() and marker.exists() and marker.read_text() == want):
        marker.unlink(missing_ok=True)
        print(f"[gen] {geom.name} parent c", flush=True)
        bench.generate_parent(geom, c, 3)
        marker.write_text(want)
    return {"a": a, "b": b, "c": c}


def manifest(method: str, parents: dict[str, Path]) -> str:
    with_base, body = BODIES[method]
    text = f"merge_method: {method}\n" + (f"base_model: {parents['a']}\n" if with_base else "")
    return text + body.format(**{k: str(v) for k, v in parents.items()}) + "dtype: bfloat16\n"


def mergekit_env() -> dict:
    """mergekit's own environment: offline, and without the darwin-stream checkout on its path."""
    env = bench.tool_env()
    env.pop("PYTHONPATH", None)
    return env


def one_method(method: str, path: Path, parents: list[Path], mergekit: str | None, rep: int) -> list[dict]:
    """plan (the baseline), darwin-stream merge, mergekit: each from a warm cache and no child left."""
    base = {"method": method, "rep": rep}
    recs = [{**base, **bench.run_plan(path, BUDGET, f"m-{method}")}]
    for tool in ("darwin-stream", "mergekit"):
        if tool == "mergekit" and not mergekit:
            continue
        resident = bench.prepare("warm", parents)
        if tool == "darwin-stream":
            rec = bench.run_darwin(path, BUDGET, f"m-{method}")
        else:
            out = bench.BENCH / "children" / f"mk-{method}"
            m = bc.measure([mergekit, str(path), str(out)], env=mergekit_env(),
                           log=bench.BENCH / "logs" / f"mk-m-{method}")
            rec = {"tool": "mergekit", "budget": None, **m.summary()}
        recs.append(bench.finish_run({**base, "resident_before": resident, **rec}))
    for r in recs:
        print(f"[run] {method} rep{rep} {r['tool']}: rc={r['rc']} wall={r['wall_s']:.2f}s "
              f"anon={r['peak_anon'] / bc.MiB:.0f}MiB load={r['load_before']}", flush=True)
        if r["rc"]:
            print(r["stderr_tail"][-1500:], flush=True)
    return recs


def cmd_run(args: argparse.Namespace) -> int:
    geom = bench.GEOMETRIES[args.geometry]
    parents = parents_for(geom)
    (bench.BENCH / "manifests").mkdir(parents=True, exist_ok=True)
    doc = {"machine": bench.machine(), "versions": bench.versions(args.mergekit), "argv": sys.argv,
           "geometry": geom.name, "reps": args.reps, "budget": BUDGET, "runs": []}
    raw = RESULTS / f"methods-{geom.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    methods = args.methods.split(",") if args.methods else list(BODIES)
    for rep in range(args.reps):
        for method in methods:
            path = bench.BENCH / "manifests" / f"methods-{geom.name}-{method}.yml"
            path.write_text(manifest(method, parents))
            doc["runs"] += one_method(method, path, list(parents.values()), args.mergekit, rep)
            bc.dump(raw, doc)
    doc["machine"]["load_avg_at_end"] = os.getloadavg()
    bc.dump(raw, doc)
    bench.clean_children()
    print(f"[done] {raw}", flush=True)
    if args.write_docs:
        write_docs(raw)
    return 0


def table(doc: dict) -> list[str]:
    """One row per method: medians over the repetitions, ratios of medians from the same run."""
    runs = doc["runs"]
    rows = ["| method | git | darwin-stream s | mergekit s | mergekit / darwin-stream | ≥ 2× | plan baseline MiB "
            "| darwin-stream peak MiB | above baseline MiB | ≤ 256 MiB | mergekit peak MiB | load avg (1 min) |",
            "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in runs):
        def med(tool: str, key: str, method: str = method) -> float | None:
            return bc.median(r[key] for r in runs if r["method"] == method and r["tool"] == tool and r["rc"] == 0)

        ds, mk = med("darwin-stream", "wall_s"), med("mergekit", "wall_s")
        plan, peak, mkpeak = med("plan", "peak_anon"), med("darwin-stream", "peak_anon"), med("mergekit", "peak_anon")
        loads = [r["load_before"] for r in runs if r["method"] == method and r["tool"] != "plan"]
        speed = mk / ds if ds and mk else None
        above = (peak - plan) / bc.MiB if peak is not None and plan is not None else None
        rows.append(
            f"| {method} | {next((r.get('git', '') for r in runs if r['method'] == method), '')} | {bench.fmt(ds)} | {bench.fmt(mk)} | {bench.fmt(speed, '.1f', '×')} | "
            f"{'yes' if speed and speed >= 2 else 'no' if speed else ''} | {bench.fmt(plan and plan / bc.MiB, '.0f')} | "
            f"{bench.fmt(peak and peak / bc.MiB, '.0f')} | {bench.fmt(above, '.0f')} | "
            f"{'yes' if above is not None and above <= 256 else 'no' if above is not None else ''} | "
            f"{bench.fmt(mkpeak and mkpeak / bc.MiB, '.0f')} | {', '.join(f'{x:.1f}' for x in loads)} |")
    return rows


def render(doc: dict) -> str:
    m = doc["machine"]
    reps = doc["reps"] if isinstance(doc["reps"], list) else [doc["reps"]]  # several files: each row's own
    runs = f"{reps[0]}" if len(reps) == 1 else f"{min(reps)} to {max(reps)}"
    lines = [SECTION, "",
             f"Measured {m['date']} at {m['git']} by `tools/bench_methods.py` ({runs} run{'s' if max(reps) > 1 else ''} "
             f"per method{', medians' if min(reps) > 1 else ', medians where more than one' if max(reps) > 1 else ', n=1: single measurements, not medians'}), on {m['cores']} cores "
             f"({m['cpu']}, {m['ram_gib']} GiB) shared with other jobs: load average "
             f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_avg_at_end', m['load_avg_at_start']))} at the end. "
             f"{doc['versions']}.",
             "",
             f"The {doc['geometry']} geometry (bf16 parents a, b, c of "
             f"{next(g for g in bench.GEOMETRIES.values() if g.name == doc['geometry']).nbytes() / bc.GiB:.2f} GiB "
             "each, tools/bench.py's generator), "
             "each method's YAML in mergekit's form with `dtype: bfloat16`, run unchanged by both tools; "
             f"darwin-stream with `--memory-budget {doc['budget']}`, mergekit with its defaults. Warm: the parents "
             "are in the page cache before every command, and no child is left from the one before. Wall time "
             "is the whole command (start-up included); memory is the peak private memory (RssAnon) over the "
             "process tree, sampled every 20 ms; the plan baseline is `darwin-stream plan` on the same manifest "
             "and budget. Targets: mergekit / darwin-stream ≥ 2 and darwin-stream peak − plan baseline ≤ 256 MiB.",
             "", *table(doc), ""]
    return "\n".join(lines)


def merged(files: list[Path]) -> dict:
    """Several runs of one geometry as one: for each method, the runs of the newest file that has it
    (a run cut short is completed by a later one for the methods it did not reach)."""
    docs = [json.loads(f.read_text()) for f in files]
    newest: dict[str, dict] = {}
    for d in docs:  # oldest first: later files win
        for r in d["runs"]:
            newest[r["method"]] = d
    out = dict(docs[-1])
    out["reps"] = sorted({d["reps"] for d in newest.values()})
    out["runs"] = [r for m, d in newest.items() for r in d["runs"] if r["method"] == m]
    out["runs"].sort(key=lambda r: list(BODIES).index(r["method"]))
    for r in out["runs"]:
        r["git"] = next(d["machine"]["git"] for m, d in newest.items() if m == r["method"])
    loads = [x for d in docs for x in (*d["machine"]["load_avg_at_start"], *d["machine"].get("load_avg_at_end", ()))]
    out["machine"] = {**docs[-1]["machine"], "date": docs[0]["machine"]["date"] + " to " + docs[-1]["machine"]["date"],
                      "git": ", ".join(dict.fromkeys(d["machine"]["git"] for d in newest.values())),
                      "load_avg_at_start": docs[0]["machine"]["load_avg_at_start"],
                      "load_avg_at_end": docs[-1]["machine"].get("load_avg_at_end", docs[-1]["machine"]["load_avg_at_start"]),
                      "load_range": (min(loads), max(loads)) if loads else None}
    return out


def write_docs(raw: Path | list[Path]) -> None:
    doc = merged(raw) if isinstance(raw, list) else json.loads(raw.read_text())
    section = render(doc)
    text = bench.DOCS.read_text()
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    bench.DOCS.write_text(text)
    print(f"[docs] {bench.DOCS}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every method with both tools")
    r.add_argument("--geometry", default="0.6b", choices=sorted(bench.GEOMETRIES))
    r.add_argument("--methods", default="", help="comma-separated (default: all 20)")
    r.add_argument("--reps", type=int, default=1)
    r.add_argument("--mergekit", default=None, help="mergekit-yaml in its own environment")
    r.add_argument("--write-docs", action="store_true")
    p = sub.add_parser("report", help="render the results (newest per method) into docs/benchmarks.md")
    p.add_argument("--geometry", default="0.6b", choices=sorted(bench.GEOMETRIES))
    p.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    files = sorted(RESULTS.glob("methods-*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        print("no results under .bench/results/", file=sys.stderr)
        return 1
    files = [f for f in files if json.loads(f.read_text())["geometry"] == bench.GEOMETRIES[args.geometry].name]
    if args.write_docs:
        write_docs(files)
    else:
        print(render(merged(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
