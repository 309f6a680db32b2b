"""Export: a store (either mode) back to a Hugging Face safetensors checkpoint, bit for bit.

Shard headers are computed from the store's index before any data is read, so every tensor is
streamed straight from zarr into its place in the shard file by row blocks; no tensor or shard is
held in memory. Every tensor's checksum is recomputed while it is written and compared with the one
recorded at ingest. The checkpoint is built in `.OUT_DIR.partial` (a stable name, under the
output's lock) and renamed into place on success, so a failed export leaves nothing under OUT_DIR
and a killed one leaves a temporary that the next export removes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable

import numpy as np

from darwin_stream import dtypes, outputs
from darwin_stream.errors import StoreError
from darwin_stream.store import layout
from darwin_stream.store.api import open_store, read_array, read_aux_file, reference_targets, root_meta

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, Hugging Face's default "5GB"
BLOCK_BYTES = 16 * 2**20


def plan_shards(sizes: dict[str, int], shard_size: int) -> list[list[str]]:
    """Tensors in order, split greedily into shards of at most `shard_size` bytes (HF's rule)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file, padded to 8-byte alignment."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def export_store(
    store: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Write the store at `store` as a safetensors checkpoint (shards, index, aux files) in `out_dir`."""
    t0 = time.perf_counter()
    group = open_store(store, storage_options=storage_options)
    meta = root_meta(group)
    if not meta.get("complete"):
        raise StoreError(f"store {store}: ingest did not complete; run ingest again to resume it")
    tensors: dict[str, dict] = meta["tensors"]
    sizes = {n: int(np.prod(e["shape"], dtype=np.int64)) * dtypes.itemsize(e["dtype"]) for n, e in tensors.items()}
    paths = outputs.output_paths(out_dir)
    out = paths.final
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"export: {out} already exists and is not empty")
    for n in tensors:
        problem = layout.name_problem(n)
        if problem:
            raise StoreError(f"store {store}: name {n!r} {problem}")
    shards = plan_shards(sizes, shard_size)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    aux = [n for n in meta.get("aux", []) if n not in files]  # check_root refused weights names already
    inputs = {os.fspath(store), *reference_targets(store, storage_options)}
    outputs.check_not_input(paths.all(), inputs if "://" not in os.fspath(store) else set())
    with outputs.lock(paths, out_dir):
        _write_export(group, store, paths, tensors, sizes, shards, files, aux, progress)
    return {
        "out_dir": str(out),
        "tensors": len(tensors),
        "bytes": sum(sizes.values()),
        "shards": len(files),
        "seconds": time.perf_counter() - t0,
    }


def _write_export(group, store, paths: outputs.OutputPaths, tensors: dict, sizes: dict, shards: list, files: list,
                  aux: list, progress) -> None:  # type: ignore[no-untyped-def]
    """The checkpoint, built in `.OUT.partial` and renamed into place. A run killed here leaves
    only that directory, stamped as ours: the next export (under the same lock) removes it and
    starts again (a stream copy has nothing worth resuming that the page cache does not keep)."""
    out, tmp = paths.final, paths.tmp
    outputs.clear_temporary(tmp)
    tmp.mkdir(parents=True)
    (tmp / outputs.STAMP).write_text("export\n")
    try:
        outputs.check_free_space(tmp, sum(sizes.values()), f"the export ({out.name})")
        for fname, names in zip(files, shards, strict=True):
            entries = [(n, tensors[n]["dtype"], list(tensors[n]["shape"]), sizes[n]) for n in names]
            with open(tmp / fname, "wb") as f:
                f.write(shard_header(entries))
                for n in names:
                    _write_tensor(f, group, n, tensors[n], store, progress)
        if len(shards) > 1:
            weight_map = {n: fname for fname, names in zip(files, shards, strict=True) for n in names}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for n in aux:
            b = read_aux_file(group, n)
            if b is not None:
                (tmp / n).write_bytes(b)
        (tmp / outputs.STAMP).unlink()
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tensor(f, group, name: str, entry: dict, store, progress) -> None:  # type: ignore[no-untyped-def]
    try:
        arr = group[entry["path"]]
    except KeyError:
        raise StoreError(f"store {store}: no array {entry['path']!r} for tensor {name!r}") from None
    shape = tuple(entry["shape"])
    want = entry.get("checksum")
    h = layout.TensorHash(want)
    what = f"store {store}: tensor {name!r}"
    if not shape:
        blocks = [read_array(arr, (), what)]
    else:
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtypes.itemsize(entry["dtype"]))
        chunk_rows = arr.chunks[0] if arr.chunks else 1
        step = max(chunk_rows, (BLOCK_BYTES // row_bytes) // chunk_rows * chunk_rows)
        blocks = (read_array(arr, slice(r0, min(r0 + step, shape[0])), what) for r0 in range(0, shape[0], step))
    for block in blocks:
        if block.dtype != dtypes.to_numpy(entry["dtype"]):
            raise StoreError(f"store {store}: tensor {name!r} is stored as {block.dtype}, expected {entry['dtype']}")
        raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        h.update(raw)
        f.write(raw.data)
        if progress:
            progress(raw.nbytes)
    if want and h.checksum() != want:
        raise StoreError(f"store {store}: tensor {name!r} does not match its checksum (store corrupt or parent changed)")
