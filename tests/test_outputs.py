"""Outputs never touch inputs, one writer per output, stable temporaries, room checked up front.

Each test here failed on the code before darwin_stream/outputs.py: `merge --overwrite` onto a
parent deleted it, a second merge into the same OUT deleted the first one's temporary, a symlinked
OUT was replaced by a directory, a killed export leaked a pid-named temporary, a full disk gave
an error without the path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from darwin_stream import api, engine, outputs
from darwin_stream.child_writer import ChildWriter
from darwin_stream.cli import main
from darwin_stream.errors import DarwinError, OutputError
from tests.helpers import TOY_MANIFEST, build_toy, read_all


@pytest.fixture
def toy(tmp_path):
    """Two fresh parents per test (tests here try to destroy them) and a manifest merging them."""
    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.5))
    return a, b, m


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under `dirs`, by path, with the sha256 of its bytes."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fails(capsys, argv, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("darwin-stream: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# --- outputs never touch inputs ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
@pytest.mark.parametrize("where", ["parent dir", "parent shard", "inside parent", "above parent", "link to parent",
                                   "manifest"])
def test_merge_never_writes_over_a_parent(capsys, toy, tmp_path, where, fmt):
    a, b, m = toy
    before = snapshot(a, b)
    text = m.read_text()
    out = {"parent dir": b, "parent shard": b / "model.safetensors", "inside parent": b / "child",
           "above parent": tmp_path, "link to parent": tmp_path / "link", "manifest": m}[where]
    if where == "link to parent":
        out.symlink_to(b)
    fails(capsys, ["merge", str(m), str(out), "--overwrite", "--format", fmt, "--quiet"], "input")
    assert snapshot(a, b) == before, "a parent changed"
    assert m.read_text() == text
    assert not list(tmp_path.glob(".*.partial")) and not list(b.glob(".*"))


def test_plan_locations_cover_a_hub_snapshot_and_its_blobs(tmp_path, monkeypatch):
    """A hub parent's shards are links into blobs/: an output over the blobs is an output over it."""
    from darwin_stream.identity import parent_locations
    from darwin_stream.pool import open_parent

    # The layout of a Hugging Face cache: snapshot files link into the repo's blobs/.
    repo = tmp_path / "hub" / "models--org--toy"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("a" * 40)
    build_toy(blobs, 3)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with open_parent("org/toy") as p:
        where = parent_locations(p)
    with pytest.raises(OutputError, match="contains input"):
        outputs.check_not_input([blobs], where)
    with pytest.raises(OutputError, match="is an input"):
        outputs.check_not_input([blobs / "model.safetensors"], where)
    outputs.check_not_input([tmp_path / "elsewhere"], where)


def test_a_merge_beside_its_parents_is_fine(capsys, toy, tmp_path):
    *_, m = toy
    assert main(["merge", str(m), str(tmp_path / "child"), "--quiet"]) == 0
    assert (tmp_path / "child" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".child*")), "no lock file or temporary is left behind"


# --- one lock per output -----------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from darwin_stream import outputs
    outputs.lock(outputs.output_paths(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(capsys, toy, tmp_path):
    *_, m = toy
    out = tmp_path / "child"
    partial = tmp_path / ".child.partial"  # what the live holder is building
    partial.mkdir()
    (partial / outputs.STAMP).write_text("{}")
    (partial / "model.safetensors").write_bytes(b"half a child")
    holder = _hold(out)
    try:
        fails(capsys, ["merge", str(m), str(out), "--quiet"], f"process {holder.pid}", ".child.lock")
        assert (partial / "model.safetensors").read_bytes() == b"half a child", "the live run's temporary was touched"
        assert not out.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a writer killed with its lock held
        holder.wait()
    assert (tmp_path / ".child.lock").exists(), "the killed holder's lock file stays behind"
    assert main(["merge", str(m), str(out), "--quiet"]) == 0, "a dead holder's lock is taken over"
    assert read_all(out).keys() == {"model.layers.0.mlp.up_proj.weight", "model.norm.weight"}
    assert not (tmp_path / ".child.lock").exists() and not partial.exists()


def test_a_second_ingest_or_export_into_the_same_output_is_refused(toy, tmp_path):
    from darwin_stream.store import export_store, ingest

    a, _, _ = toy
    ingest(a, tmp_path / "s.zarr", mode="copy")
    for out, write in ((tmp_path / "t.zarr", lambda o: ingest(a, o, mode="copy")),
                       (tmp_path / "ref.json", lambda o: ingest(a, o, mode="reference")),
                       (tmp_path / "out", lambda o: export_store(tmp_path / "s.zarr", o))):
        holder = _hold(out)
        try:
            with pytest.raises(OutputError, match=f"being written by process {holder.pid}"):
                write(out)
            assert not out.exists()
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        write(out)  # the dead holder's lock is taken over
        assert out.exists()


def test_a_directory_in_the_temporary_s_place_that_is_not_ours_is_kept(capsys, toy, tmp_path):
    *_, m = toy
    mine = tmp_path / ".child.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    fails(capsys, ["merge", str(m), str(tmp_path / "child"), "--quiet"], "not a darwin-stream temporary")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_symlinked_out_dir_is_followed_not_replaced(toy, tmp_path):
    *_, m = toy
    target = tmp_path / "disk2" / "child"
    target.mkdir(parents=True)
    link = tmp_path / "child"
    link.symlink_to(target)
    api.merge(m, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").is_file()
    api.merge(m, link, overwrite=True)  # and again, replacing the child behind the link
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert not list((tmp_path / "disk2").glob(".child*"))


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from darwin_stream.store import export_store
    export_store(sys.argv[1], sys.argv[2], progress=lambda n: os.kill(os.getpid(), signal.SIGKILL))
""")


def test_a_killed_export_leaves_a_temporary_the_next_export_cleans(toy, tmp_path):
    from darwin_stream.store import ingest

    a, _, _ = toy
    ingest(a, tmp_path / "s.zarr", mode="copy")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(tmp_path / "s.zarr"), str(tmp_path / "out")], env=env)
    assert run.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.glob(".out*"))
    assert ".out.partial" in left, left  # stable name: no pid in it
    from darwin_stream.store import export_store

    export_store(tmp_path / "s.zarr", tmp_path / "out")
    assert not list(tmp_path.glob(".out*")), "the killed run's temporary and lock were cleaned"
    assert read_all(tmp_path / "out").keys() == read_all(a).keys()


# --- full disk ---------------------------------------------------------------------------------


def test_a_child_that_cannot_fit_is_refused_before_anything_is_written(capsys, toy, tmp_path, monkeypatch):
    *_, m = toy
    real = os.statvfs

    def full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 10, *tuple(st)[5:]))

    monkeypatch.setattr(os, "statvfs", full)
    fails(capsys, ["merge", str(m), str(tmp_path / "child"), "--quiet"], "not enough space", str(tmp_path))
    assert not list(tmp_path.glob(".child*")) and not (tmp_path / "child").exists()


def test_a_write_that_fails_names_the_file(toy, tmp_path, monkeypatch):
    *_, m = toy
    plan = api.load_plan(m)
    writer = ChildWriter(tmp_path / "child", plan, shard_size=10**9)

    def enospc(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(DarwinError, match=rf"cannot write {tmp_path}/\.child\.partial/model\.safetensors: No space left"):
        engine.run(plan, writer, budget=2**20)
