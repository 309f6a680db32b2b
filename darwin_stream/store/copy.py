"""Copy mode: a materialised zarr v3 store (local directory or fsspec URL such as s3://bucket/store).

Each tensor is one array chunked by rows up to `chunk_bytes`, optionally zstd-compressed, and grouped
by zarr's sharding codec into shards of up to `shard_bytes`, so a 70B model is a few thousand objects
rather than a hundred thousand. A shard is the unit of writing (a shard is written whole, so nothing
is read back and rewritten) and of resuming.

Resume: after a shard is written, the CRC-32 of its source bytes is recorded in the array's
attributes (`done`). A re-run reads the parent again (it has to, for the tensor checksum), compares
each shard's digest with the recorded one, and skips writing shards that match. An array whose
`complete` attribute is set, with the same shape, dtype and chunking, is skipped outright, but only
when it was completed from a source of the same identity (its `source_identity` attribute: header
bytes, size and mtime of local shards, ETags of URLs, checksums of stores); from any other source it
is checked shard by shard. The root's `complete` flag is set last, so an interrupted ingest is visible as such
and export and merge refuse it.

Writing is pipelined: the next shard is read and hashed while a writer thread stores the previous
one. Memory: two shards of rows at a time (plus the encoded copy being written), never a whole
tensor larger than that.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from darwin_stream import dtypes
from darwin_stream.errors import StoreError
from darwin_stream.store import layout
from darwin_stream.store.api import aux_problem, write_aux_file, zarr_store

if TYPE_CHECKING:
    from darwin_stream.sources import Parent

DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_SHARD_BYTES = 128 * 2**20


def to_numpy(t: torch.Tensor, code: str) -> np.ndarray:
    """Tensor -> numpy array of the same dtype (bf16 as ml_dtypes.bfloat16), sharing memory."""
    t = t.contiguous()
    if code == "BF16":
        return t.view(torch.int16).numpy().view(dtypes.to_numpy(code))
    return t.numpy()


def _geometry(t: Any, chunk_bytes: int, shard_bytes: int) -> tuple[int, int]:
    """(chunk rows, shard rows): chunks within the byte budget, shards a whole number of chunks."""
    if not t.shape:
        return 1, 1
    rows = max(t.rows, 1)
    cr = min(rows, max(1, chunk_bytes // max(t.row_bytes, 1)))
    sr = cr * max(1, shard_bytes // max(cr * t.row_bytes, 1))
    return cr, min(sr, math.ceil(rows / cr) * cr)


def _open_or_create(root: zarr.Group, path: str, name: str, t: Any, cr: int, sr: int, compressor: str | None) -> zarr.Array:
    """The tensor's array: reused when it was started with the same geometry, else (re)created."""
    want = {"chunk_rows": cr, "shard_rows": sr, "compressor": compressor}
    try:
        arr = root[path]
        if (
            isinstance(arr, zarr.Array)
            and arr.attrs.get("name") == name
            and arr.attrs.get("layout") == want
            and tuple(arr.shape) == t.shape
            and arr.attrs.get("dtype") == t.dtype
        ):
            return arr
    except KeyError:
        pass
    rest = tuple(max(1, s) for s in t.shape[1:])
    chunks = (cr, *rest) if t.shape else ()
    shards = (sr, *rest) if t.shape and sr > cr else None
    compressors = zarr.codecs.ZstdCodec(level=3) if compressor == "zstd" else None
    return root.create_array(
        path,
        shape=t.shape,
        dtype=dtypes.to_numpy(t.dtype),
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        fill_value=layout.fill_value(t.dtype),
        attributes={"name": name, "dtype": t.dtype, "checksum": None, "complete": False, "layout": want, "done": {}},
        overwrite=True,
    )


def _write_shard(arr: zarr.Array, r0: int, r1: int, data: np.ndarray, s: int, digest: str, done: dict[str, str]) -> None:
    """Write one shard whole, then record it: a shard is in `done` only once it is on the store."""
    if arr.shape:
        arr[r0:r1] = data
    else:
        arr[()] = data
    done[str(s)] = digest
    arr.update_attributes({"done": dict(done)})


