"""The zarr layer store: parents as zarr v3 groups, one group per decoder layer.

    ingest(source, store, mode="reference"|"copy")  a parent -> a store (reference JSON or copy)
    export_store(store, out_dir)                    a store -> a safetensors checkpoint, bit-exact
    open_store(path) / is_store(path)               a store of either kind as a read-only zarr group
    reference_view(parent)                          a safetensors parent as zarr, in memory

Importing this package registers the zarr-extensions `bfloat16` data type with zarr.
See docs/store.md for the layout.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from darwin_stream import identity, outputs
from darwin_stream.errors import StoreError
from darwin_stream.sources import Parent, SafetensorsParent
from darwin_stream.store.api import check_ours, is_store, open_store
from darwin_stream.store.copy import DEFAULT_SHARD_BYTES, copy_ingest
from darwin_stream.store.export import DEFAULT_SHARD_SIZE, export_store
from darwin_stream.store.reference import (
    DEFAULT_CHUNK_BYTES,
    build_refs,
    checksums,
    reference_view,
    write_refs,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_SIZE",
    "export_store",
    "ingest",
    "is_store",
    "open_store",
    "reference_view",
]


def ingest(
    source: str | os.PathLike | Parent,
    store: str | os.PathLike,
    mode: str | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compressor: str | None = None,
    checksum: bool = True,
    progress: Callable[[int], None] | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Turn a parent into a darwin-stream store and return a report (mode, tensors, bytes, seconds).

    mode None picks "reference" for local safetensors parents (nothing copied) and "copy" for
    everything else (URLs, stores). `progress(nbytes)` is called with the bytes just processed
    (hashed in reference mode, copied or verified in copy mode), like the engine's callback; they
    add up to the source's `sum(t.nbytes for t in parent.tensors.values())`. `checksum=False` skips hashing
    in reference mode, making its cost independent of the bytes (the checksums are then null). A
    source given as a spec is opened here and closed at the end; the CLI passes the pool's parent.
    """
    if isinstance(source, Parent):
        return _ingest(source, os.fspath(store), mode, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
                       compressor=compressor, checksum=checksum, progress=progress, storage_options=storage_options)
    from darwin_stream.store.parent import open_source

    with open_source(source, storage_options=storage_options) as parent:
        return _ingest(parent, os.fspath(store), mode, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
                       compressor=compressor, checksum=checksum, progress=progress, storage_options=storage_options)


def _ingest(parent: Parent, store: str, mode: str | None, *, chunk_bytes: int, shard_bytes: int,
            compressor: str | None, checksum: bool, progress: Callable[[int], None] | None,
            storage_options: dict | None) -> dict:
    if mode is None:
        mode = "reference" if isinstance(parent, SafetensorsParent) and parent.is_local else "copy"
    if mode not in ("reference", "copy"):
        raise StoreError(f"mode: expected 'reference' or 'copy', got {mode!r}")
    if mode == "reference" and compressor is not None:
        raise StoreError("compressor: reference mode points at the shards' raw bytes and cannot compress; use mode='copy'")
    local = "://" not in store or store.startswith("file://")
    paths = outputs.output_paths(store) if local else None
    writes = paths.all() if paths else [store]
    outputs.check_not_input(writes, identity.parent_locations(parent), what="store")
    check_ours(store, mode, storage_options)
    # A URL store has no local lock file: one writer per remote store is the caller's business.
    with outputs.lock(paths, store) if paths else contextlib.nullcontext():
        if mode == "copy":
            if paths and not paths.final.exists() and compressor is None:
                need = sum(t.nbytes for t in parent.tensors.values())
                outputs.check_free_space(paths.final.parent, need, f"store {store}")
            return copy_ingest(
                parent,
                store,
                chunk_bytes=chunk_bytes,
                shard_bytes=shard_bytes,
                compressor=compressor,
                progress=progress,
                storage_options=storage_options,
                source_identity=identity.parent_identity(parent),
            )
        return _reference_ingest(parent, store, paths, chunk_bytes=chunk_bytes, checksum=checksum, progress=progress,
                                 storage_options=storage_options)


def _reference_ingest(parent: Parent, store: str, paths: outputs.OutputPaths | None, *, chunk_bytes: int,
                      checksum: bool, progress: Callable[[int], None] | None, storage_options: dict | None) -> dict:
    """Reference mode: one JSON file, written beside the store and renamed over it when complete."""
    t0 = time.perf_counter()
    sums = checksums(parent, progress) if checksum else None
    refs = build_refs(parent, chunk_bytes=chunk_bytes, sums=sums)  # type: ignore[arg-type]
    if paths is None:
        size = write_refs(refs, store, storage_options)  # an object store's put is atomic
    else:
        size = write_refs(refs, str(paths.tmp))
        os.replace(paths.tmp, paths.final)
    return {
        "mode": "reference",
        "store": store,
        "source": parent.spec,
        "tensors": len(parent.tensors),
        "bytes": sum(t.nbytes for t in parent.tensors.values()),
        "references": sum(1 for v in refs["refs"].values() if isinstance(v, list)),
        "store_bytes": size,
        "seconds": time.perf_counter() - t0,
    }
