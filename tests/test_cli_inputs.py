"""Bad input through the command line (issue 10): one line, or a success where the input is valid.

Each test drives `cli.main` in-process on toy parents (one layer, six tensors, one of them an
integer buffer and one of them empty) and fails on the code before the issue was fixed.
"""

from __future__ import annotations

import json
import math
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from darwin_stream import engine
from darwin_stream.cli import main

TENSORS = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.norm.weight": (8,),
}


def make_toy(d: Path, seed: int, *, extra: dict[str, torch.Tensor] | None = None, poison: str | None = None) -> Path:
    """A one-layer toy parent; `poison` names a tensor that gets one NaN."""
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in TENSORS.items()}
    if poison:
        tensors[poison].view(-1)[3] = float("nan")
    tensors.update(extra or {})
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 1}))
    return d


@pytest.fixture(autouse=True)
def _fresh_parents():
    """The engine keeps one open Parent per path; these tests rewrite parents between runs."""
    yield
    engine.release_parents()


@pytest.fixture
def toys(tmp_path):
    return make_toy(tmp_path / "a", 1), make_toy(tmp_path / "b", 2)


def slerp(a, b, extra: str = "") -> str:
    return f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n{extra}"


def linear(a, b, wa, wb, extra: str = "") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {wa}}}\n"
            f"  - model: {b}\n    parameters: {{weight: {wb}}}\n{extra}")


def run(capsys, tmp_path, text: str | bytes, command: str = "merge") -> tuple[int, str, Path]:
    m = tmp_path / "m.yaml"
    m.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "child"
    argv = [command, str(m)] + ([str(out), "--quiet"] if command == "merge" else [])
    code = main(argv)
    return code, capsys.readouterr().err.strip(), out


def fails(capsys, tmp_path, text, *needles, command: str = "merge") -> str:
    code, err, out = run(capsys, tmp_path, text, command)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("darwin-stream: error: "), err
    assert len(err) < 400, f"{len(err)} characters"
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    return err


# --- non-finite (class 5) -----------------------------------------------------------------------


def test_a_nan_in_a_parent_is_refused_naming_tensor_and_parent(capsys, tmp_path):
    a = make_toy(tmp_path / "a", 1)
    b = make_toy(tmp_path / "b", 2, poison="model.layers.0.mlp.up_proj.weight")
    fails(capsys, tmp_path, slerp(a, b), "model.layers.0.mlp.up_proj.weight", str(b), "allow_nonfinite")


def test_a_nan_in_a_copied_tensor_is_refused(capsys, tmp_path):
    a = make_toy(tmp_path / "a", 1, poison="model.norm.weight")
    text = f"merge_method: passthrough\nmodels:\n  - model: {a}\n"
    fails(capsys, tmp_path, text, "model.norm.weight", str(a))


def test_allow_nonfinite_merges_the_nan_through(capsys, tmp_path):
    a = make_toy(tmp_path / "a", 1)
    b = make_toy(tmp_path / "b", 2, poison="model.layers.0.mlp.up_proj.weight")
    code, err, out = run(capsys, tmp_path, slerp(a, b, "darwin: {allow_nonfinite: true}\n"))
    assert code == 0, err
    child = load_file(str(out / "model.safetensors"))
    assert torch.isnan(child["model.layers.0.mlp.up_proj.weight"].float()).any()
    assert torch.isfinite(child["model.norm.weight"].float()).all()


def test_a_child_that_overflows_stops_the_merge(capsys, tmp_path, toys):
    # 0.02-scale weights times 1e7, unnormalised: finite in float32, Inf once rounded to float16
    text = linear(*toys, "1.0e7", "1.0e7", "parameters: {normalize: false}\ndtype: float16\n")
    fails(capsys, tmp_path, text, "comes out NaN or Inf", "model.")


def test_nearly_cancelling_weights_are_refused_by_plan_and_merge(capsys, tmp_path, toys):
    # the sum is 1e-8 in float64 and exactly 0 in the float32 the division runs in: an all-Inf child
    text = linear(*toys, "1.0", "-0.99999999")
    fails(capsys, tmp_path, text, "sum to zero", command="plan")
    fails(capsys, tmp_path, text, "sum to zero")
    assert not (tmp_path / ".child.partial").exists()


# --- tracebacks that are successes (class 6) ---------------------------------------------------


def test_passthrough_without_scale_merges_the_shipped_manifest(capsys, tmp_path, tiny_parents):
    father, mother = tiny_parents
    shipped = Path(__file__).resolve().parents[1] / "manifests" / "passthrough.yaml"
    text = shipped.read_text().replace("demo-out/parent_a", str(father)).replace("demo-out/parent_b", str(mother))
    code, err, out = run(capsys, tmp_path, text)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6


def test_integer_and_empty_tensors_merge(capsys, tmp_path):
    extra = {"model.layers.0.pos_ids": torch.arange(5), "model.layers.0.empty": torch.zeros(0, dtype=torch.bfloat16)}
    a = make_toy(tmp_path / "a", 1, extra=extra)
    b = make_toy(tmp_path / "b", 2, extra={**extra, "model.layers.0.pos_ids": torch.arange(5) * 7})
    code, err, out = run(capsys, tmp_path, slerp(a, b))
    assert code == 0, err
    child = load_file(str(out / "model.safetensors"))
    assert torch.equal(child["model.layers.0.pos_ids"], torch.arange(5))  # from the template, unblended
    assert child["model.layers.0.empty"].shape == (0,)


