"""Fuzzing the input contract (issue 10): about 300 seeded mutations of valid parents and manifests.

The seed corpus is two toy parents (one sharded with an index, one single-file, both with a config
and a tokenizer file) and a handful of manifests. Each mutation changes header bytes, a header
field, a JSON field of config.json or the index, or a YAML value, then runs the command line
in-process (`plan`, `merge`, `inspect`). Whatever the mutation, the outcome must be one of:

- exit 0 and, for merge, a child that safetensors loads and whose tensors are all finite (unless the
  mutated manifest allows non-finite values);
- a non-zero exit with exactly one stderr line starting `darwin-stream: error:`, no traceback, and
  nothing under the output's name;

and the inputs are unchanged byte for byte. Everything is drawn from one seeded generator, so a
failure names a case that replays (`FUZZ_SEED`, `FUZZ_CASES` override the defaults).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from darwin_stream import engine
from darwin_stream.cli import main

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))

TENSORS = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.layers.1.input_layernorm.weight": (8,),
    "model.norm.weight": (8,),
}

MANIFESTS = {
    "slerp": "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: [0.2, 0.8]\ndtype: bfloat16\n",
    "linear": ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
               "  - model: {b}\n    parameters: {{weight: 0.3}}\ndarwin: {{seed: 1, shard_size: 600}}\n"),
    "ties": ("merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n"
             "    parameters: {{weight: 1.0, density: 0.5}}\nparameters: {{normalize: true}}\n"),
    "dare": ("merge_method: dare_linear\nbase_model: {a}\nmodels:\n  - model: {b}\n"
             "    parameters: {{weight: [0.5, 1.0], density: 0.6}}\n"),
    "passthrough": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
                    "  - sources:\n      - model: {b}\n        layer_range: [1, 2]\n"),
    "task_arithmetic": ("merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                        "    parameters:\n      weight:\n        - filter: mlp\n          value: 0.5\n        - value: 1.0\n"),
}

# Values a mutation drops into JSON and YAML: wrong types, bounds, overflow, nesting, long strings.
NASTY: list = [
    -1, 0, 1, 2**31, 2**63, 2**70, -(2**70), 0.5, -0.0, 1e308, True, False, None, "", "x", "F32", "BF16",
    "../../etc/passwd", [], [1], [0, 2**70], [1.5, 2], {}, {"a": 1}, [[[[[]]]]], "x" * 5000, list(range(50)),
]
NASTY_RAW = ["1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 5000, "[" * 300 + "]" * 300, '"\\ud800"']


def make_parent(d: Path, seed: int, sharded: bool) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in TENSORS.items()}
    if sharded:
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        weight_map = {}
        for i, part in enumerate(halves):
            shard = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({n: tensors[n] for n in part}, str(d / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "toy", "num_hidden_layers": 2, "hidden_size": 8, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-corpus")
    make_parent(root / "a", 1, sharded=True)
    make_parent(root / "b", 2, sharded=False)
    return root


# --- mutations: each changes one file of the case (a copy of the corpus) and says what it did -----


def _shard(rng: random.Random, case: Path) -> Path:
    return rng.choice(sorted(case.glob("[ab]/*.safetensors")))


def mutate_header_bytes(rng: random.Random, case: Path) -> str:
    shard = _shard(rng, case)
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    kind = rng.choice(["byte", "bit", "length", "delete", "insert", "truncate", "append"])
    pos = rng.randrange(0, 8 + n)
    if kind == "byte":
        data[pos] = rng.randrange(256)
    elif kind == "bit":
        data[pos] ^= 1 << rng.randrange(8)
    elif kind == "length":
        data[:8] = rng.choice([0, 1, n - 1, n + 1, 2**63, len(data), 100 * 2**20 + 1]).to_bytes(8, "little")
    elif kind == "delete":
        del data[pos]
    elif kind == "insert":
        data.insert(pos, rng.randrange(256))
    elif kind == "truncate":
        pos = rng.randrange(0, len(data))
        del data[pos:]
    else:
        data += bytes(rng.randrange(1, 64))
    shard.write_bytes(bytes(data))
    return f"{shard.parent.name}/{shard.name}: {kind} at {pos}"


def _raw_value(rng: random.Random) -> str:
    return rng.choice(NASTY_RAW) if rng.random() < 0.3 else json.dumps(rng.choice(NASTY))


def mutate_header_field(rng: random.Random, case: Path) -> str:
    shard = _shard(rng, case)
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = rng.choice(sorted(header))
    field = rng.choice(["dtype", "shape", "data_offsets", "entry", "offset+1", "swap"])
    marker = "\x00MUTATION\x00"
    if name == "__metadata__" or field == "entry":
        header[name] = marker
    elif field == "offset+1":
        header[name]["data_offsets"][rng.randrange(2)] += rng.choice([-1, 1, 2])
    elif field == "swap":
        other = rng.choice([k for k in header if k != "__metadata__"])
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], header[name]["data_offsets"]
    else:
        header[name][field] = marker
    text = json.dumps(header).replace(json.dumps(marker), _raw_value(rng)).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return f"{shard.parent.name}/{shard.name}: {name}.{field}"


def _replace_somewhere(rng: random.Random, value, new):
    """`value` (JSON/YAML data) with one node, chosen at random, replaced by `new` or deleted."""
    if not isinstance(value, dict | list) or not value or rng.random() < 0.15:
        return new, "the whole value"
    key = rng.choice(sorted(value)) if isinstance(value, dict) else rng.randrange(len(value))
    if rng.random() < 0.15:
        del value[key]
        return value, f"deleted {key!r}"
    value[key], where = _replace_somewhere(rng, value[key], new)
    return value, f"{key!r} > {where}"


def mutate_json(rng: random.Random, case: Path, name: str) -> str:
    path = case / rng.choice(["a", "b"]) / name
    if not path.exists():
        path = case / "a" / name
    if rng.random() < 0.1:
        path.unlink()
        return f"{path.parent.name}/{name}: deleted"
    value, where = _replace_somewhere(rng, json.loads(path.read_text()), "\x00MUTATION\x00")
    path.write_text(json.dumps(value).replace(json.dumps("\x00MUTATION\x00"), _raw_value(rng)))
    return f"{path.parent.name}/{name}: {where}"


def mutate_index(rng: random.Random, case: Path) -> str:
    if rng.random() < 0.4:
        return mutate_json(rng, case, "model.safetensors.index.json")
    path = case / "a" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    name = rng.choice(sorted(wm))
    kind = rng.choice(["drop tensor", "other shard", "escape", "unknown shard", "drop shard file", "empty"])
    if kind == "drop tensor":
        del wm[name]
    elif kind == "other shard":
        wm[name] = next(s for s in sorted(set(wm.values())) if s != wm[name])
    elif kind == "escape":
        wm[name] = "../b/model.safetensors"
    elif kind == "unknown shard":
        wm[name] = "model-00003-of-00003.safetensors"
    elif kind == "drop shard file":
        (case / "a" / wm[name]).unlink()
    else:
        index["weight_map"] = {}
    path.write_text(json.dumps(index))
    return f"a/index: {kind} {name}"


class _Ref(str):
    """A YAML value spliced in as raw text (an alias bomb, non-UTF-8 bytes, a deep nesting)."""


YAML_RAW = [
    _Ref("[" * 200 + "]" * 200),
    _Ref("&x [*x]"),
    _Ref("!!python/object/apply:os.system ['true']"),
    _Ref("1e999"),
    _Ref(".nan"),
    _Ref("0x7fffffffffffffff"),
    _Ref('"\\xff"'),
]


def mutate_yaml(rng: random.Random, text: str) -> tuple[bytes, str]:
    kind = rng.random()
    if kind < 0.15:  # raw bytes, possibly breaking UTF-8 or the YAML syntax
        data = bytearray(text.encode())
        pos = rng.randrange(len(data))
        data[pos] = rng.choice([0xFF, 0xC3, ord(":"), ord("["), ord("*"), ord("&"), ord("\t"), 0])
        return bytes(data), f"byte {pos}"
    data = yaml.safe_load(text)
    new = rng.choice(NASTY + YAML_RAW)
    if kind < 0.25:
        data[rng.choice(["darwin", "breed", "tokenizer", "modules", "fancy"])] = new if not isinstance(new, _Ref) else {"x": 1}
        return yaml.safe_dump(data).encode(), "added a section"
    data, where = _replace_somewhere(rng, copy.deepcopy(data), "MUTATION-MARKER")
    out = yaml.safe_dump(data, width=10**9)
    raw = str(new) if isinstance(new, _Ref) else json.dumps(new)
    return out.replace("MUTATION-MARKER", raw).encode(), f"{where} = {raw[:40]}"


# --- the contract -------------------------------------------------------------------------------


def _digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return out


def _check_child(out: Path, allow_nonfinite: bool) -> None:
    shards = sorted(out.glob("*.safetensors"))
    assert shards and (out / "config.json").is_file(), f"exit 0 but no child in {out}"
    for s in shards:
        for name, t in load_file(str(s)).items():
            if t.is_floating_point() and not allow_nonfinite:
                assert torch.isfinite(t.float()).all(), f"exit 0 with a non-finite tensor {name}"


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _alarm(*_):
    raise TimeoutError("a fuzz case ran for more than 30 s")


def _one_case(capsys, case: Path, manifest: Path, mutation: str, allow_nonfinite: bool, parent: Path | None) -> None:
    inputs = [case / "a", case / "b", manifest]
    before = _digest(inputs)
    out = case / "child"
    runs = [["plan", str(manifest)], ["merge", str(manifest), str(out), "--quiet"]]
    if parent is not None:
        runs.append(["inspect", str(parent)])
    for argv in runs:
        try:
            code, err = _run(capsys, argv)
        except BaseException as e:  # a traceback: the contract's first breach
            raise AssertionError(f"{mutation}: {argv[0]} raised {type(e).__name__}: {str(e)[:300]}") from e
        finally:
            engine.release_parents()  # the next run reads the parent as it now is
        lines = err.strip().splitlines()
        if code == 0:
            if argv[0] == "merge":
                _check_child(out, allow_nonfinite)
        else:
            assert len(lines) == 1 and lines[0].startswith("darwin-stream: error: "), f"{mutation}: {argv[0]}: {err[:500]!r}"
            assert "Traceback" not in err
            if argv[0] == "merge":
                assert not out.exists(), f"{mutation}: a failed merge left {out}"
    assert _digest(inputs) == before, f"{mutation}: an input changed"


MUTATORS: list[tuple[str, int, Callable]] = [
    ("header bytes", 80, mutate_header_bytes),
    ("header field", 60, mutate_header_field),
    ("config", 35, lambda rng, case: mutate_json(rng, case, "config.json")),
    ("tokenizer config", 10, lambda rng, case: mutate_json(rng, case, "tokenizer_config.json")),
    ("index", 35, mutate_index),
]


def test_fuzzed_inputs_meet_the_contract(corpus, tmp_path, capsys):
    rng = random.Random(SEED)
    plan: list[str] = []
    for label, weight, _ in MUTATORS:
        plan += [label] * weight
    plan += ["yaml"] * 80
    plan = [plan[i % len(plan)] for i in range(CASES)]
    rng.shuffle(plan)
    mutators = {label: f for label, _, f in MUTATORS}
    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"ok": 0, "refused": 0}
    try:
        for i, label in enumerate(plan):
            case = tmp_path / f"case{i}"
            shutil.copytree(corpus, case)
            name = rng.choice(sorted(MANIFESTS))
            text = MANIFESTS[name].format(a=case / "a", b=case / "b")
            parent = None
            if label == "yaml":
                data, what = mutate_yaml(rng, text)
            else:
                data, what = text.encode(), mutators[label](rng, case)
                parent = case / "a" if what.startswith("a/") else case / "b"
            manifest = case / "m.yaml"
            manifest.write_bytes(data)
            allow = b"allow_nonfinite" in data
            signal.alarm(30)
            try:
                _one_case(capsys, case, manifest, f"case {i} (seed {SEED}, {label}, {name}): {what}", allow, parent)
            finally:
                signal.alarm(0)
            outcomes["ok" if (case / "child").exists() else "refused"] += 1
            shutil.rmtree(case)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz seed {SEED}: {outcomes}")  # shown with -s
    # Both outcomes must occur, or the fuzzer tests nothing: all refused means the corpus is broken.
    assert outcomes["ok"] >= CASES // 20 and outcomes["refused"] >= CASES // 20, outcomes
