"""The library for pipelines: typed calls, report objects, one error hierarchy, a runnable docs page."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import darwin_stream as ds
from darwin_stream import edge, errors
from tests.helpers import DATA, evolve_yaml, read_all

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```", re.S | re.M)

# --- the public names ----------------------------------------------------------------------------


def test_every_public_name_is_documented_and_typed():
    assert {"merge", "ingest", "export", "evolve", "load_plan", "DarwinError"} <= set(ds.__all__)
    for name in ds.__all__:
        obj = getattr(ds, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type"
            for p in sig.parameters.values():
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}): no type"
            # options are keyword-only: at most the two positional "what" and "where"
            assert sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in sig.parameters.values()) <= 2, name
            assert "Raises" in obj.__doc__, name
        elif dataclasses.is_dataclass(obj):
            assert all(f.type for f in dataclasses.fields(obj)), name
            assert callable(obj.to_dict), name
        else:
            assert issubclass(obj, errors.DarwinError), name


def test_the_hierarchy_has_one_root_and_is_documented():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.DarwinError) for c in classes)
    doc = (ROOT / "docs" / "library.md").read_text()
    for c in classes:
        assert c.__name__ in doc and c.__name__ in ds.__all__, c.__name__
        assert c.__name__ in errors.__doc__, c.__name__
    assert issubclass(errors.BudgetError, errors.OptionError)
    assert issubclass(errors.DependencyError, ImportError)


def test_no_bare_builtin_exception_is_raised_for_the_user():
    """Only the method kernels raise ValueError (the engine names the tensor and turns it into a PlanError)."""
    pattern = re.compile(r"raise (Exception|ValueError|RuntimeError|KeyError|TypeError)\(")
    offenders = []
    for p in (ROOT / "darwin_stream").rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith("darwin_stream/methods/"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            # pydantic validators raise ValueError by contract: load_manifest turns them into ManifestError
            if pattern.search(line) and rel not in ("darwin_stream/manifest.py", "darwin_stream/bounded.py"):
                offenders.append(f"{rel}:{i}")
    assert not offenders, offenders


# --- the calls and their reports -----------------------------------------------------------------


def _toy(d: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return d


SHAPES = {"big.weight": (64, 32), "vec.weight": (32,)}


def _linear(a: Path, b: Path) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")


@pytest.fixture
def toys(tmp_path):
    return _toy(tmp_path / "a", SHAPES, 1), _toy(tmp_path / "b", SHAPES, 2)


def test_merge_ingest_export_reports(toys, tmp_path):
    a, b = toys
    m = ds.merge(_linear(a, b), tmp_path / "child", memory_budget="64MiB")
    assert m.memory_budget == 64 * 2**20
    assert isinstance(m, ds.MergeReport) and m.out == str(tmp_path / "child")
    assert m.tensors == 2 and m.bytes_written == (tmp_path / "child" / "model.safetensors").stat().st_size
    assert m.wall_s > 0 and m.peak_anon_bytes >= m.baseline_anon_bytes > 0

    ref = ds.ingest(tmp_path / "child", tmp_path / "ref.zarr")
    assert isinstance(ref, ds.IngestReport) and ref.mode == "reference" and ref.tensors == 2
    assert ref.bytes == 64 * 32 * 2 + 32 * 2 and ref.store_bytes == (tmp_path / "ref.zarr").stat().st_size
    copy = ds.ingest(tmp_path / "child", tmp_path / "copy.zarr", mode="copy")
    assert copy.mode == "copy" and copy.store_bytes == copy.bytes and copy.resumed_bytes == 0
    assert copy.peak_anon_bytes >= copy.baseline_anon_bytes > 0

    e = ds.export(tmp_path / "copy.zarr", tmp_path / "again")
    assert isinstance(e, ds.ExportReport) and e.out == str(tmp_path / "again") and e.shards == 1
    assert e.tensors == 2 and e.bytes == ref.bytes and e.wall_s >= 0
    got, want = read_all(tmp_path / "again"), read_all(tmp_path / "child")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    json.dumps([m.to_dict(), ref.to_dict(), e.to_dict()])  # a pipeline logs them as JSON


# --- each documented error, from a realistic bad input -------------------------------------------


def _cases(a: Path, b: Path, tmp: Path):
    c = _toy(tmp / "c", {"big.weight": (64, 31), "vec.weight": (32,)}, 3)
    (tmp / "a-file").write_text("not a directory")
    yield errors.ManifestError, lambda: ds.merge(f"merge_method: frob\nmodels:\n  - model: {a}\n", tmp / "o1")
    yield errors.SourceError, lambda: ds.merge(_linear(a, tmp / "missing"), tmp / "o2")
    yield errors.PlanError, lambda: ds.merge(_linear(a, c), tmp / "o3")
    yield errors.OptionError, lambda: ds.merge(_linear(a, b), tmp / "o4", out_format="onnx")  # type: ignore[arg-type]
    yield errors.BudgetError, lambda: ds.merge(_linear(a, b), tmp / "o5", memory_budget=1024)
    yield errors.OptionError, lambda: ds.merge(_linear(a, b), tmp / "o7", memory_budget="lots")
    yield errors.OutputError, lambda: ds.merge(_linear(a, b), a, overwrite=True)
    yield errors.StorageError, lambda: ds.merge(_linear(a, b), tmp / "a-file" / "child")
    yield errors.StoreError, lambda: ds.export(a, tmp / "o6")


def test_each_error_class_is_raised_by_a_realistic_bad_input(toys, tmp_path):
    a, b = toys
    for cls, call in _cases(a, b, tmp_path):
        with pytest.raises(cls) as info:
            call()
        msg = str(info.value)
        assert msg and "\n" not in msg, (cls, msg)
    assert not list(tmp_path.glob("o*")), "a refused call left an output"


def test_a_missing_extra_is_a_dependency_error(toys, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the [s3] extra were not installed
    cache = sys.modules[fsspec.get_filesystem_class.__module__]._registry
    monkeypatch.delitem(cache, "s3", raising=False)  # fsspec caches the class once imported
    with pytest.raises(errors.DependencyError, match="s3fs") as info:
        ds.ingest(toys[0], "s3://bucket/store.zarr", mode="copy")
    assert isinstance(info.value, ImportError)


def test_an_oserror_at_the_edge_keeps_its_cause():
    with pytest.raises(errors.StorageError, match=r"merge: .*denied") as info, edge.at_edge("merge"):
        raise PermissionError(13, "Permission denied", "/x")
    assert isinstance(info.value.__cause__, PermissionError)
    with pytest.raises(ZeroDivisionError), edge.at_edge("merge"):  # a bug keeps its traceback
        _ = 1 / 0


@pytest.mark.slow
def test_evolve_errors_and_report(trio, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"task": {"name": "x", "kind": "choice"}}\n{not json\n')
    broken = tmp_path / "broken.yaml"
    broken.write_text(evolve_yaml(trio, fitness=f"    tasks: [{tmp_path / 'broken.jsonl'}]\n"))
    with pytest.raises(errors.ScoreError, match=r"broken\.jsonl:2"):
        ds.evolve(broken, tmp_path / "r1")
    plain = tmp_path / "plain.yaml"
    plain.write_text(_linear(*trio[1:]))
    with pytest.raises(errors.EvolveError, match="no evolve section"):
        ds.evolve(plain, tmp_path / "r2")
    good = tmp_path / "good.yaml"
    good.write_text(evolve_yaml(trio, search="{popsize: 2, max_generations: 1}",
                                fitness=f"    tasks: [{DATA / 'capitals_choice.jsonl'}]\n"))
    r = ds.evolve(good, tmp_path / "r3")
    assert isinstance(r, ds.EvolveReport) and r.evaluations == 2 and Path(r.child_dir, "config.json").is_file()
    assert r.wall_s > 0 and r.peak_anon_bytes >= r.baseline_anon_bytes > 0


# --- docs/library.md runs as written -------------------------------------------------------------


def python_blocks(text: str) -> list[str]:
    return [body for lang, rest, body in FENCE.findall(text)
            if lang == "python" and "illustration" not in rest.split()]


DRIVER = """\
import json, sys
for i, block in enumerate(json.load(open(sys.argv[1]))):
    print(f"--- block {i}", flush=True)
    exec(compile(block, f"docs/library.md block {i}", "exec"), {"__name__": "__main__"})
"""


@pytest.mark.slow
def test_library_doc_runs_as_written(tmp_path, trio):
    blocks = python_blocks((ROOT / "docs" / "library.md").read_text())
    assert len(blocks) >= 4
    for name, src in zip(("base", "parent_a", "parent_b"), trio, strict=True):
        shutil.copytree(src, tmp_path / "demo-out" / name)
    shutil.copytree(ROOT / "darwin_stream" / "score" / "data", tmp_path / "darwin_stream" / "score" / "data")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.count("refused:") == 3, r.stdout
    for out in ("slerp", "slerp-again", "evolve.run"):
        assert (tmp_path / "out" / out).is_dir(), out
    assert not (tmp_path / "out" / "too-small").exists()
