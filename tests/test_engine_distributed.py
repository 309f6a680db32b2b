"""dask.distributed: a cluster of worker processes makes the threaded scheduler's child, bit for bit.

One `LocalCluster` of 2 worker processes (one thread each) serves the module: a merge and a breed
through `api.merge(client=...)`, and `darwin-stream merge --scheduler ADDRESS` in a subprocess.
Each worker opens each parent once however many tasks it runs (the pool's counters, read on the
workers), and sizes its tasks with the whole memory budget (the budget applies per worker).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from darwin_stream import api, engine, pool

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 192 * 2**10  # small enough that the tiny parents' larger tensors take several tasks each


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def _merge_yaml(tmp_path: Path, a: Path, b: Path) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                 "parameters:\n  t: 0.3\ndtype: bfloat16\n")
    return p


def _breed_yaml(tmp_path: Path, a: Path, b: Path) -> Path:
    p = tmp_path / "breed.yaml"
    p.write_text(f"breed:\n  father: {a}\n  mother: {b}\n  blend:\n    mlp: {{method: linear, t: 0.4}}\n"
                 "    self_attn: {method: slerp, t: 0.7}\n")
    return p


def _shards(child: Path) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted(child.glob("*.safetensors"))}
    assert out, f"no shards in {child}"
    return out


def _opened(client) -> dict[str, dict[str, int]]:
    return client.run(lambda: dict(pool.default().opened))


def _opened_during(client, run) -> tuple[dict[str, dict[str, int]], api.MergeReport]:
    """Per worker, how many times each parent was opened while `run()` ran."""
    before = _opened(client)
    result = run()
    after = _opened(client)
    delta = {w: {s: n - before.get(w, {}).get(s, 0) for s, n in counts.items()} for w, counts in after.items()}
    return {w: {s: n for s, n in d.items() if n} for w, d in delta.items()}, result


@pytest.mark.parametrize("kind", ["merge", "breed"])
def test_a_two_process_cluster_makes_the_threaded_child(client, tiny_parents, tmp_path, kind):
    a, b = tiny_parents
    manifest = (_merge_yaml if kind == "merge" else _breed_yaml)(tmp_path, a, b)
    threaded = api.merge(str(manifest), tmp_path / "threads", memory_budget=BUDGET)
    opened, report = _opened_during(
        client, lambda: api.merge(str(manifest), tmp_path / "cluster", client=client, memory_budget=BUDGET))
    assert _shards(tmp_path / "cluster") == _shards(tmp_path / "threads")
    # Several tasks per large tensor. Fewer than the threaded run's: a single-thread worker has the
    # whole budget to itself, where this process's threads share it.
    assert threaded.chunks >= report.chunks > report.tensors
    specs = {str(a), str(b)}
    for worker, counts in opened.items():
        assert set(counts) <= specs and all(n <= 1 for n in counts.values()), (worker, counts)
    for spec in specs:  # every parent was read on the cluster, and opened once by each worker that read it
        assert sum(c.get(spec, 0) for c in opened.values()) >= 1, spec


def test_the_budget_applies_per_worker(client):
    # 2 single-thread workers: each holds one task at a time under the whole budget (threads in one
    # process share it). Counting the cluster's threads would halve every worker's tasks.
    assert engine.worker_count(client) == 1


def test_workers_close_their_parents_when_the_merge_ends(client, tiny_parents, tmp_path):
    a, b = tiny_parents
    api.merge(str(_merge_yaml(tmp_path, a, b)), tmp_path / "c", client=client, memory_budget=BUDGET)
    held = client.run(lambda: [s for s in (str(a), str(b)) if s in pool.default()])
    assert all(not specs for specs in held.values()), held


def test_the_cli_runs_on_a_scheduler_address(client, tiny_parents, tmp_path):
    a, b = tiny_parents
    manifest = _merge_yaml(tmp_path, a, b)
    api.merge(str(manifest), tmp_path / "threads", memory_budget=BUDGET)
    address = client.scheduler.address
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "darwin_stream.cli", "merge", str(manifest), str(tmp_path / "cli"),
                           "--scheduler", address, "--memory-budget", "192KiB", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _shards(tmp_path / "cli") == _shards(tmp_path / "threads")


@pytest.mark.s3
def test_a_cluster_writes_the_threaded_child_into_a_bucket(client, s3_server, tiny_parents, tmp_path, monkeypatch):
    """Workers upload their own parts; parts shared by tasks go as fragments, uploaded by `finish`."""
    from darwin_stream import object_sink
    from tests.s3_server import PART

    monkeypatch.setenv(object_sink.PART_ENV, str(PART))
    a, b = tiny_parents
    manifest = str(_merge_yaml(tmp_path, a, b))
    budget, shard = 2**20, 2**20
    api.merge(manifest, tmp_path / "threads", memory_budget=budget, shard_size=shard)
    threaded = api.merge(manifest, "s3://darwin/dist-threads", memory_budget=budget, shard_size=shard,
                         storage_options=s3_server.opts)
    report = api.merge(manifest, "s3://darwin/dist-cluster", client=client, memory_budget=budget, shard_size=shard,
                       storage_options=s3_server.opts)
    local = {p.name: p.read_bytes() for p in (tmp_path / "threads").iterdir()}
    for prefix in ("dist-threads", "dist-cluster"):
        got = {k[len(prefix) + 1:]: s3_server.get(k) for k in s3_server.keys(prefix + "/")}
        assert got.pop(".darwin-complete")
        assert got == local, prefix  # bit for bit: shards, index, config, tokenizer, card
    assert not s3_server.uploads("dist-cluster") and not s3_server.keys(".dist-cluster.partial/")
    up, child = report.uploads, sum(len(v) for v in local.values())
    want_parts = sum(-(-len(v) // PART) for k, v in local.items() if k.endswith(".safetensors"))
    assert up["parts"] + up["resumed_parts"] == want_parts  # every part uploaded once, by a worker or finish
    assert up["spilled_bytes"] > 0  # parts shared by tasks went through the bucket ...
    assert child <= up["bytes_uploaded"] <= child + up["spilled_bytes"] + 8192  # ... and only they twice
    assert up["peak_waiting"] <= object_sink.waiting_bytes(PART, 1, distributed=True)
    print(f"\nbucket child {child} B: threaded {threaded.uploads['requests']} requests, "
          f"{threaded.uploads['bytes_uploaded']} B up; cluster {up['requests']} requests, {up['bytes_uploaded']} B up "
          f"({up['spilled_bytes']} B as fragments)")


@pytest.mark.s3
def test_workers_read_url_parents_with_the_merge_s_storage_options(client, s3_server, tiny_parents, tmp_path,
                                                                   monkeypatch):
    """The tasks carry the storage options: the workers have no fsspec config for the server."""
    import fsspec.config

    from tests.test_object_sink import put_parents

    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    assert not any(any(k.startswith("FSSPEC_S3") for k in env) for env in client.run(lambda: dict(os.environ)).values())
    a, b = put_parents(s3_server, tiny_parents, "dist-opts")
    local = _merge_yaml(tmp_path, *tiny_parents)
    api.merge(str(local), tmp_path / "threads", memory_budget=BUDGET)
    remote = tmp_path / "remote.yaml"
    remote.write_text(local.read_text().replace(str(tiny_parents[0]), a).replace(str(tiny_parents[1]), b))
    api.merge(str(remote), tmp_path / "cluster", client=client, memory_budget=BUDGET, storage_options=s3_server.opts)
    assert _shards(tmp_path / "cluster") == _shards(tmp_path / "threads")


def _worker_spills() -> list[str]:
    import tempfile

    from darwin_stream import reread

    root = tempfile.gettempdir()
    return [n for n in os.listdir(root) if n.startswith(f"{reread.PREFIX}{os.getpid()}-")]


@pytest.mark.s3
def test_workers_spill_remote_rows_and_remove_them_when_the_merge_ends(client, s3_server, tiny_parents, tmp_path,
                                                                        monkeypatch):
    """Each worker keeps the bucket rows its partial tasks fetched (reread.py); a blend on another
    worker fetches them again. Whatever a worker kept is gone when the merge ends."""
    from tests.test_object_sink import put_parents

    a, b = put_parents(s3_server, tiny_parents, "dist-spill")
    local = _merge_yaml(tmp_path, *tiny_parents)
    remote = tmp_path / "remote.yaml"
    remote.write_text(local.read_text().replace(str(tiny_parents[0]), a).replace(str(tiny_parents[1]), b))
    runs: list[engine.RunStats] = []
    real = engine.run
    monkeypatch.setattr(engine, "run", lambda *args, **kw: runs.append(real(*args, **kw)) or runs[-1])
    api.merge(str(remote), tmp_path / "cluster", client=client, memory_budget=BUDGET, storage_options=s3_server.opts)
    api.merge(str(local), tmp_path / "threads", memory_budget=BUDGET)
    assert _shards(tmp_path / "cluster") == _shards(tmp_path / "threads")
    assert runs[0].spill["kept"] > 0  # the workers did keep rows
    assert all(not dirs for dirs in client.run(_worker_spills).values())



@pytest.mark.s3
def test_a_failed_cluster_merge_into_a_bucket_resumes(client, s3_server, tiny_parents, tmp_path, monkeypatch):
    """Parts uploaded before a failure are kept (ListParts); the fragments in the bucket are used."""
    from darwin_stream import object_sink
    from darwin_stream.errors import OutputError
    from tests.s3_server import PART

    monkeypatch.setenv(object_sink.PART_ENV, str(PART))
    manifest = str(_merge_yaml(tmp_path, *tiny_parents))
    api.merge(manifest, tmp_path / "threads", memory_budget=2**20, shard_size=2**20)
    upload, calls = object_sink.ObjectSink._upload, {"n": 0}

    def failing(self, shard, i, buf):  # in this process: `finish` uploading the parts left as fragments
        calls["n"] += 1
        if calls["n"] > 3:
            raise OutputError("injected: connection lost")
        return upload(self, shard, i, buf)

    monkeypatch.setattr(object_sink.ObjectSink, "_upload", failing)
    with pytest.raises(OutputError, match="injected"):
        api.merge(manifest, "s3://darwin/dist-resume", client=client, memory_budget=2**20, shard_size=2**20,
                  storage_options=s3_server.opts)
    monkeypatch.setattr(object_sink.ObjectSink, "_upload", upload)
    assert not s3_server.keys("dist-resume/") and s3_server.keys(".dist-resume.partial/fragments/")
    report = api.merge(manifest, "s3://darwin/dist-resume", client=client, memory_budget=2**20, shard_size=2**20,
                       storage_options=s3_server.opts)
    local = {p.name: p.read_bytes() for p in (tmp_path / "threads").iterdir()}
    got = {k[len("dist-resume/"):]: s3_server.get(k) for k in s3_server.keys("dist-resume/")}
    assert got.pop(".darwin-complete") and got == local
    up = report.uploads
    want_parts = sum(-(-len(v) // PART) for k, v in local.items() if k.endswith(".safetensors"))
    assert up["resumed_parts"] >= 2 and up["parts"] + up["resumed_parts"] == want_parts
    assert report.resumed_chunks > 0
    assert not s3_server.uploads("dist-resume") and not s3_server.keys(".dist-resume.partial/")
