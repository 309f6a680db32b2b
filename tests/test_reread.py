"""The re-read spill: remote rows a statistic's passes and the blend read again are fetched once.

Unit tests of `reread.Spill` on a tmp directory, and merges with both parents in moto's S3 server
(marker s3), whose bytes fetched are counted by the parents' transport (transports.RangedReads):
before the spill, a slerp of the tiny parents split by a 192 KiB budget fetched what it needs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from darwin_stream import engine, reread, transports

BUDGET = 192 * 2**10  # the tiny parents' embeddings and MLP matrices (64-80 KiB) span several tasks


def _spill_dirs(root: str | Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(f"{reread.PREFIX}{os.getpid()}-"))


# --- the spill itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_a_kept_tensor_comes_back_bit_for_bit_and_the_last_reader_deletes_it(tmp_path, dtype):
    s = reread.Spill(str(tmp_path), limit_bytes=2**20)
    t = (torch.randn(33, 7) * 1e3).to(dtype)
    assert s.put(("w", "in0", 0, 33), t, (33, 7))
    assert len(os.listdir(tmp_path)) == 1
    got, meta = s.get(("w", "in0", 0, 33))
    assert meta == (33, 7) and got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    got, _ = s.get(("w", "in0", 0, 33), drop=True)
    assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    assert os.listdir(tmp_path) == [] and s.get(("w", "in0", 0, 33)) is None
    assert s.stats.kept_bytes == t.numel() * t.element_size() and s.stats.reused_bytes == 2 * s.stats.kept_bytes


def test_file_names_are_digests_never_tensor_names(tmp_path):
    s = reread.Spill(str(tmp_path), limit_bytes=2**20)
    assert s.put(("../../etc/passwd", "in0", 0, 1), torch.zeros(4))
    (name,) = os.listdir(tmp_path)
    assert len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def test_the_limit_is_never_passed_and_a_dropped_entry_frees_room(tmp_path):
    s = reread.Spill(str(tmp_path), limit_bytes=1000)
    a, b = torch.zeros(200), torch.zeros(100)  # 800 and 400 bytes
    assert s.put(("a",), a) and not s.put(("b",), b)
    assert s.stats.skipped_bytes == 400 and s.stats.peak_bytes == 800
    assert s.get(("a",), drop=True) is not None
    assert s.put(("b",), b) and s.stats.peak_bytes == 800


def test_a_failed_write_keeps_nothing_and_the_reader_fetches(tmp_path):
    s = reread.Spill(str(tmp_path / "gone"), limit_bytes=2**20)  # a directory that is not there
    assert not s.put(("a",), torch.ones(8))
    assert s.get(("a",)) is None and s.stats.skipped_bytes == 32


def test_a_closed_run_removes_its_directory_and_opens_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s = reread.spill("run-1")
    assert s is not None and reread.spill("run-1") is s
    assert s.put(("a",), torch.ones(8))
    assert _spill_dirs(tmp_path)
    stats = reread.close_run("run-1")
    assert stats["kept"] == 1 and _spill_dirs(tmp_path) == []
    assert reread.spill("run-1") is None  # a task still finishing fetches instead
    assert not s.put(("b",), torch.ones(8)) and _spill_dirs(tmp_path) == []


def test_a_memory_filesystem_is_not_a_spill_root(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(reread, "_fs_type", lambda path: "tmpfs")
    assert reread.spill_root() is None
    monkeypatch.setattr(reread, "_fs_type", lambda path: "tmpfs" if path == str(tmp_path) else "ext4")
    assert reread.spill_root() == "/var/tmp"


def test_local_parents_are_not_remote(tiny_parents):
    from darwin_stream.pool import open_parent

    with open_parent(tiny_parents[0]) as p:
        assert not reread.is_remote(p)


def test_a_local_merge_writes_no_spill(pair, tmp_path, monkeypatch):
    """Local parents re-read from the page cache: the spill is never opened for them."""
    from tests.test_engine import _merge, _plan

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opened = []
    real = reread.spill
    monkeypatch.setattr(reread, "spill", lambda run: opened.append(run) or real(run))
    dirs, shapes = pair
    _merge(_plan(dirs, shapes, "slerp", {"t": 0.4}), tmp_path / "child", budget=40_000)
    assert opened == [] and _spill_dirs(tmp_path) == []


# --- merges of bucket parents --------------------------------------------------------------------


@pytest.fixture
def fetched(monkeypatch):
    """Bytes every RangedReads transport in this process returns from now on."""
    count = {"bytes": 0}
    read = transports.RangedReads.read

    def counted(self, file, offset, nbytes):
        buf = read(self, file, offset, nbytes)
        count["bytes"] += len(buf)
        return buf

    monkeypatch.setattr(transports.RangedReads, "read", counted)
    return count


@pytest.fixture
def run_stats(monkeypatch):
    """The engine.RunStats of every run from now on (the spill's stats are not in the report)."""
    out: list[engine.RunStats] = []
    real = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: out.append(real(*a, **k)) or out[-1])
    return out


