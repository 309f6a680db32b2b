"""Scaling benchmark: a merge whose parents and child are all in a local S3 server, by worker count.

Why this exists: docs/scaling.md projects what a 70B merge costs on a cluster (bytes, requests,
time per worker), and the projection is only as good as what it is fitted to. This tool measures,
for 1, 2 and 4 workers (threads of the threaded scheduler), the wall time, the child's bytes per
second, every request the server answered (by operation) and the bytes it sent back against the
bytes the plan needs (engine.bytes_to_read). The target is at most 1.05x the bytes needed.

Requests and bytes are counted in the server itself: a WSGI wrapper around moto's app (the
ThreadedMotoServer's own app, on 127.0.0.1) records each request's operation, its body length and
the body bytes of its response. So the counts are the wire's HTTP bodies (headers excluded), not
darwin-stream's own bookkeeping, and they include the parents' metadata reads (config, index,
safetensors headers), which the plan does not count as needed.

    .venv/bin/python tools/bench_scaling.py --geometry tiny --workers 1 2 --reps 1
    .venv/bin/python tools/bench_scaling.py --geometry 0.6b --method linear slerp --workers 1 2 4 --reps 3

The worker count is forced by replacing engine.worker_count for the run (it is os.cpu_count()
otherwise): the budget split, the bucket sink's part reserve and dask's num_workers all follow it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench

from darwin_stream import engine, merge, object_sink
from darwin_stream.manifest import parse_size
from tests import s3_server

PARENTS = "parents"  # key prefix of the parents in the bucket
CHILD = "child"  # key prefix of the children, one per run


def operation(method: str, query: str, has_range: bool) -> str:
    """The S3 operation a request is, from its method and query (path-style, as s3fs sends to an IP)."""
    q = set(p.split("=", 1)[0] for p in query.split("&") if p)
    if method == "GET":
        if "list-type" in q or "prefix" in q or "delimiter" in q:
            return "GET list"
        if "uploadId" in q:
            return "GET list-parts"
        return "GET range" if has_range else "GET object"
    if method == "PUT":
        return "PUT part" if "partNumber" in q else "PUT object"
    if method == "POST":
        if "uploads" in q:
            return "POST create-upload"
        if "uploadId" in q:
            return "POST complete-upload"
        return "POST delete" if "delete" in q else "POST"
    return method


class Counter:
    """WSGI middleware: per (target, operation), requests, request body bytes and response body bytes.

    The target is "parents", "child" or "other" from the key's first path segment after the bucket.
    """

    def __init__(self, app: Any):
        self.app = app
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        with self.lock:
            for (target, op), (n, sent, got) in sorted(self.counts.items()):
                out.setdefault(target, {})[op] = {"requests": n, "bytes_in": sent, "bytes_out": got}
        return out

    def __call__(self, environ: dict, start_response: Any):
        parts = environ.get("PATH_INFO", "").lstrip("/").split("/")
        target = parts[1] if len(parts) > 1 and parts[1] in (PARENTS, CHILD) else "other"
        if target == "other" and len(parts) > 1 and parts[1].startswith(CHILD):
            target = CHILD
        op = operation(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""), "HTTP_RANGE" in environ)
        sent = int(environ.get("CONTENT_LENGTH") or 0)
        body = self.app(environ, start_response)
        got = 0
        try:
            for chunk in body:
                got += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            with self.lock:
                c = self.counts[(target, op)]
                c[0] += 1
                c[1] += sent
                c[2] += got


_request = threading.local()


class _RangeOfKey:
    """A key's bytes, read from moto's buffer only where sliced.

    moto answers a ranged GET by reading the whole object and slicing it: 1.2 GB copied per GET
    of a 0.6B parent's shard, 638 GETs a merge, measured at 0.6 MB/s of child. Real S3 reads
    only the range, so the benchmark gives moto that: `_handle_range_header` takes len() and
    one slice, which is all a ranged GET asks of the value.
    """

    def __init__(self, key: Any):
        self.key = key

    def __len__(self) -> int:
        return self.key.size

    def __getitem__(self, s: slice) -> bytes:
        with self.key.lock:
            self.key._value_buffer.seek(s.start)
            return self.key._value_buffer.read(s.stop - s.start)


def patch_moto_ranges() -> None:
    """Serve ranged GETs with `_RangeOfKey` (see there); every other request is moto's own."""
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    if getattr(S3Response.key_response, "ranged", False):
        return
    whole, key_response = FakeKey.value.fget, S3Response.key_response

    def value(self: Any) -> Any:
        return _RangeOfKey(self) if getattr(_request, "ranged", False) else whole(self)

    def ranged_key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        rng = request.headers.get("range", "")
        _request.ranged = request.method == "GET" and rng.startswith("bytes=") and "," not in rng \
            and not rng.startswith("bytes=-")
        try:
            return key_response(self, request, full_url, headers)
        finally:
            _request.ranged = False

    ranged_key_response.ranged = True  # type: ignore[attr-defined]
    FakeKey.value = property(value, FakeKey.value.fset)  # type: ignore[method-assign]
    S3Response.key_response = ranged_key_response  # type: ignore[method-assign]