def copy_ingest(
    parent: Parent,
    store: str,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compressor: str | None = None,
    progress: Callable[[int], None] | None = None,
    storage_options: dict | None = None,
    source_identity: str | None = None,
) -> dict:
    """Copy every tensor of `parent` into a zarr v3 store at `store`, resuming a previous run.

    `source_identity` (identity.parent_identity) decides what a re-run may trust: an array already
    complete is skipped outright only when it was completed from a source of the same identity
    (recorded per array: an interrupted re-ingest of another source leaves arrays of both).
    Otherwise every array is checked shard by shard against the new source and rewritten where it
    differs, so a second parent of the same geometry never inherits the first one's bytes.
    """
    if compressor not in (None, "zstd"):
        raise StoreError(f"compressor: expected None or 'zstd', got {compressor!r}")
    for name in parent.tensors:
        problem = layout.name_problem(name)
        if problem:
            raise StoreError(f"tensor name {name!r} {problem}")
    t0 = time.perf_counter()
    zstore = zarr_store(store, read_only=False, storage_options=storage_options)
    try:
        root = zarr.open_group(zstore, mode="a", zarr_format=3)
    except Exception as e:  # zarr raises several types for "something else is there"
        raise StoreError(f"store {store}: cannot open for writing ({e.__class__.__name__}: {e})") from None
    old = root.attrs.get(layout.ROOT_ATTR)
    if old is not None and old.get("mode") != "copy":
        raise StoreError(f"store {store}: is a {old.get('mode')} store, not a copy store")
    paths = layout.store_paths(list(parent.tensors))
    meta: dict[str, Any] = {
        "format": layout.FORMAT_VERSION,
        "mode": "copy",
        "source": parent.spec,
        "complete": False,
        "checksum_algorithm": layout.CHECKSUM_ALGO,
        "tensors": {n: {"path": paths[n], "dtype": t.dtype, "shape": list(t.shape), "checksum": None} for n, t in parent.tensors.items()},
        "aux": [],
        "chunk_bytes": chunk_bytes,
        "shard_bytes": shard_bytes,
        "compressor": compressor,
        "source_identity": source_identity,
    }
    root.attrs[layout.ROOT_ATTR] = meta  # incomplete, and naming the new source, until the last line
    for g in ("layers", "other", "aux"):
        root.require_group(g)

    written = skipped = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="darwin-copy") as writer:
        for name, t in parent.tensors.items():
            cr, sr = _geometry(t, chunk_bytes, shard_bytes)
            arr = _open_or_create(root, paths[name], name, t, cr, sr, compressor)
            trusted = source_identity is not None and arr.attrs.get("source_identity") == source_identity
            if trusted and arr.attrs.get("complete") and arr.attrs.get("checksum"):
                meta["tensors"][name]["checksum"] = arr.attrs["checksum"]
                skipped += t.nbytes
                if progress:
                    progress(t.nbytes)
                continue
            done: dict[str, str] = dict(arr.attrs.get("done") or {})  # type: ignore[arg-type]
            h = layout.new_hash()
            n_shards = math.ceil(t.rows / sr) if t.shape else 1
            pending: Future | None = None
            for s in range(n_shards if t.nbytes else 0):
                r0, r1 = s * sr, min((s + 1) * sr, t.rows)
                block = parent.read_rows(name, r0, r1) if t.shape else parent.read_rows(name)
                data = to_numpy(block, t.dtype)
                raw = data.reshape(-1).view(np.uint8)
                h.update(raw)
                d = f"crc32:{zlib.crc32(raw):08x}"
                if done.get(str(s)) == d:
                    skipped += raw.nbytes
                else:
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(_write_shard, arr, r0, r1, data, s, d, done)
                    written += raw.nbytes
                if progress:
                    progress(raw.nbytes)
            if pending is not None:
                pending.result()
            checksum = layout.checksum_string(h)
            arr.update_attributes({"checksum": checksum, "complete": True, "done": done, "source_identity": source_identity})
            meta["tensors"][name]["checksum"] = checksum

    aux = parent.read_aux()
    for n, b in aux.items():
        if aux_problem(n):
            raise StoreError(f"aux file name {n!r} {aux_problem(n)}")
        write_aux_file(root, n, b)
    meta["aux"] = sorted(aux)
    meta["complete"] = True
    root.attrs[layout.ROOT_ATTR] = meta
    return {
        "mode": "copy",
        "store": store,
        "source": parent.spec,
        "tensors": len(parent.tensors),
        "bytes": sum(t.nbytes for t in parent.tensors.values()),
        "bytes_written": written,
        "bytes_skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }
