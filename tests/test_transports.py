"""Byte transports: the memory-map is zero-copy and guards truncation; ranged reads count and check."""

from __future__ import annotations

import mmap

import fsspec
import pytest

from darwin_stream.errors import SourceError
from darwin_stream.transports import MemoryMap, RangedReads


def test_a_local_read_is_a_view_of_the_map(tmp_path):
    f = tmp_path / "s.bin"
    f.write_bytes(bytes(range(256)) * 16)
    t = MemoryMap("p", {str(f): 4096})
    view = t.read(str(f), 10, 20)
    assert isinstance(view.obj, mmap.mmap) and bytes(view) == bytes(range(10, 30))  # no copy
    assert t.read(str(f), 0, 1).obj is view.obj  # one map per shard
    del view
    t.close()


def test_a_shard_shortened_in_use_is_refused_before_it_is_touched(tmp_path):
    f = tmp_path / "s.bin"
    f.write_bytes(b"\0" * 8192)
    t = MemoryMap("p", {str(f): 8192})
    t.read(str(f), 0, 8)
    with open(f, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(SourceError, match="truncated while in use"):
        t.read(str(f), 4096, 8)
    t.close()


def test_ranged_reads_fetch_only_the_range_and_count_it():
    fs = fsspec.filesystem("memory")
    fs.pipe("/tr/s.bin", bytes(range(200)))
    t = RangedReads("p", fs)
    assert bytes(t.read("memory://tr/s.bin", 50, 10)) == bytes(range(50, 60))
    assert t.read("memory://tr/s.bin", 0, 0) == bytearray()
    assert (t.requests, t.bytes_read) == (1, 10)
    with pytest.raises(SourceError, match="truncated shard"):
        t.read("memory://tr/s.bin", 190, 20)