def start_server() -> tuple[s3_server.S3Server, Counter]:
    """As tests/s3_server.start, with the Counter wrapped around moto's app."""
    import logging

    import boto3
    from moto.moto_server.threaded_moto_server import MotoRequestHandler, ThreadedMotoServer, make_server
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    patch_moto_ranges()
    counter = Counter(DomainDispatcherApplication(create_backend_app))

    class Counted(ThreadedMotoServer):
        def _server_entry(self) -> None:  # moto's own, with the app wrapped
            self._server = make_server(self._ip_address, self._port, counter, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = s3_server.free_port()
    server = Counted(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=s3_server.BUCKET)
    return s3_server.S3Server(endpoint, server, client), counter


def upload_parents(server: s3_server.S3Server, parents: list[Path]) -> list[str]:
    urls = []
    for name, d in zip("ab", parents, strict=True):
        for f in sorted(d.iterdir()):
            server.client.upload_file(str(f), s3_server.BUCKET, f"{PARENTS}/{name}/{f.name}")
        urls.append(f"s3://{s3_server.BUCKET}/{PARENTS}/{name}")
    return urls


def delete_prefix(server: s3_server.S3Server, prefix: str) -> None:
    """Drop a run's child so that moto's memory holds the parents and one child at most."""
    keys = server.keys(prefix)
    for i in range(0, len(keys), 1000):
        server.client.delete_objects(Bucket=s3_server.BUCKET,
                                     Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def one_run(server: s3_server.S3Server, opts: dict, counter: Counter, manifest: Path, workers: int, budget: int,
            tag: str) -> dict:
    real, real_run = engine.worker_count, engine.run
    engine.worker_count = lambda client=None: workers  # type: ignore[assignment]
    stats: list[engine.RunStats] = []

    def run_and_keep(*args: Any, **kwargs: Any) -> engine.RunStats:
        stats.append(real_run(*args, **kwargs))  # the spill's stats (reread.py) are not in the report
        return stats[-1]

    engine.run = run_and_keep  # type: ignore[assignment]
    counter.reset()
    t0 = time.perf_counter()
    try:
        report = merge(manifest, f"s3://{s3_server.BUCKET}/{CHILD}/{tag}", memory_budget=budget,
                       storage_options=opts)
    finally:
        engine.worker_count, engine.run = real, real_run  # type: ignore[assignment]
    wall = time.perf_counter() - t0
    wire = counter.snapshot()
    child = sum(server.client.head_object(Bucket=s3_server.BUCKET, Key=k)["ContentLength"]
                for k in server.keys(f"{CHILD}/{tag}/"))
    delete_prefix(server, f"{CHILD}/{tag}/")
    fetched = sum(v["bytes_out"] for v in wire.get(PARENTS, {}).values())
    tensor_fetched = wire.get(PARENTS, {}).get("GET range", {}).get("bytes_out", 0)
    uploaded = sum(v["bytes_in"] for t in wire.values() for v in t.values())
    requests = sum(v["requests"] for t in wire.values() for v in t.values())
    return {"workers": workers, "wall_s": round(wall, 3), "merge_wall_s": report.wall_s,
            "child_bytes": child, "throughput_MBps": round(child / wall / 1e6, 2),
            "bytes_needed": report.bytes_read, "bytes_fetched": fetched, "range_bytes_fetched": tensor_fetched,
            "fetch_ratio": round(fetched / report.bytes_read, 5), "bytes_uploaded_wire": uploaded,
            "upload_ratio": round(uploaded / child, 5), "requests": requests, "wire": wire,
            "sink": report.uploads, "spill": stats[-1].spill if stats else {},
            "peak_anon_bytes": report.peak_anon_bytes,
            "load_avg": os.getloadavg()}


def run(geometry: str, workers: list[int], reps: int, budget: int, method: str,
        partial: Path | None = None) -> dict:
    """One method's runs (see `run_methods`)."""
    return run_methods(geometry, workers, reps, budget, [method], partial)[method]


def run_methods(geometry: str, workers: list[int], reps: int, budget: int, methods: list[str],
                partial: Path | None = None) -> dict[str, dict]:
    """Each method's runs against one server, interleaved rep by rep, worker count by worker
    count, method by method, so that a burst of load on the machine hits every cell alike."""
    import fsspec.config
    import moto.s3.models

    geom = bench.GEOMETRIES[geometry]
    parents = bench.ensure_parents(geom)
    server, counter = start_server()
    # real S3's rule, or the tests' smaller parts (object_sink.PART_ENV)
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = min(object_sink.MIN_PART,
                                                 int(os.environ.get(object_sink.PART_ENV) or object_sink.MIN_PART))
    # The tests' options give up after 5 s; moto completing a 1.2 GB upload (it concatenates and
    # hashes every part) took longer on the loaded machine, and s3fs's retry of that call then
    # found the upload gone. A benchmark waits: one attempt, 10 minutes.
    opts = server.opts
    opts["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 10, "read_timeout": 600}
    fsspec.config.conf["s3"] = opts  # URL parents take fsspec's configuration
    scratch = bench.BENCH / "scaling"
    scratch.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    try:
        t0 = time.perf_counter()
        urls = upload_parents(server, parents)
        upload_s = time.perf_counter() - t0
        print(f"[scaling] parents uploaded in {upload_s:.1f} s", file=sys.stderr, flush=True)
        manifests = {m: scratch / f"{geom.name}-{m}.yml" for m in methods}
        for m, path in manifests.items():
            path.write_text(bench.manifest_text(m, urls))  # type: ignore[arg-type]
        for rep in range(reps):
            for w in workers:
                for m in methods:
                    r = one_run(server, opts, counter, manifests[m], w, budget, f"{geom.name}-{m}-w{w}-r{rep}")
                    r["method"] = m
                    rows[m].append(r)
                    print(f"[scaling] {m} workers={w} rep={rep} wall={r['wall_s']}s {r['throughput_MBps']} MB/s "
                          f"fetched/needed={r['fetch_ratio']} requests={r['requests']} "
                          f"load={r['load_avg'][0]:.1f}", file=sys.stderr, flush=True)
                    if partial:  # each run as it ends: a long benchmark cut short keeps what it measured
                        with partial.open("a") as f:
                            f.write(json.dumps(r) + "\n")
    finally:
        server.server.stop()
        fsspec.config.conf.pop("s3", None)
    return {m: _summary(geom.name, m, budget, workers, rows[m], upload_s) for m in methods}


def _summary(geometry: str, method: str, budget: int, workers: list[int], rows: list[dict], upload_s: float) -> dict:
    summary = []
    for w in workers:
        mine = [r for r in rows if r["workers"] == w]
        med = statistics.median(r["wall_s"] for r in mine)
        summary.append({"workers": w, "reps": len(mine), "wall_s_median": med,
                        "wall_s_all": [r["wall_s"] for r in mine],
                        "throughput_MBps_median": round(mine[0]["child_bytes"] / med / 1e6, 2),
                        "fetch_ratio": max(r["fetch_ratio"] for r in mine),
                        "requests": [r["requests"] for r in mine]})
    return {"geometry": geometry, "method": method, "memory_budget": budget, "cpus": os.cpu_count(),
            "part_bytes": object_sink.DEFAULT_PART, "parents_upload_s": round(upload_s, 2),
            "summary": summary, "runs": rows}


# --- projection -----------------------------------------------------------------------------------

# Llama-3-70B's shapes (bench.Geometry lays out Qwen3's tensor names; the q/k norms it adds are
# 16 KiB in all): 70.6 G parameters, 141 GB per parent in bf16.
G70B = bench.Geometry("llama-3-70b-shapes", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8,
                      vocab=128256, tied=False)
SHARD = 5 * 10**9  # bytes per child shard, the default (--shard-size)


def count_requests(geom: bench.Geometry, budget: int, workers: int, parents: int = 2,
                   stat_passes: int = 0, spill: bool = True) -> dict[str, int]:
    """Requests a merge of `parents` bf16 parents of `geom` makes, from engine's own sizing rules.

    A task reads its rows of each parent in one ranged GET (engine.chunk_rows: half a worker's
    share of the budget, CHUNK_CAP raw bytes at most, across all inputs); a 1-D tensor is one task.
    Each child shard is one multipart upload of object_sink.part_bytes parts. A method with a
    statistic (slerp: 1 pass) reads a tensor of more than one task once per pass (engine.build_graph's
    partial tasks) and once to blend it; the spill (reread.py) keeps the first fetch for the others,
    so with `spill` each byte is fetched once. Without it (no spill, or on a cluster every later read
    landing on another worker than the first) `bytes_read_factor` counts the re-reads.
    """
    share = budget // workers - engine.stage_bytes(budget, workers)
    gets = reread = 0
    for _, shape in geom.tensors():
        rows = shape[0]
        if len(shape) > 1:
            raw_row = parents * 2 * shape[1]
            per_task = max(1, min(rows, min(share // 2, engine.CHUNK_CAP) // raw_row))
            tasks = -(-rows // per_task)
            again = stat_passes if tasks > 1 and not spill else 0
            gets += parents * tasks * (1 + again)
            reread += 2 * rows * shape[1] * again
        else:
            gets += parents
    child = geom.nbytes()
    shards = -(-child // SHARD)
    need = -(-min(SHARD, child) // object_sink.MAX_PARTS)  # as object_sink.part_bytes: 10,000 parts at most
    base = int(os.environ.get(object_sink.PART_ENV) or object_sink.DEFAULT_PART)
    part = base if need <= base else -(-need // 2**20) * 2**20
    parts = sum(-(-min(SHARD, child - i * SHARD) // part) for i in range(shards))
    return {"get_range": gets, "bytes_read_factor": round(1 + reread / geom.nbytes(), 4), "put_part": parts, "create_complete": 2 * shards, "shards": shards,
            "part_bytes": part}


def project(measured: dict, net_MBps: float, cpu_MBps: float, workers: list[int], budget: int) -> dict:
    """A 70B merge's bytes, requests and time per worker count.

    Time per worker count W: the child's bytes over W workers. A worker reads, blends and writes
    a task in turn (no overlap), so its rate is 1 / (1/cpu + 1/net), where cpu is the child
    bytes/s one core blends and net the child bytes/s its bandwidth carries: net_MBps over the
    bytes fetched per child byte (2x, slerp's statistic included, with the spill of reread.py)
    plus the one uploaded. `no_spill` is slerp without the spill's help: a dask.distributed cluster
    whose blends all run on other workers than their chunks' partial tasks (its upper bound).
    """
    child = G70B.nbytes()
    passes = 1 if measured["method"] == "slerp" else 0
    reqs = count_requests(G70B, budget, 1, stat_passes=passes)
    # the measured ratio less the 0.6B's own re-reads, times the 70B's (metadata is the rest)
    small = count_requests(bench.GEOMETRIES["0.6b"], budget, 1, stat_passes=passes)["bytes_read_factor"]
    fetch = max(r["fetch_ratio"] for r in measured["runs"]) - small + reqs["bytes_read_factor"]
    upload = max(r["upload_ratio"] for r in measured["runs"])
    worst = count_requests(G70B, budget, 1, stat_passes=passes, spill=False)
    no_spill = {"bytes_fetched": round(2 * child * (fetch - reqs["bytes_read_factor"] + worst["bytes_read_factor"])),
                "get_range": worst["get_range"]}
    net = net_MBps / (2 * fetch + upload)
    rate = 1e6 / (1 / cpu_MBps + 1 / net)
    rows = [{"workers": w, "hours": round(child / (w * rate) / 3600, 2),
             "minutes": round(child / (w * rate) / 60, 1)} for w in workers]
    return {"geometry": G70B.name, "child_bytes": child, "bytes_needed": 2 * child,
            "bytes_fetched": round(2 * child * fetch), "bytes_uploaded": round(child * upload),
            "requests": reqs, "per_worker_child_MBps": round(rate / 1e6, 1), "net_child_MBps": round(net, 1), "net_MBps": net_MBps,
            "cpu_MBps": cpu_MBps, "time": rows, "no_spill": no_spill}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="tiny", choices=list(bench.GEOMETRIES))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--method", nargs="+", default=["slerp"], choices=["linear", "slerp"],
                   help="one or more; several run interleaved against one server, and --out holds {method: doc}")
    p.add_argument("--memory-budget", type=parse_size, default=2**30)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--project", type=Path, metavar="JSON",
                   help="don't run: project a 70B merge from this earlier --out")
    p.add_argument("--net-MBps", type=float, default=100.0, help="assumed S3 bytes/s per worker (projection)")
    p.add_argument("--cpu-MBps", type=float, default=265.0,
                   help="child bytes/s one core blends (projection; slerp CPU time in docs/benchmarks.md)")
    a = p.parse_args()
    if a.project:
        doc = json.loads(a.project.read_text())
        docs = [doc] if "runs" in doc else list(doc.values())  # one method's --out, or several's
        out = {d["method"]: project(d, a.net_MBps, a.cpu_MBps, [1, 4, 8, 16, 32, 64], a.memory_budget) for d in docs}
        print(json.dumps(out if len(out) > 1 else out.popitem()[1], indent=2))
        return
    partial = a.out.with_suffix(".runs.jsonl") if a.out else None
    docs = run_methods(a.geometry, a.workers, a.reps, a.memory_budget, a.method, partial)
    text = json.dumps(docs if len(docs) > 1 else docs[a.method[0]], indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