# --- one line instead of a traceback (class 6) --------------------------------------------------


def test_bad_scheduler_address_is_one_line(capsys, tmp_path, toys):
    m = tmp_path / "m.yaml"
    m.write_text(slerp(*toys))
    code = main(["merge", str(m), str(tmp_path / "child"), "--quiet", "--scheduler", "not an address"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--scheduler not an address" in err, err


def test_config_that_is_a_list_is_one_line(capsys, tmp_path, toys):
    (toys[0] / "config.json").write_text("[1, 2, 3]")
    fails(capsys, tmp_path, slerp(*toys), "config.json holds a JSON list", command="plan")


def test_missing_config_is_one_line(capsys, tmp_path, toys):
    (toys[0] / "config.json").unlink()  # the child's config would be {}
    fails(capsys, tmp_path, slerp(*toys), "has no config.json", command="plan")


def test_dtype_given_as_a_list_is_one_line(capsys, tmp_path, toys):
    shard = toys[1] / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'"dtype":"BF16"', b'"dtype":["BF"]', 1))  # same length
    fails(capsys, tmp_path, slerp(*toys), "not a dtype name", command="plan")


# --- smaller (class 8) -------------------------------------------------------------------------


def test_a_model_listed_twice_is_refused(capsys, tmp_path, toys):
    a, b = toys
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1.0}}\n  - model: {a}/\n    parameters: {{weight: 1.0}}\n")
    fails(capsys, tmp_path, text, "models[2]", "models[0]", command="plan")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "ties"])
@pytest.mark.parametrize("density", ["-1", "0", "1.5"])
def test_density_outside_0_1_is_refused_by_plan(capsys, tmp_path, toys, method, density):
    a, b = toys
    text = (f"merge_method: {method}\nbase_model: {a}\nmodels:\n  - model: {b}\n"
            f"    parameters: {{weight: 1.0, density: {density}}}\n")
    fails(capsys, tmp_path, text, "density in (0, 1]", command="plan")


def test_a_density_below_one_element_keeps_one_like_mergekit(capsys, tmp_path, toys):
    """ties with density 0.05 of an 8-element norm: mergekit 0.1.5 keeps max(1, int(density * n))
    elements; it was refused (and before that, found only mid-merge)."""
    a, b = toys
    text = f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0, density: 0.05}}\n"
    code, err, out = run(capsys, tmp_path, text)
    assert code == 0, err
    assert out.is_dir()


# --- YAML (class 7) -----------------------------------------------------------------------------

# Nine levels of nine aliases, inside a field whose error message repeats the value: 9**9 strings.
# Measured on the old code, six levels gave a 4.3 MB message in 0.13 s; nine would be 3 GB.
BOMB = "merge_method: linear\nmodels:\n  - model: [" + ", ".join(
    [f"&l0 [{', '.join(['lol'] * 9)}]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "]\n"


def test_yaml_alias_bomb_fails_fast_with_one_line(capsys, tmp_path):
    assert len(BOMB) < 600  # 9**9 strings once expanded: a minute and gigabytes in repr() before

    def hang(*_):
        raise TimeoutError("the alias bomb was expanded")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)  # a guard, not a timing: the bomb used to run for a minute
    try:
        fails(capsys, tmp_path, BOMB, "aliases", command="plan")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"merge_method: slerp\nbase_model: caf\xe9\n", "not UTF-8"),
        ("merge_method: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested more than"),
        ("merge_method: linear\n" + "#" * 2**20 + "\n", "over the"),
        ("merge_method: [" + "x" * 100_000 + "]\n", "merge_method: expected a string, got ['xxx"),
    ],
    ids=["latin-1", "deep", "huge", "long value"],
)
def test_bad_yaml_is_one_short_line(capsys, tmp_path, text, needle):
    fails(capsys, tmp_path, text, needle, command="plan")


# --- parent files copied into the child (class 3) ----------------------------------------------


def test_tokenizer_symlink_out_of_the_parent_is_one_line(capsys, tmp_path, toys):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (toys[0] / "tokenizer.json").symlink_to(secret)
    fails(capsys, tmp_path, slerp(*toys), "tokenizer.json is a symlink", "outside the parent")


def test_child_files_are_no_more_readable_than_the_parents(capsys, tmp_path, toys):
    tok = toys[0] / "tokenizer.json"
    tok.write_text('{"private": true}')
    tok.chmod(0o600)
    code, err, out = run(capsys, tmp_path, slerp(*toys))
    assert code == 0, err
    assert stat.S_IMODE((out / "tokenizer.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) & 0o044  # the rest keeps its mode


def test_merge_child_is_finite(capsys, tmp_path, toys):
    """The control for the non-finite tests: the same toys merge, and the child is finite."""
    code, err, out = run(capsys, tmp_path, slerp(*toys))
    assert code == 0, err
    for name, t in load_file(str(out / "model.safetensors")).items():
        assert t.numel() == 0 or all(math.isfinite(x) for x in t.float().flatten().tolist()), name


def test_model_stock_with_one_model_is_refused_by_plan(capsys, tmp_path, toys):
    a, b = toys
    text = f"merge_method: model_stock\nbase_model: {a}\nmodels:\n  - model: {b}\n"
    fails(capsys, tmp_path, text, "at least 2 other models", command="plan")