def _manifests(tmp_path: Path, method: str, remote: tuple[str, str], local: tuple[Path, Path]) -> tuple[Path, Path]:
    params = "  density: 0.6\n  weight: 0.5\n" if method == "ties" else "  t: 0.3\n"
    text = (f"merge_method: {method}\nbase_model: {{a}}\nmodels:\n  - model: {{a}}\n  - model: {{b}}\n"
            f"parameters:\n{params}dtype: bfloat16\n")
    r, lo = tmp_path / f"{method}-remote.yaml", tmp_path / f"{method}-local.yaml"
    r.write_text(text.format(a=remote[0], b=remote[1]))
    lo.write_text(text.format(a=local[0], b=local[1]))
    return r, lo


@pytest.mark.s3
@pytest.mark.parametrize("method", ["slerp", "ties"])  # one pass; three (a radix select)
def test_a_statistic_merge_of_bucket_parents_fetches_each_byte_once(method, s3_server, tiny_parents, tmp_path,
                                                                     monkeypatch, fetched, run_stats):
    from darwin_stream import merge
    from tests.helpers import read_all
    from tests.test_object_sink import put_parents

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    remote, local = _manifests(tmp_path, method, put_parents(s3_server, tiny_parents, f"reread-{method}"),
                               tiny_parents)
    a = merge(remote, tmp_path / "from-s3", memory_budget=BUDGET, storage_options=s3_server.opts)
    got_bytes = fetched["bytes"]
    b = merge(local, tmp_path / "from-disk", memory_budget=BUDGET)
    assert a.bytes_read == b.bytes_read > 0
    # The headers and configs are the rest: ~2% of these tiny parents.
    assert got_bytes <= 1.05 * a.bytes_read, got_bytes / a.bytes_read
    spill = run_stats[0].spill
    assert spill["kept"] > 0 and spill["reused_bytes"] >= spill["kept_bytes"] > 0  # tensors were split
    got, expected = read_all(a.out), read_all(b.out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name].view(torch.uint8), expected[name].view(torch.uint8)), name
    assert _spill_dirs(tmp_path) == []


@pytest.mark.s3
def test_a_failed_merge_removes_its_spill(s3_server, tiny_parents, tmp_path, monkeypatch):
    from darwin_stream import merge
    from darwin_stream.errors import DarwinError
    from tests.test_object_sink import put_parents

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    remote, _ = _manifests(tmp_path, "slerp", put_parents(s3_server, tiny_parents, "reread-fail"), tiny_parents)
    kept: list[str] = []
    put, blend = reread.Spill.put, engine._write_task

    def spy(self, key, data, meta=()):
        ok = put(self, key, data, meta)
        kept.append(self.directory) if ok else None
        return ok

    def fail_once_kept(task, state, writer, progress):
        if kept:
            raise OSError(28, "injected: no space left")
        return blend(task, state, writer, progress)

    monkeypatch.setattr(reread.Spill, "put", spy)
    monkeypatch.setattr(engine, "_write_task", fail_once_kept)
    with pytest.raises((DarwinError, OSError)):
        merge(remote, tmp_path / "child", memory_budget=BUDGET, storage_options=s3_server.opts)
    assert kept and not os.path.exists(kept[0]) and _spill_dirs(tmp_path) == []


@pytest.mark.s3
def test_a_resumed_merge_keeps_only_the_rows_its_blends_read(s3_server, tiny_parents, tmp_path, monkeypatch,
                                                             run_stats):
    """A chunk written before the interruption is still read by the statistic's partial tasks, but
    no blend reads it again, so it is not kept; the resumed child is the uninterrupted one."""
    from darwin_stream import merge
    from tests.helpers import read_all
    from tests.test_object_sink import put_parents

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    remote, local = _manifests(tmp_path, "slerp", put_parents(s3_server, tiny_parents, "reread-resume"), tiny_parents)
    full = merge(remote, tmp_path / "full", memory_budget=BUDGET, storage_options=s3_server.opts)
    calls = {"n": 0}

    def stop_midway(nbytes):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(remote, tmp_path / "child", memory_budget=BUDGET, storage_options=s3_server.opts,
              progress=stop_midway)
    assert _spill_dirs(tmp_path) == []
    report = merge(remote, tmp_path / "child", memory_budget=BUDGET, storage_options=s3_server.opts)
    assert report.resumed_chunks > 0
    whole, resumed = run_stats[0].spill, run_stats[1].spill  # the interrupted run raised: no stats
    assert resumed["kept_bytes"] == resumed["reused_bytes"] and 0 < resumed["kept_bytes"] < whole["kept_bytes"]
    expected = read_all(merge(local, tmp_path / "from-disk", memory_budget=BUDGET).out)
    got, uninterrupted = read_all(report.out), read_all(full.out)
    for name in expected:
        assert torch.equal(got[name].view(torch.uint8), expected[name].view(torch.uint8)), name
        assert torch.equal(uninterrupted[name].view(torch.uint8), expected[name].view(torch.uint8)), name
    assert _spill_dirs(tmp_path) == []


def test_the_spill_of_a_killed_run_is_removed_by_the_next_one(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{reread.PREFIX}{int(gone.stdout)}-abc"
    alive = tmp_path / f"{reread.PREFIX}{os.getppid()}-abc"  # a live process (pytest's parent)
    other = tmp_path / "darwin-stream-something-else"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "f").write_bytes(b"x")
    s = reread.spill("run-sweep")
    try:
        assert s is not None and not dead.exists() and alive.exists() and other.exists()
    finally:
        reread.close_run("run-sweep")
