"""Bucket-child benchmark: the same merge written to a local directory and into a local S3 server.

Why this exists: docs/cloud.md states what a child in a bucket costs (bytes uploaded against the
child's size, requests, wall time beside the local merge), and the numbers must be repeatable.
The S3 server is moto's ThreadedMotoServer in this process (so the times are moto's, tens of ms a
request, not S3's); parents are bench.py's (under .bench/, generated when missing) and local.

    .venv/bin/python tools/bench_bucket.py --geometry tiny --reps 3
    .venv/bin/python tools/bench_bucket.py --geometry 0.6b --reps 1 --part-bytes 8MiB
    .venv/bin/python tools/bench_bucket.py --geometry tiny --format zarr   # zarr_sink: a chunk object per task

With `--format zarr` both children are zarr stores (the local one staged as safetensors and copied,
the bucket one written by zarr_sink with nothing local), and `child_bytes` is the child's tensor
bytes: the store adds padding of short last chunks and metadata, which the ratio shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench

from darwin_stream import merge, object_sink
from darwin_stream.manifest import parse_size
from tests import s3_server


def run(geometry: str, reps: int, part: int, budget: int, fmt: str = "safetensors") -> dict:
    geom = bench.GEOMETRIES[geometry]
    parents = bench.ensure_parents(geom)
    os.environ[object_sink.PART_ENV] = str(part)
    import moto.s3.models

    server = s3_server.start()
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = min(part, object_sink.MIN_PART)
    scratch = Path(tempfile.mkdtemp(prefix="bench-bucket-"))
    manifest = scratch / "m.yaml"
    manifest.write_text(bench.manifest_text("slerp", parents))
    rows = []
    try:
        for rep in range(reps):
            local = merge(manifest, scratch / f"local-{rep}", memory_budget=budget, out_format=fmt)
            child = (sum(f.stat().st_size for f in Path(local.out).iterdir()) if fmt == "safetensors"
                     else bench_plan_bytes(manifest))
            bucket = merge(manifest, f"s3://{s3_server.BUCKET}/bench-{rep}", memory_budget=budget,
                           storage_options=server.opts, out_format=fmt)
            rows.append({"local_s": local.wall_s, "bucket_s": bucket.wall_s, "child_bytes": child,
                         **bucket.uploads, "predicted_peak": bucket.predicted_peak_bytes, "chunks": bucket.chunks})
            shutil.rmtree(local.out)
    finally:
        server.server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    last = rows[-1]
    return {"geometry": geom.name, "format": fmt, "part_bytes": part, "memory_budget": budget, "reps": reps,
            "local_s": statistics.median(r["local_s"] for r in rows),
            "bucket_s": statistics.median(r["bucket_s"] for r in rows),
            "child_bytes": last["child_bytes"], "bytes_uploaded": last["bytes_uploaded"],
            "upload_ratio": round(last["bytes_uploaded"] / last["child_bytes"], 5),
            "requests": last["requests"], "parts": last["parts"], "peak_waiting": last["peak_waiting"],
            "reserved_waiting": object_sink.waiting_bytes(part, os.cpu_count() or 1, distributed=fmt == "zarr"),
            "resumed_parts": last["resumed_parts"], "chunks": last["chunks"]}


def bench_plan_bytes(manifest: Path) -> int:
    """The child's tensor bytes (what a zarr child holds before padding and metadata)."""
    from darwin_stream import load_plan

    return load_plan(manifest).nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="tiny", choices=list(bench.GEOMETRIES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--part-bytes", type=parse_size, default=object_sink.DEFAULT_PART)
    p.add_argument("--memory-budget", type=parse_size, default=2**30)
    p.add_argument("--format", default="safetensors", choices=["safetensors", "zarr"])
    a = p.parse_args()
    print(json.dumps(run(a.geometry, a.reps, a.part_bytes, a.memory_budget, a.format), indent=2))


if __name__ == "__main__":
    main()
