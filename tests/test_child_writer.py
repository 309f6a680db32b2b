"""The child writer: spans (whole pages by O_DIRECT, partial pages through the cache, neighbours
intact) and resume by content (a partial child is reused only for the same tensors, layout and parents)."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from darwin_stream import child_writer, engine
from darwin_stream.child_writer import BACKGROUND_MIN, PAGE, ChildWriter, Span, staging_buffer
from darwin_stream.errors import StorageError
from darwin_stream.plan import Plan, SourceRef, TensorPlan

SENTINEL = 0xA5


def _file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "shard"
    path.write_bytes(bytes([SENTINEL]) * size)
    return path


def _direct_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


def _write_span(path: Path, lo: int, data: bytes, pieces: list[int], *, direct: bool, buffer_bytes: int) -> None:
    with Span(path, lo, lo + len(data), direct=direct, buffer=staging_buffer(buffer_bytes)) as span:
        pos = 0
        for n in pieces:
            n = min(n, len(data) - pos)
            span.reserve(n)[:] = data[pos : pos + n]
            pos += n
        span.write(data[pos:])
        assert span.written == len(data)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(("lo", "hi"), [(5, 70_001), (0, 3 * PAGE), (PAGE - 1, PAGE + 1), (10, 20), (PAGE, 9 * PAGE + 7)])
def test_a_span_writes_its_bytes_and_nothing_else(tmp_path, direct, lo, hi):
    path = _file(tmp_path, 12 * PAGE + 70_000)
    rng = np.random.default_rng(lo + hi)
    data = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    # Pieces of odd sizes through a two-page buffer: flushes mid-page, and one piece larger than the buffer.
    _write_span(path, lo, data, [3, 4096, 1, 3 * PAGE + 5], direct=direct, buffer_bytes=2 * PAGE)
    got = path.read_bytes()
    assert got[lo:hi] == data
    assert set(got[:lo]) <= {SENTINEL} and set(got[hi:]) == {SENTINEL}


@pytest.mark.parametrize(("lo", "flushes"), [(5, 3), (PAGE, 4), (0, 2)])
def test_spans_written_in_the_background_keep_every_byte(tmp_path, lo, flushes):
    """Buffers of 1 MiB or more go out on the thread's flusher while the next one fills; two spans in
    a row reuse the caller's buffer, which must not still be the flusher's spare (an odd count of
    flushes leaves the caller's buffer in the flusher's hands)."""
    n = flushes * BACKGROUND_MIN + 12_345
    path = _file(tmp_path, lo + 2 * n + PAGE)
    rng = np.random.default_rng(lo)
    data = rng.integers(0, 256, 2 * n, dtype=np.uint8).tobytes()
    buf = staging_buffer(BACKGROUND_MIN)
    direct = _direct_supported(path)
    for k in range(2):
        with Span(path, lo + k * n, lo + (k + 1) * n, direct=direct, buffer=buf) as span:
            assert span.flusher is not None
            span.write(data[k * n : (k + 1) * n])
    got = path.read_bytes()
    assert got[lo : lo + 2 * n] == data
    assert set(got[:lo]) <= {SENTINEL} and set(got[lo + 2 * n :]) == {SENTINEL}
    child_writer.release_flushers()


def test_whole_pages_go_out_on_the_flusher_thread_and_the_span_waits_for_them(tmp_path, monkeypatch):
    """The worker does not wait for the disk mid-span (it did: every write was a pwrite on its own
    thread), and a span ends only once its bytes are written, so that its chunk is journalled done
    only then. The first write is held until the worker has handed on a buffer and filled the next:
    written on the worker's own thread, it would wait for that in vain."""
    path = _file(tmp_path, 4 * BACKGROUND_MIN)
    carried_on = threading.Event()
    first: list[tuple[str, bool]] = []
    real = os.pwrite

    def held(fd, data, offset):
        if not first:
            first.append((threading.current_thread().name, carried_on.wait(timeout=10)))
        return real(fd, data, offset)

    monkeypatch.setattr(child_writer.os, "pwrite", held)
    data = bytes(range(256)) * (3 * BACKGROUND_MIN // 256)
    with Span(path, 0, len(data), direct=False, buffer=staging_buffer(BACKGROUND_MIN)) as span:
        span.write(data[: 2 * BACKGROUND_MIN])  # one buffer handed on, the second filled
        carried_on.set()
        span.write(data[2 * BACKGROUND_MIN :])
    name, waited_for_the_worker = first[0]
    assert name.startswith("darwin-flush") and waited_for_the_worker
    assert path.read_bytes()[: len(data)] == data  # everything written once the span is closed
    child_writer.release_flushers()


def test_a_failed_background_write_fails_the_span_naming_the_file(tmp_path, monkeypatch):
    path = _file(tmp_path, 4 * BACKGROUND_MIN)

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(child_writer.os, "pwrite", full)
    with (pytest.raises(StorageError, match=r"cannot write .*shard: No space left"),
          Span(path, 0, 3 * BACKGROUND_MIN, direct=False, buffer=staging_buffer(BACKGROUND_MIN)) as span):
        span.write(b"x" * (3 * BACKGROUND_MIN))
    child_writer.release_flushers()


def test_neighbouring_spans_on_threads_share_their_edge_pages(tmp_path):
    """Spans that meet inside a page, written at once: the shared pages keep both sides' bytes."""
    bounds = [0, 100, 5000, 5001, 13_000, 4 * PAGE, 40_000, 40_003, 77_777]
    path = _file(tmp_path, bounds[-1])
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, bounds[-1], dtype=np.uint8).tobytes()
    direct = _direct_supported(path)

    def one(lo: int, hi: int) -> None:
        _write_span(path, lo, data[lo:hi], [1, 999], direct=direct, buffer_bytes=2 * PAGE)

    threads = [threading.Thread(target=one, args=(lo, hi)) for lo, hi in itertools.pairwise(bounds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() == data


def test_a_span_refuses_to_write_past_its_tensor(tmp_path):
    path = _file(tmp_path, 4 * PAGE)
    with Span(path, 10, 20, direct=False) as span, pytest.raises(AssertionError, match="past the end"):
        span.reserve(11)


def test_a_failed_task_writes_nothing_it_had_staged(tmp_path):
    path = _file(tmp_path, 4 * PAGE)
    with pytest.raises(RuntimeError), Span(path, 10, 2000, direct=False) as span:
        span.reserve(100)[:] = b"x" * 100
        raise RuntimeError("blend failed")
    assert set(path.read_bytes()) == {SENTINEL}


def _linear_plan(dirs, shapes) -> Plan:
    tensors = [TensorPlan(name=n, shape=s, dtype="BF16", method="linear",
                          models=(SourceRef("a", n), SourceRef("b", n)),
                          model_params=({"weight": 0.6}, {"weight": 0.4})) for n, s in shapes.items()]
    return Plan(parents={"a": dirs[0], "b": dirs[1]}, tensors=tensors, config_from="a", tokenizer_from="a")


def _merge(plan: Plan, out: Path, direct: bool) -> tuple[dict, bool]:
    writer = ChildWriter(out, plan, shard_size=60_000, direct=direct)
    engine.run(plan, writer, budget=40_000)
    final = writer.finish()
    got = {}
    for f in sorted(final.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got, writer.direct


def test_direct_and_page_cache_children_are_identical(pair, tmp_path):
    dirs, shapes = pair
    plan = _linear_plan(dirs, shapes)
    direct, used_direct = _merge(plan, tmp_path / "direct", direct=True)
    cached, used_cache = _merge(plan, tmp_path / "cached", direct=False)
    assert used_direct == _direct_supported(tmp_path / "direct" / "model-00001-of-00002.safetensors")
    assert not used_cache
    assert direct.keys() == cached.keys() == shapes.keys()
    for name in shapes:
        assert torch.equal(direct[name].view(torch.int16), cached[name].view(torch.int16)), name


def test_a_filesystem_without_direct_io_falls_back_to_the_page_cache(pair, tmp_path, monkeypatch):
    """Some filesystems refuse O_DIRECT when opening, others only when writing: both still give the child."""
    import errno

    dirs, shapes = pair
    plan = _linear_plan(dirs, shapes)
    expected, _ = _merge(plan, tmp_path / "ref", direct=False)
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    got, used_direct = _merge(plan, tmp_path / "refused-at-open", direct=True)
    assert not used_direct
    for name in shapes:
        assert torch.equal(got[name].view(torch.int16), expected[name].view(torch.int16)), name

    def remembering_open(path, flags, *args):
        # Opens without O_DIRECT whatever this filesystem supports; its writes are refused instead.
        fd = real_open(path, flags & ~os.O_DIRECT, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        else:
            direct_fds.discard(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "unaligned direct write")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", remembering_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    got, used_direct = _merge(plan, tmp_path / "refused-at-write", direct=True)
    assert used_direct and direct_fds
    for name in shapes:
        assert torch.equal(got[name].view(torch.int16), expected[name].view(torch.int16)), name


# --- resume by content -------------------------------------------------------------------------


def _kill_after(calls: int):
    seen = {"n": 0}

    def progress(nbytes: int) -> None:
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt

    return progress


def _interrupted(manifest, out: Path, **kwargs) -> None:
    from darwin_stream import api

    with pytest.raises(KeyboardInterrupt):
        api.merge(manifest, out, progress=_kill_after(6), **kwargs)
    assert not out.exists()
    assert (out.parent / f".{out.name}.partial" / ".darwin-journal").read_text().count("\n") >= 5


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


def test_a_parent_changed_in_place_invalidates_the_partial_child(tmp_path):
    from darwin_stream import api
    from tests.helpers import TOY_MANIFEST, build_toy, read_all

    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.5))
    _interrupted(m, tmp_path / "child", memory_budget=40_000)
    engine.release_parents()  # a fresh process would open the changed parent afresh
    build_toy(tmp_path / "b2", 7)
    (tmp_path / "b2" / "model.safetensors").replace(b / "model.safetensors")  # same shapes, new values
    report = api.merge(m, tmp_path / "child", memory_budget=40_000)
    assert report.resumed_chunks == 0
    assert any("changed since it was made" in n and str(b) in n for n in report.notes), report.notes
    expected = api.merge(m, tmp_path / "fresh", memory_budget=40_000)
    assert expected.resumed_chunks == 0
    _same(read_all(tmp_path / "child"), read_all(tmp_path / "fresh"))


def test_a_comment_or_a_run_option_does_not_invalidate_the_partial_child(tmp_path):
    """The manifest's text, the memory budget (hence the chunking) and direct_io change no byte."""
    from darwin_stream import api
    from tests.helpers import TOY_MANIFEST, build_toy, read_all

    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.5))
    api.merge(m, tmp_path / "fresh")
    _interrupted(m, tmp_path / "child", memory_budget=40_000)
    m.write_text(m.read_text().replace("# a comment", "# another comment\n# and one more"))
    report = api.merge(m, tmp_path / "child", memory_budget=100_000, direct_io=False)
    assert report.resumed_chunks >= 5 and not any("discarded" in n for n in report.notes)
    _same(read_all(tmp_path / "child"), read_all(tmp_path / "fresh"))


