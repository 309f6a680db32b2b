"""The parent pool: one open parent per spec per process, closed when the outermost session ends."""

from __future__ import annotations

import pickle
import threading

import pytest

from darwin_stream import api, engine, pool
from darwin_stream.child_writer import ChildWriter
from darwin_stream.plan import Plan, SourceRef, TensorPlan
from darwin_stream.sources import SafetensorsParent


def test_a_spec_is_opened_once_and_shared(tiny_parents):
    a, _ = tiny_parents
    with pool.ParentPool() as ps:
        got: list = []
        threads = [threading.Thread(target=lambda: got.append(ps.get(str(a)))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(p) for p in got}) == 1 and ps.opened[str(a)] == 1
        assert str(a) in ps
    assert str(a) not in ps  # closed at the end of the with block


def test_storage_options_are_part_of_the_key(tiny_parents):
    a, _ = tiny_parents
    with pool.ParentPool() as ps:
        assert ps.get(str(a)) is ps.get(str(a), None)
        assert ps.get(str(a)) is not ps.get(str(a), {"anon": True})  # options are for URLs, but keyed all the same
        assert ps.opened[str(a)] == 2


def test_the_outermost_session_closes_the_parents(tiny_parents):
    a, _ = tiny_parents
    pool.release_default()
    with pool.session():
        first = pool.get_parent(str(a))
        with pool.session():
            assert pool.get_parent(str(a)) is first
        assert str(a) in pool.default()  # an inner session leaves them open
    assert str(a) not in pool.default()
    assert pool.get_parent(str(a)) is not first  # opened afresh
    pool.release_default()


def test_a_merge_opens_each_parent_once_and_closes_it(tiny_parents, tmp_path):
    a, b = tiny_parents
    m = tmp_path / "m.yaml"
    m.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                 "parameters:\n  t: 0.5\n")
    pool.release_default()
    before = dict(pool.default().opened)
    api.merge(str(m), tmp_path / "c")
    opened = {s: n - before.get(s, 0) for s, n in pool.default().opened.items() if n != before.get(s, 0)}
    # planner, identities, the engine's tasks and the child's config and card: one open each
    assert opened == {str(a): 1, str(b): 1}
    assert str(a) not in pool.default() and str(b) not in pool.default()


def test_a_task_carries_its_own_tensor_plan_and_the_parents_specs(pair, tmp_path):
    dirs, shapes = pair
    def reads(n: str) -> tuple[str, ...]:
        return ("b",) if n == "small.weight" else ("a", "b")

    tensors = [TensorPlan(n, s, "BF16", "linear", tuple(SourceRef(k, n) for k in reads(n)), ({"weight": 0.5},) * len(reads(n)))
               for n, s in shapes.items()]
    plan = Plan(parents={"a": dirs[0], "b": dirs[1]}, tensors=tensors, config_from="a", tokenizer_from="a",
                manifest="x" * 100_000)
    writer = ChildWriter(tmp_path / "c", plan, shard_size=10**9)
    graph, outputs = engine.build_graph(plan, writer, budget=2**30, workers=1, device="cpu")
    for key in outputs:
        _fn, task, _state, writer_key, _progress = graph[key]
        assert writer_key == engine.WRITER and graph[writer_key] is writer  # the writer is one graph key
        assert task.plan.tensors == [] and task.plan.parents == {k: plan.parents[k] for k in reads(task.tp.name)}
        assert len(pickle.dumps(graph[key])) < 2048  # not the 100 KB manifest, nor the other tensors


def test_parents_opened_outside_the_pool_have_no_zarr_view_unless_given_one(tiny_parents):
    a, _ = tiny_parents
    p = pool.open_parent(str(a))
    assert isinstance(p, SafetensorsParent)
    name = next(iter(p.tensors))
    assert p.array(name).shape == p.info(name).shape  # the pool's opener wires store/'s reference view
    from darwin_stream.sources import SourceError, open_source

    bare = open_source(str(a))
    with pytest.raises(SourceError, match="without a zarr view"):
        bare.array(name)
    p.close()
    bare.close()


def test_an_opener_that_rewrites_the_options_does_not_open_the_parent_again(monkeypatch):
    """botocore rewrites `config_kwargs.retries` in place; the pool's key must not move with it
    (measured: every URL parent of a bucket merge was opened twice, 17 GETs of metadata for 13)."""
    opened: list[str] = []

    class Dummy:
        def close(self) -> None:
            pass

    def opener(spec, *, storage_options=None):
        storage_options["config_kwargs"]["retries"] = {"mode": "legacy", "total_max_attempts": 2}
        opened.append(spec)
        return Dummy()

    monkeypatch.setattr(pool, "open_parent", opener)
    opts = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    with pool.ParentPool() as ps:
        first = ps.get("s3://bucket/a", opts)
        assert ps.get("s3://bucket/a", opts) is first
    assert opened == ["s3://bucket/a"] and opts["config_kwargs"]["retries"] == {"max_attempts": 1}


def test_a_merge_of_local_checkpoints_does_not_import_the_store_layer(tiny_parents, tmp_path):
    """zarr and ml_dtypes (0.7-1.1 s of start-up) load only for stores: a merge of two local
    checkpoint directories, through the pool, must not import them; a store parent still opens."""
    import subprocess
    import sys

    from darwin_stream import store

    a, b = tiny_parents
    m = tmp_path / "m.yaml"
    m.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                 f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    code = ("import sys; from darwin_stream import merge; merge(sys.argv[1], sys.argv[2]); "
            "print(sorted(m for m in ('zarr', 'ml_dtypes', 'darwin_stream.store') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(m), str(tmp_path / "child")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "child" / "config.json").exists()
    store.ingest(a, tmp_path / "a.refs.json")
    with pool.ParentPool() as p:
        assert type(p.get(str(tmp_path / "a.refs.json"))).__name__ == "StoreParent"
