"""The command line explains itself: --version, help on every argument, the methods listing, export's
labels and notes, and a quiet exit when the reader of stdout goes away."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from darwin_stream import __version__, methods
from darwin_stream.cli import build_parser, main
from tests.helpers import read_all


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"darwin-stream {__version__}"


def test_top_level_description_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "parse, call the library, print" not in out
    assert "without training" in out and "manifest" in out


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"merge", "plan", "ingest", "export", "inspect", "score", "methods"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"arguments without help: {missing}"


def test_plan_has_no_quiet_flag_that_does_nothing(capsys):
    """plan shows no progress bar, so it takes no --quiet."""
    assert "--quiet" not in _subparsers(build_parser())["plan"].format_help()
    assert "--quiet" in _subparsers(build_parser())["export"].format_help()


def test_score_help_states_the_real_default_context_length():
    from darwin_stream.score.vllm_backend import DEFAULT_MAX_MODEL_LEN, _max_model_len

    text = " ".join(_subparsers(build_parser())["score"].format_help().split())
    assert f"default {DEFAULT_MAX_MODEL_LEN}" in text and "max_position_embeddings" in text
    # what the help says: the default, capped by the model
    assert _max_model_len({}, None) == DEFAULT_MAX_MODEL_LEN
    assert _max_model_len({"max_position_embeddings": 512}, None) == 512


def test_methods_lists_every_registered_method_with_its_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed[: len(methods.names())] == methods.names()
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert sorted(rows) == methods.names()
    for name, row in rows.items():
        m = methods.get(name)
        assert set(row["model_parameters"]) == set(m.model_param_defaults), name
        assert set(row["parameters"]) == set(m.param_defaults), name
        assert row["needs_base"] == m.needs_base
    assert rows["slerp"]["parameters"] == {"t": "required"}
    assert rows["linear"]["model_parameters"] == {"weight": "required"}
    assert rows["linear"]["parameters"] == {"normalize": True}


def test_methods_names_an_unknown_method(capsys):
    assert main(["methods", "slerp", "slurp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("darwin-stream: error:") and "'slurp'" in err and "slerp" in err


def _run_with_closed_stdout(argv: list[str]) -> subprocess.CompletedProcess:
    """The reader of stdout is gone before anything is written: every write fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "darwin_stream.cli", *argv], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)


@pytest.mark.slow
def test_broken_pipe_exits_quietly(tiny_parents):
    proc = _run_with_closed_stdout(["inspect", str(tiny_parents[0])])
    assert proc.stderr == ""
    assert proc.returncode == 141  # as a process killed by SIGPIPE, what `set -o pipefail` sees
    head = subprocess.run(f"{sys.executable} -m darwin_stream.cli inspect {tiny_parents[0]} | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert head.stdout.startswith("model:") and len(head.stdout.splitlines()) == 1
    assert head.stderr == ""


# --- export -------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, tiny_parents):
    s = tmp_path / "father.refs.json"
    assert main(["ingest", str(tiny_parents[0]), str(s), "--quiet"]) == 0
    return s


def test_export_labels_its_output_and_notes_the_reshard(capsys, tmp_path, tiny_parents, store):
    capsys.readouterr()
    out = tmp_path / "exported"
    assert main(["export", str(store), str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    parent_shards = len(list(tiny_parents[0].glob("*.safetensors")))
    assert parent_shards > 1
    assert lines[0].startswith(f"exported: {out} (") and "1 shard(s)" in lines[0]
    assert not any(line.startswith("child:") for line in lines)
    assert lines[1].startswith("note: re-sharded") and f"had {parent_shards} safetensors file(s)" in lines[1]
    # a parent already in one shard comes back in one: nothing to note
    store2 = tmp_path / "one-shard.refs.json"
    assert main(["ingest", str(out), str(store2), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(store2), str(tmp_path / "again"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["shards"], report["source_shards"], report["notes"]) == (1, 1, [])


def test_export_refuses_an_existing_out_dir_then_overwrites_it(capsys, tmp_path, tiny_parents, store):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", str(store), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and (out / "stale.txt").exists()
    assert main(["export", str(store), str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    got, want = read_all(out), read_all(tiny_parents[0])
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].view(-1).view(dtype=t.dtype).equal(t.view(-1)), name


@pytest.mark.parametrize("where", ["store_dir", "parent"])
def test_export_overwrite_never_replaces_an_input(capsys, tmp_path, tiny_parents, where):
    parent = tmp_path / "p"
    shutil.copytree(tiny_parents[0], parent)
    inside = tmp_path / "holder"
    inside.mkdir()
    store = inside / "p.refs.json"
    assert main(["ingest", str(parent), str(store), "--quiet"]) == 0
    target = inside if where == "store_dir" else parent
    before = sorted(p.name for p in target.iterdir())
    assert main(["export", str(store), str(target), "--overwrite", "--quiet"]) == 2
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == before