@pytest.mark.parametrize(("first", "second"), [(40_000, 2**30), (100_000, 40_000)])
def test_resuming_under_another_budget_gives_the_same_child(tmp_path, first, second):
    """The journal records each chunk's extent: another budget chunks the tensor differently."""
    from darwin_stream import api
    from tests.helpers import TOY_MANIFEST, build_toy, read_all

    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.3))
    api.merge(m, tmp_path / "fresh")
    _interrupted(m, tmp_path / "child", memory_budget=first)
    api.merge(m, tmp_path / "child", memory_budget=second)
    _same(read_all(tmp_path / "child"), read_all(tmp_path / "fresh"))


def test_resuming_with_another_shard_size_restarts(tmp_path):
    from darwin_stream import api
    from tests.helpers import TOY_MANIFEST, build_toy, read_all

    a, b = build_toy(tmp_path / "a", 1), build_toy(tmp_path / "b", 2)
    m = tmp_path / "m.yaml"
    m.write_text(TOY_MANIFEST.format(a=a, b=b, t=0.3))
    api.merge(m, tmp_path / "fresh")
    _interrupted(m, tmp_path / "child", memory_budget=40_000, shard_size=60_000)
    report = api.merge(m, tmp_path / "child", memory_budget=40_000)
    assert report.resumed_chunks == 0 and any("shard layout" in n for n in report.notes), report.notes
    assert sorted(p.name for p in (tmp_path / "child").glob("*.safetensors")) == ["model.safetensors"]
    _same(read_all(tmp_path / "child"), read_all(tmp_path / "fresh"))
