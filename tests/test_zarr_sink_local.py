"""A local `--format zarr` child (zarr_sink.LocalZarrSink): chunk files written in place by the tasks,
no safetensors copy staged, built in `.<name>.partial` and renamed when complete.

The same 280 KiB budget and 2 workers as tests/test_zarr_sink.py split the tiny parents' larger
tensors into several chunks, some ending short (stored padded).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from darwin_stream import child_writer, engine, load_plan, merge, zarr_sink
from darwin_stream.errors import OutputError, StorageError
from darwin_stream.store import export_store, open_store
from tests.helpers import local_merge

MANIFEST = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.3\ndtype: bfloat16\n"
BUDGET = 280 * 1024


@pytest.fixture(autouse=True)
def two_workers(monkeypatch):
    monkeypatch.setattr(engine, "worker_count", lambda client=None: 2)  # the chunks follow the workers


@pytest.fixture(scope="module")
def local_child(tiny_parents, tmp_path_factory):
    return local_merge(tmp_path_factory.mktemp("local"), MANIFEST, tiny_parents, memory_budget=BUDGET)


def files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in d.iterdir()}


def exported(store: Path, out: Path) -> dict[str, bytes]:
    export_store(store, out)
    return files(out)


def test_a_local_zarr_child_is_written_in_place_and_exports_to_the_safetensors_child(local_child, tmp_path,
                                                                                    monkeypatch):
    manifest, local = local_child

    def refuse(*a, **k):
        raise AssertionError("a zarr child must not stage a safetensors child")

    monkeypatch.setattr(child_writer.ChildWriter, "__init__", refuse)
    report = merge(manifest, tmp_path / "child.zarr", memory_budget=BUDGET, out_format="zarr")
    assert report.format == "zarr" and sorted(p.name for p in tmp_path.iterdir()) == ["child.zarr"]
    assert exported(tmp_path / "child.zarr", tmp_path / "out") == files(local)
    index = open_store(tmp_path / "child.zarr").attrs["darwin_stream"]["tensors"]
    split = [n for n, e in index.items() if e["checksum"].startswith("sha256-chunks:")]
    assert split
    padded = 0
    for name in split:  # an edge chunk is a full-size file, its tail zeros
        e = index[name]
        rows = open_store(tmp_path / "child.zarr")[e["path"]].chunks[0]
        last = -(-e["shape"][0] // rows) - 1
        size = (tmp_path / "child.zarr" / e["path"] / "c" / str(last) / "0").stat().st_size
        assert size == rows * e["shape"][1] * 2
        padded += e["shape"][0] % rows != 0
    assert padded


def test_a_failed_local_zarr_merge_resumes_from_its_chunks(local_child, tiny_parents, tmp_path, monkeypatch):
    manifest, local = local_child
    add = zarr_sink.LocalChunk.add
    calls = {"n": 0}

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise StorageError("injected: disk gone")
        return add(self, data)

    monkeypatch.setattr(zarr_sink.LocalChunk, "add", failing)
    out = tmp_path / "child.zarr"
    with pytest.raises(StorageError, match="injected"):
        merge(manifest, out, memory_budget=BUDGET, out_format="zarr")
    assert not out.exists() and (tmp_path / ".child.zarr.partial").is_dir()
    monkeypatch.setattr(zarr_sink.LocalChunk, "add", add)
    report = merge(manifest, out, memory_budget=BUDGET, out_format="zarr")
    plan, rows = load_plan(manifest), zarr_sink.task_rows(load_plan(manifest), BUDGET, 2)
    every = sum(-(-(t.shape[0] if t.shape else 1) // rows[t.name]) for t in plan.tensors)
    assert report.resumed_chunks >= 10 and report.chunks + report.resumed_chunks == every  # only the rest redone
    assert exported(out, tmp_path / "out") == files(local)

    # Another plan into the same place: refused while it exists, then replaced, its partial discarded.
    father, mother = tiny_parents
    other = tmp_path / "other.yaml"
    other.write_text(MANIFEST.format(a=father, b=mother).replace("t: 0.3", "t: 0.7"))
    with pytest.raises(OutputError, match="already exists"):
        merge(other, out, memory_budget=BUDGET, out_format="zarr")
    monkeypatch.setattr(zarr_sink.LocalChunk, "add", failing)
    calls["n"] = 0
    with pytest.raises(StorageError, match="injected"):
        merge(other, out, memory_budget=BUDGET, out_format="zarr", overwrite=True)
    assert exported(out, tmp_path / "still") == files(local)  # the old store stays until the new one is whole
    monkeypatch.setattr(zarr_sink.LocalChunk, "add", add)
    report = merge(manifest, out, memory_budget=BUDGET, out_format="zarr", overwrite=True)
    assert report.resumed_chunks == 0
    assert any("restarted from scratch" in n and "different plan" in n for n in report.notes), report.notes
    assert exported(out, tmp_path / "again") == files(local)
