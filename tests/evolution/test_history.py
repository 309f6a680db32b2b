"""The run directory: claimed per fingerprint, appended per candidate, torn lines dropped."""

from __future__ import annotations

import pytest

from darwin_stream.errors import DarwinError
from darwin_stream.evolution.history import Candidate, RunDir

FP = {"template": "t1", "genes": "g1", "search": "s1"}


def _cand(i: int) -> Candidate:
    return Candidate(0, i, [0.1 * i, 0.2], 0.5 + i, {"x": 0.5})


def test_new_run_then_resume_reads_what_was_appended(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.open(FP, resume=False, manifest="m.yaml") == []
    for i in range(3):
        run.append(_cand(i))
    again = RunDir(tmp_path / "r").open(FP, resume=True, manifest="m.yaml")
    assert [c.index for c in again] == [0, 1, 2]
    assert [c.genome for c in again] == [_cand(i).genome for i in range(3)]


def test_a_torn_last_line_is_dropped_and_the_next_append_is_clean(tmp_path):
    run = RunDir(tmp_path / "r")
    run.open(FP, resume=False, manifest="m.yaml")
    run.append(_cand(0))
    with open(run.history_path, "a") as f:
        f.write('{"generation": 0, "index": 1, "geno')  # SIGKILL mid-write
    got = run.read_history()
    assert len(got) == 1
    run.append(_cand(1))
    assert [c.index for c in run.read_history()] == [0, 1]


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path):
    run = RunDir(tmp_path / "r")
    run.open(FP, resume=False, manifest="m.yaml")
    run.append(_cand(0))
    with open(run.history_path, "a") as f:
        f.write("garbage\n")
    run.append(_cand(1))
    with pytest.raises(DarwinError, match="damaged"):
        run.read_history()


def test_resume_after_a_change_names_the_field(tmp_path):
    RunDir(tmp_path / "r").open(FP, resume=False, manifest="m.yaml")
    with pytest.raises(DarwinError, match=r"manifest changed .*\(genes\)"):
        RunDir(tmp_path / "r").open({**FP, "genes": "g2"}, resume=True, manifest="m.yaml")
    with pytest.raises(DarwinError, match="belongs to another manifest"):
        RunDir(tmp_path / "r").open({**FP, "template": "t2"}, resume=False, manifest="other.yaml")


def test_a_run_with_history_needs_resume(tmp_path):
    run = RunDir(tmp_path / "r")
    run.open(FP, resume=False, manifest="m.yaml")
    run.append(_cand(0))
    with pytest.raises(DarwinError, match="--resume"):
        RunDir(tmp_path / "r").open(FP, resume=False, manifest="m.yaml")


def test_a_foreign_directory_is_not_taken(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(DarwinError, match="holds no evolve run"):
        RunDir(tmp_path / "r").open(FP, resume=False, manifest="m.yaml")
