"""Reference mode: a zarr v3 view whose chunks are byte ranges of the parent's safetensors shards.

Built on kerchunk's reference format (version 1): a dict `{"version": 1, "refs": {key: value}}` where
a value is either inline metadata (the `zarr.json` documents, as JSON strings) or
`[shard_url, offset, length]`. fsspec's ReferenceFileSystem serves it and zarr's FsspecStore reads
it, so no store class is home-made and nothing is copied.

Chunks are whole rows. A zarr chunk of an uncompressed array must be full size, edge chunks
included, so the chunk row count is the largest divisor of the tensor's rows that fits the chunk
byte budget (layout.row_chunk_dividing). A tensor whose row count is prime gets one-row chunks:
still correct, just more references.

`reference_view(parent)` builds the same thing in memory, per merge, for plain safetensors parents
(the "one read path": every parent is read as zarr arrays). `ingest(..., mode="reference")` saves it
as one JSON file.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import zarr

from darwin_stream.errors import StoreError
from darwin_stream.store import layout
from darwin_stream.store.api import aux_problem, group_from_refs

if TYPE_CHECKING:
    from darwin_stream.sources import Parent, SafetensorsParent

DEFAULT_CHUNK_BYTES = 16 * 2**20
HASH_BLOCK_BYTES = 16 * 2**20


def tensor_checksum(parent: Parent, name: str, block_bytes: int = HASH_BLOCK_BYTES, on_bytes: Callable[[int], None] | None = None) -> str:
    """Checksum of a tensor's raw bytes, streamed by row blocks (never the whole tensor at once)."""
    t = parent.info(name)
    h = layout.new_hash()
    step = max(1, block_bytes // max(t.row_bytes, 1))
    for r0 in range(0, t.rows if t.shape else 1, step):
        r1 = min(r0 + step, t.rows) if t.shape else None
        block = parent.read_rows(name, r0, r1) if t.shape else parent.read_rows(name)
        raw = block.reshape(-1).view(torch.uint8).numpy()
        h.update(raw)
        if on_bytes:
            on_bytes(raw.nbytes)
    return layout.checksum_string(h)


def checksums(parent: Parent, progress: Callable[[int], None] | None = None, workers: int = 4) -> dict[str, str]:
    """Checksums of every tensor, hashed on a few threads (hashlib releases the GIL)."""
    import threading

    lock = threading.Lock()

    def tick(n: int) -> None:
        if progress:
            with lock:  # one caller at a time: progress bars need not be thread-safe
                progress(n)

    names = sorted(parent.tensors, key=lambda n: -parent.tensors[n].nbytes)  # big ones first: balance
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sums = dict(zip(names, pool.map(lambda n: tensor_checksum(parent, n, on_bytes=tick), names), strict=True))
    return {n: sums[n] for n in parent.tensors}


def build_refs(
    parent: SafetensorsParent,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sums: dict[str, str] | None = None,
    aux: dict[str, bytes] | None = None,
) -> dict:
    """The kerchunk reference set of a safetensors parent: metadata inline, chunks as byte ranges.

    Cost is proportional to the number of chunks (a few per tensor), independent of bytes.
    """
    from darwin_stream.sources import SafetensorsParent

    if not isinstance(parent, SafetensorsParent):
        raise StoreError(f"parent {parent.spec}: reference mode needs safetensors shards; use mode='copy' for a store")
    for name in parent.tensors:
        problem = layout.name_problem(name)
        if problem:
            raise StoreError(f"tensor name {name!r} {problem}")
    paths = layout.store_paths(list(parent.tensors))
    # Absolute shard paths: a store used from another directory must read the same parent, not
    # whatever sits at the relative path there.
    files = {t.file: (t.file if parent.fs is not None else os.path.abspath(t.file)) for t in parent.tensors.values()}
    refs: dict[str, object] = {}
    groups: set[str] = {"layers", "other", "aux"}
    index: dict[str, dict] = {}
    for name, t in parent.tensors.items():
        path = paths[name]
        groups.add(path.rsplit("/", 1)[0])
        checksum = sums.get(name) if sums else None
        attrs = {"name": name, "dtype": t.dtype, "checksum": checksum}
        index[name] = {"path": path, "dtype": t.dtype, "shape": list(t.shape), "checksum": checksum}
        if not t.shape:  # a scalar: one chunk, key "c"
            refs[f"{path}/zarr.json"] = json.dumps(layout.array_metadata((), t.dtype, (), attrs))
            refs[f"{path}/c"] = [files[t.file], t.offset, t.nbytes]
            continue
        rows = layout.row_chunk_dividing(t.rows, t.row_bytes, chunk_bytes)
        chunk_shape = (rows, *(max(1, s) for s in t.shape[1:]))
        refs[f"{path}/zarr.json"] = json.dumps(layout.array_metadata(t.shape, t.dtype, chunk_shape, attrs))
        if t.nbytes == 0:
            continue
        tail = "/0" * (len(t.shape) - 1)
        step = rows * t.row_bytes
        for i in range(t.rows // rows):
            refs[f"{path}/c/{i}{tail}"] = [files[t.file], t.offset + i * step, step]
    for g in sorted(groups):
        refs[f"{g}/zarr.json"] = json.dumps(layout.group_metadata())
    aux = parent.read_aux() if aux is None else aux
    for n, b in aux.items():
        if aux_problem(n):
            raise StoreError(f"aux file name {n!r} {aux_problem(n)}")
        refs[f"{layout.AUX_PREFIX}{n}/zarr.json"] = json.dumps(layout.aux_metadata(n, len(b)))
        if b:
            refs[f"{layout.AUX_PREFIX}{n}/c/0"] = "base64:" + base64.b64encode(b).decode()
    root = {
        layout.ROOT_ATTR: {
            "format": layout.FORMAT_VERSION,
            "mode": "reference",
            "source": parent.spec,
            "root": parent.root if parent.fs is not None else os.path.abspath(parent.root),
            "complete": True,
            "checksum_algorithm": layout.CHECKSUM_ALGO,
            "tensors": index,
            "aux": sorted(aux),
        }
    }
    refs["zarr.json"] = json.dumps(layout.group_metadata(root))
    return {"version": 1, "refs": refs}


def reference_view(parent: SafetensorsParent, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> zarr.Group:
    """The parent as a read-only zarr group, built in memory (no file, no checksums, no bytes read)."""
    refs = build_refs(parent, chunk_bytes=chunk_bytes, aux={})
    return group_from_refs(refs, parent.storage_options)


def write_refs(refs: dict, path: str, storage_options: dict | None = None) -> int:
    """Save a reference set as one JSON file at `path` (local or URL); returns its size in bytes.

    The `darwin_stream` key comes first so that `is_store` recognises the file from its first bytes.
    """
    import fsspec

    doc = {layout.ROOT_ATTR: {"format": layout.FORMAT_VERSION}, **refs}
    text = json.dumps(doc, separators=(",", ":")).encode()
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(text)
    return len(text)
