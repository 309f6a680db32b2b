"""The command line: bad input gets one line naming the problem, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from darwin_stream.api import load_plan as plan_of_manifest
from darwin_stream.cli import main
from tests.helpers import read_all

MANIFEST = """\
merge_method: {method}
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: {t}
dtype: bfloat16
"""


def _manifest(tmp_path, a, b, method="slerp", t="0.5", text=None):
    p = tmp_path / "m.yaml"
    p.write_text(text if text is not None else MANIFEST.format(method=method, a=a, b=b, t=t))
    return p


def _fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("darwin-stream: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shards(d):
    return sorted(d.glob("*.safetensors"))


@pytest.fixture
def out(tmp_path):
    o = tmp_path / "child"
    yield o
    assert not o.exists(), "nothing may be written under the output name"
    assert not (tmp_path / ".child.partial").exists()


def test_missing_parent(capsys, tmp_path, tiny_parents, out):
    a, _ = tiny_parents
    m = _manifest(tmp_path, a, tmp_path / "nowhere")
    _fails(capsys, ["merge", str(m), str(out)], "nowhere")


def test_missing_tensor(capsys, tmp_path, tiny_parents, out):
    a, b = tiny_parents
    tensors = read_all(b)
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(b / "config.json", bad / "config.json")
    _fails(capsys, ["merge", str(_manifest(tmp_path, a, bad)), str(out)], dropped)


def test_mismatched_shapes(capsys, tmp_path, tiny_parents, out):
    a, b = tiny_parents
    tensors = read_all(b)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = tensors[name][:-1].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(b / "config.json", bad / "config.json")
    err = _fails(capsys, ["merge", str(_manifest(tmp_path, a, bad)), str(out)], name)
    assert "shape" in err


def test_truncated_shard(capsys, tmp_path, tiny_parents, out):
    a, b = tiny_parents
    bad = _copy(b, tmp_path / "bad")
    shard = _shards(bad)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(capsys, ["merge", str(_manifest(tmp_path, a, bad)), str(out)], shard.name, "truncated")


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("corrupt", "header"), ("garbled", "header"), ("oversized", "exceeds")],
)
def test_bad_safetensors_header(capsys, tmp_path, tiny_parents, out, kind, needle):
    a, b = tiny_parents
    bad = _copy(b, tmp_path / "bad")
    shard = _shards(bad)[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if kind == "corrupt":
        data[8 + n // 2] = ord("}")  # valid bytes, broken JSON
    elif kind == "garbled":
        data[8 : 8 + n] = bytes((i * 37 + 11) % 256 for i in range(n))
    else:
        data[:8] = (2**40).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    _fails(capsys, ["merge", str(_manifest(tmp_path, a, bad)), str(out)], shard.name, needle)


def test_pickle_only_checkpoint(capsys, tmp_path, tiny_parents, out):
    a, _ = tiny_parents
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (bad / "config.json").write_text("{}")
    _fails(capsys, ["merge", str(_manifest(tmp_path, a, bad)), str(out)], "pytorch_model.bin", "pickle")


def test_malformed_yaml(capsys, tmp_path, tiny_parents, out):
    m = _manifest(tmp_path, *tiny_parents, text="merge_method: linear\nmodels: [\n  - model: x\n")
    _fails(capsys, ["merge", str(m), str(out)], "YAML")


def test_unknown_method(capsys, tmp_path, tiny_parents, out):
    m = _manifest(tmp_path, *tiny_parents, method="frankenmerge")
    _fails(capsys, ["merge", str(m), str(out)], "frankenmerge")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_parameter(capsys, tmp_path, tiny_parents, out, value):
    m = _manifest(tmp_path, *tiny_parents, t=value)
    _fails(capsys, ["merge", str(m), str(out)], "t")


def test_tensor_name_escaping_the_store(capsys, tmp_path, tiny_parents):
    a, _ = tiny_parents
    bad = tmp_path / "escape"
    bad.mkdir()
    tensors = read_all(a)
    tensors["../../evil.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(a / "config.json", bad / "config.json")
    store = tmp_path / "store"
    _fails(capsys, ["ingest", str(bad), str(store), "--mode", "copy", "--quiet"], "evil")
    assert not (tmp_path / "evil.weight").exists() and not (tmp_path.parent / "evil.weight").exists()


def test_bad_memory_budget_is_an_argument_error(capsys, tmp_path, tiny_parents):
    with pytest.raises(SystemExit) as e:
        main(["merge", str(_manifest(tmp_path, *tiny_parents)), str(tmp_path / "c"), "--memory-budget", "lots"])
    assert e.value.code == 2
    assert "memory-budget" in capsys.readouterr().err


def test_the_installed_command_prints_one_line(tmp_path, tiny_parents):
    """The real entry point, in a subprocess: no traceback reaches the user."""
    a, _ = tiny_parents
    m = _manifest(tmp_path, a, tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, "-m", "darwin_stream.cli", "merge", str(m), str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nowhere" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_plan_writes_nothing_and_reports(capsys, tmp_path, tiny_parents):
    m = _manifest(tmp_path, *tiny_parents)
    assert main(["plan", str(m), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["predicted_peak_bytes"] <= report["memory_budget"]
    assert report["child_bytes"] > 0
    assert len(report["plan"]["tensors"]) == len(read_all(tiny_parents[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


def test_merge_json_report(capsys, tmp_path, tiny_parents):
    m = _manifest(tmp_path, *tiny_parents)
    assert main(["merge", str(m), str(tmp_path / "c"), "--json", "--quiet", "--memory-budget", "1MiB"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("wall_s", "bytes_read", "bytes_written", "peak_anon_bytes"):
        assert report[key] > 0, key
    assert report["memory_budget"] == 2**20


def test_page_cache_flag_and_option_give_the_same_child(capsys, tmp_path, tiny_parents):
    """--page-cache (or `darwin: {direct_io: false}`) only changes how the shards are written."""
    from darwin_stream.child_writer import ChildWriter

    m = _manifest(tmp_path, *tiny_parents)
    text = m.read_text()

    def merge(name: str, *flags: str) -> bool:
        assert main(["merge", str(m), str(tmp_path / name), "--quiet", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["direct_io"]

    probe = ChildWriter(tmp_path / "probe", plan_of_manifest(m), shard_size=10**9)
    assert merge("direct") == probe.direct  # O_DIRECT wherever this filesystem takes it
    assert merge("flag", "--page-cache") is False
    m.write_text(text + "darwin:\n  direct_io: false\n")
    assert merge("option") is False
    m.write_text(text + "darwin:\n  direct_io: maybe\n")
    _fails(capsys, ["merge", str(m), str(tmp_path / "bad")], "direct_io")
    children = [read_all(tmp_path / name) for name in ("direct", "flag", "option")]
    for name, tensor in children[0].items():
        for other in children[1:]:
            assert tensor.view(-1).view(torch.uint8).equal(other[name].view(-1).view(torch.uint8)), name


def test_plan_counts_the_parts_a_bucket_child_keeps_waiting(capsys, tmp_path, tiny_parents, monkeypatch):
    """`plan` says what a merge into a bucket would hold at its peak: the merge's own peak plus
    the parts that wait for their other bytes (object_sink.waiting_bytes), from the same budget."""
    from darwin_stream import object_sink

    a, b = tiny_parents
    m = tmp_path / "m.yaml"
    m.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                 f"  - model: {b}\n    parameters: {{weight: 1}}\ndtype: bfloat16\n")
    monkeypatch.setenv(object_sink.PART_ENV, str(2**16))
    assert main(["plan", str(m), "--memory-budget", "4MiB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["predicted_peak_bucket_bytes"] > object_sink.waiting_bytes(2**16, 1)
    assert got["predicted_peak_bucket_bytes"] <= got["memory_budget"]
    monkeypatch.setenv(object_sink.PART_ENV, str(2**22))  # 4 MiB parts cannot wait within a 4 MiB budget
    assert main(["plan", str(m), "--memory-budget", "4MiB"]) == 0
    assert "into a bucket (s3://...): the budget is too small" in capsys.readouterr().out
