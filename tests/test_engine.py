"""The engine: chunking never changes the child, padding, resume, and in-place equals on-disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from darwin_stream import engine
from darwin_stream.child_writer import ChildWriter
from darwin_stream.plan import Plan, SourceRef, TensorPlan


def _plan(dirs, shapes, method, params=None, model_params=None, base=True):
    tensors = []
    for name, shape in shapes.items():
        models = (SourceRef("b", name),) if base else (SourceRef("a", name), SourceRef("b", name))
        tensors.append(TensorPlan(
            name=name, shape=shape, dtype="BF16", method=method, models=models,
            model_params=tuple(model_params or ({},) * len(models)), params=dict(params or {}),
            base=SourceRef("a", name) if base else None, seed=1234,
        ))
    return Plan(parents={"a": dirs[0], "b": dirs[1]}, tensors=tensors, config_from="a", tokenizer_from="a")


def _merge(plan, out, budget):
    writer = ChildWriter(out, plan, shard_size=10**9)
    engine.run(plan, writer, budget=budget)
    writer.finish()
    return load_file(str(out / "model.safetensors"))


CASES = [
    ("slerp", {"t": 0.3}, None, True),
    ("ties", {"normalize": True}, ({"weight": 1.0, "density": 0.5},), True),
    ("dare_ties", {}, ({"weight": 1.0, "density": 0.5},), True),
    ("linear", {"normalize": True}, ({"weight": 0.6}, {"weight": 0.4}), False),
]


@pytest.mark.parametrize(("method", "params", "model_params", "base"), CASES)
def test_chunking_does_not_change_the_child(pair, tmp_path, method, params, model_params, base):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, method, params, model_params, base)
    whole = _merge(plan, tmp_path / "whole", budget=2**30)
    rows = engine.chunk_rows(plan, plan.tensors[0], 40_000, workers=2)
    assert rows < 512 // 4, "the small budget must split the big tensor into several chunks"
    chunked = _merge(plan, tmp_path / "chunked", budget=40_000)
    for name in shapes:
        assert torch.equal(whole[name].view(torch.int16), chunked[name].view(torch.int16)), name


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_tensors_equals_the_child_on_disk(pair, tmp_path, workers):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.7})
    on_disk = _merge(plan, tmp_path / "c", budget=40_000)
    in_memory = dict(engine.iter_tensors(plan, workers=workers))
    assert in_memory.keys() == on_disk.keys()
    for name, t in in_memory.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t.view(torch.int16), on_disk[name].view(torch.int16)), name


def test_zero_padding_reads_zeros_beyond_the_source(pair):
    dirs = pair[0]
    plan = Plan(parents={"a": dirs[0]}, tensors=[], config_from="a", tokenizer_from="a")
    ref = SourceRef("a", "small.weight", pad_to=(10, 8))
    got = engine.read_source(plan, ref, 0, 10, "cpu")
    src = engine.get_parent(dirs[0]).read("small.weight").float()
    assert got.shape == (10, 8)
    assert torch.equal(got[:7, :5], src)
    assert not got[7:].any() and not got[:, 5:].any()
    tail = engine.read_source(plan, ref, 8, 10, "cpu")  # rows entirely in the padding
    assert tail.shape == (2, 8) and not tail.any()


def test_interrupted_merge_resumes_and_matches(pair, tmp_path):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.4})
    expected = _merge(plan, tmp_path / "ref", budget=40_000)

    out = tmp_path / "child"
    calls = {"n": 0}

    def stop_midway(nbytes):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    writer = ChildWriter(out, plan, shard_size=10**9)
    with pytest.raises(KeyboardInterrupt):
        engine.run(plan, writer, budget=40_000, progress=stop_midway)
    assert not out.exists(), "a killed merge must not leave a child under its final name"
    assert (tmp_path / ".child.partial").is_dir()

    writer = ChildWriter(out, plan, shard_size=10**9)
    assert len(writer.done) >= 4
    stats = engine.run(plan, writer, budget=40_000)
    writer.finish()
    assert stats.skipped_chunks == len(writer.done) >= 4
    got = load_file(str(out / "model.safetensors"))
    for name in shapes:
        assert torch.equal(got[name].view(torch.int16), expected[name].view(torch.int16)), name
    assert not (tmp_path / ".child.partial").exists()


def test_a_changed_plan_does_not_reuse_partial_chunks(pair, tmp_path):
    dirs, shapes = pair
    out = tmp_path / "child"
    first = _plan(dirs, shapes, "slerp", {"t": 0.1})
    writer = ChildWriter(out, first, shard_size=10**9)
    with pytest.raises(KeyboardInterrupt):
        engine.run(first, writer, budget=40_000, progress=lambda n: (_ for _ in ()).throw(KeyboardInterrupt))
    second = _plan(dirs, shapes, "slerp", {"t": 0.9})
    assert ChildWriter(out, second, shard_size=10**9).done == set()


def test_shards_split_at_the_shard_size(pair, tmp_path):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.5})
    writer = ChildWriter(tmp_path / "c", plan, shard_size=60_000)
    engine.run(plan, writer, budget=2**30)
    out = writer.finish()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    merged = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    assert merged.keys() == set(shapes)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())


def test_predicted_peak_stays_under_the_budget(pair):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.5})
    for budget in (40_000, 200_000, 2**20):
        assert engine.predicted_peak(plan, budget, workers=2) <= budget


def test_bf16_bits_written_unchanged_for_a_copy(pair, tmp_path):
    dirs, shapes = pair
    tensors = [TensorPlan(name=n, shape=s, dtype="BF16", method="passthrough", models=(SourceRef("a", n),),
                          model_params=({},)) for n, s in shapes.items()]
    plan = Plan(parents={"a": dirs[0]}, tensors=tensors, config_from="a", tokenizer_from="a")
    got = _merge(plan, tmp_path / "c", budget=40_000)
    src = load_file(str(np.str_(dirs[0]) + "/model.safetensors"))
    for n in shapes:
        assert torch.equal(got[n].view(torch.int16), src[n].view(torch.int16))


@pytest.mark.slow
def test_a_distributed_cluster_gives_the_same_child(pair, tmp_path):
    from distributed import Client, LocalCluster

    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.25})
    expected = _merge(plan, tmp_path / "threads", budget=40_000)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        writer = ChildWriter(tmp_path / "cluster", plan, shard_size=10**9)
        seen = []
        stats = engine.run(plan, writer, budget=40_000, client=client, progress=seen.append)
        writer.finish()
    assert sum(seen) == stats.bytes_written > 0
    got = load_file(str(tmp_path / "cluster" / "model.safetensors"))
    for name in shapes:
        assert torch.equal(got[name].view(torch.int16), expected[name].view(torch.int16)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blend_equals_cpu(pair):
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.6})
    cpu = dict(engine.iter_tensors(plan, device="cpu"))
    for name, t in engine.iter_tensors(plan, device="cuda"):
        assert t.device.type == "cpu"
        assert (t.float() - cpu[name].float()).abs().max() <= 2**-7 * cpu[name].float().abs().max(), name


def test_cuda_without_a_gpu_is_a_clear_error(pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.6})
    with pytest.raises(engine.DarwinError, match="no CUDA device"):
        list(engine.iter_tensors(plan, device="cuda"))


def test_a_scalar_tensor_merges_on_disk_and_in_place(tmp_path):
    dirs = []
    for k, value in enumerate((1.0, 3.0)):
        d = tmp_path / f"p{k}"
        d.mkdir()
        save_file({"scale": torch.tensor(value, dtype=torch.bfloat16)}, str(d / "model.safetensors"))
        dirs.append(str(d))
    plan = _plan(dirs, {"scale": ()}, "linear", {"normalize": True}, ({"weight": 0.75}, {"weight": 0.25}), base=False)
    on_disk = _merge(plan, tmp_path / "c", budget=2**20)
    in_memory = dict(engine.iter_tensors(plan, workers=0))
    assert on_disk["scale"].shape == in_memory["scale"].shape == ()
    assert on_disk["scale"].item() == in_memory["scale"].item() == 1.5


def test_a_one_task_statistic_reads_each_input_once(pair, monkeypatch):
    """slerp over a whole tensor walks its rows twice (angle, then blend) but reads them once:
    for a URL or store parent, every read is a download."""
    from collections import Counter

    from darwin_stream.sources import SafetensorsParent

    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.3})
    reads: Counter = Counter()
    real = SafetensorsParent.read_rows

    def counting(self, name, start=0, stop=None):
        reads[name] += 1
        return real(self, name, start, stop)

    monkeypatch.setattr(SafetensorsParent, "read_rows", counting)
    dict(engine.iter_tensors(plan, workers=0))
    assert reads == {name: 2 for name in shapes}  # the base's rows and the other model's, once each


# --- finiteness (issue 10, class 5) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_is_exact_where_the_fast_sum_overflows(dtype):
    big = torch.full((4096,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, but its sum overflows
    assert engine.finite(big)
    assert engine.finite(torch.arange(5))  # integers are always finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(4096, dtype=dtype)
        t[1234] = bad
        assert not engine.finite(t), bad


def test_a_nan_in_a_sparsified_input_is_found_even_where_the_mask_drops_it(pair, tmp_path):
    """dare drops elements by a mask, so a NaN may never reach the output: inputs are checked."""
    dirs, shapes = pair
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    tensors = load_file(str(Path(dirs[1]) / "model.safetensors"))
    tensors["small.weight"].view(-1)[0] = float("nan")
    save_file(tensors, str(poisoned / "model.safetensors"))
    plan = _plan([dirs[0], str(poisoned)], {"small.weight": shapes["small.weight"]}, "dare_linear",
                 {}, ({"weight": 1.0, "density": 0.01},))
    with pytest.raises(engine.DarwinError, match=r"tensor 'small.weight' holds NaN or Inf"):
        _merge(plan, tmp_path / "c", budget=2**20)
    with pytest.raises(engine.DarwinError, match=r"tensor 'small.weight' holds NaN or Inf"):
        dict(engine.iter_tensors(plan, workers=0))


def test_a_nan_in_one_chunk_of_a_slerp_is_blamed_on_its_parent(pair, tmp_path):
    """slerp's angle spans the tensor: a NaN in one chunk makes every chunk NaN, and the error must
    still name the parent, not a child that "comes out NaN from finite parents"."""
    dirs, shapes = pair
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    tensors = load_file(str(Path(dirs[1]) / "model.safetensors"))
    tensors["big.weight"][500, 3] = float("nan")  # the last chunk under a small budget
    save_file(tensors, str(poisoned / "model.safetensors"))
    plan = _plan([dirs[0], str(poisoned)], {"big.weight": shapes["big.weight"]}, "slerp", {"t": 0.5})
    assert engine.chunk_rows(plan, plan.tensors[0], 40_000, workers=2) < 500
    # Split into tasks (the partial tasks see it), and whole in one task, whose blend does not
    # look at the inputs again after its statistic's pass has.
    for budget, out in ((40_000, "c"), (2**30, "whole")):
        with pytest.raises(engine.DarwinError, match=r"parent .*poisoned: tensor 'big.weight' holds NaN or Inf"):
            _merge(plan, tmp_path / out, budget=budget)


def test_a_failed_merge_raises_only_once_its_running_tasks_are_done(pair, tmp_path, monkeypatch):
    """dask raises a task's error at once while the other running tasks go on writing: a re-run in
    the same process raced them (a zarr child's chunk upload completed under it)."""
    import threading
    import time

    dirs, shapes = pair
    plan = _plan(dirs, shapes, "slerp", {"t": 0.3})
    write = engine._write_task
    state, lock = {"running": 0, "calls": 0}, threading.Lock()

    def slow_or_failing(task, st, writer, progress):
        with lock:
            state["calls"] += 1
            first = state["calls"] == 1
            state["running"] += 1
        try:
            if first:
                time.sleep(0.05)  # the other worker has started its task
                raise engine.PlanError("injected")
            time.sleep(0.3)
            return write(task, st, writer, progress)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(engine, "_write_task", slow_or_failing)
    monkeypatch.setattr(engine, "worker_count", lambda client=None: 2)
    with pytest.raises(engine.PlanError, match="injected"):
        _merge(plan, tmp_path / "c", budget=40_000)
    assert state["calls"] > 1 and state["running"] == 0
