"""Task size: what a dask.distributed merge ships per task, on the synthetic Qwen3-0.6B pair.

Why this exists: a task that carried the whole plan (every tensor's plan) and the writer (every
shard header) was pickled once per task for the worker that runs it (issue 13: ~50 KiB of plan
and 59 KiB of writer layout per task, for a tensor plan of 0.3 KiB). This builds the merge's real
graph for `tools/bench.py`'s 0.6B linear manifest and pickles, as distributed does, each task on
its own, and each piece of data the tasks share.

    PYTHONPATH=. .venv/bin/python tools/bench_tasks.py [--geometry 0.6b] [--budget 1GiB] [--workers 2]

It prints one JSON object: per blend task the pickled bytes (median, max, sum), the tensor plan's
and the writer's pickled bytes, and what the graph holds besides its tasks (data keys such as the
writer, shipped once per worker that needs them). Run it on two checkouts to compare.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the synthetic Qwen3 parents and manifests, under .bench/

from darwin_stream import api, engine
from darwin_stream.child_writer import ChildWriter


def _size(obj: object) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def measure(geometry: str, budget: int, workers: int) -> dict:
    geom = bench.GEOMETRIES[geometry]
    manifest = bench.write_manifests(geom, bench.ensure_parents(geom))["linear"]
    plan = api.load_plan(str(manifest))
    with tempfile.TemporaryDirectory() as tmp:
        writer = ChildWriter(Path(tmp) / "child", plan, bench.SHARD_BYTES, direct=False)
        graph, outputs = engine.build_graph(plan, writer, budget=budget, workers=workers, device="cpu")
        tasks = [graph[k] for k in outputs]
        sizes = [_size(t) for t in tasks]
        data = {str(k): _size(v) for k, v in graph.items() if not isinstance(v, tuple)}
        tensor_plans = [_size(t[1].tp) for t in tasks]
        return {
            "geometry": geom.name,
            "budget": budget,
            "workers": workers,
            "tensors": len(plan.tensors),
            "blend_tasks": len(tasks),
            "task_bytes_median": statistics.median(sizes),
            "task_bytes_max": max(sizes),
            "task_bytes_sum": sum(sizes),
            "tensor_plan_bytes_median": statistics.median(tensor_plans),
            "plan_bytes": _size(plan),
            "writer_bytes": _size(writer),
            "graph_data_keys_bytes": data,
            "graph_pickled_whole_bytes": _size(graph),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="0.6b", choices=sorted(bench.GEOMETRIES))
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--workers", type=int, default=2, help="threads per worker the graph is sized for")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.geometry, bench.parse_size(args.budget), args.workers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
