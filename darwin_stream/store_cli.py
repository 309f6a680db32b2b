"""What `darwin-stream export` adds around `store.export_store`: --overwrite, and saying what it did.

Export lays the checkpoint out afresh (Hugging Face's greedy shards of at most --shard-size), so a
parent of 8 small shards comes back as one file: the tensors are bit for bit the parent's, the files
are not. The command says so when it can tell (the store records its source; when that is a local
directory still there, its shards are counted).

--overwrite never removes the old OUT_DIR before the new one is complete: the export is written to
a hidden sibling named after it, then swapped in under OUT_DIR's lock. An OUT_DIR that is, lies in
or holds an input (the store, or the parent shards a reference store reads) is refused first
(`outputs.check_not_input`), so --overwrite cannot delete what it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from darwin_stream import outputs
from darwin_stream.errors import StoreError
from darwin_stream.plan import human_bytes as human


def _is_local(spec: str) -> bool:
    return "://" not in spec


def source_shards(meta: dict[str, Any]) -> int | None:
    """How many safetensors files the store's parent had, when it is a local directory still there."""
    source = str(meta.get("source") or "")
    if not source or not _is_local(source) or not Path(source).is_dir():
        return None
    return sum(1 for _ in Path(source).glob("*.safetensors")) or None


def store_bytes(meta: dict[str, Any]) -> int:
    """The bytes of every tensor in the store: what the export writes, for its progress bar."""
    from darwin_stream import dtypes

    total = 0
    for entry in meta.get("tensors", {}).values():
        n = 1
        for s in entry["shape"]:
            n *= int(s)
        total += n * dtypes.itemsize(entry["dtype"])
    return total


def _size(n: int) -> str:
    return f"{n // 10**9}GB" if n % 10**9 == 0 else human(n)


def reshard_note(meta: dict[str, Any], shards: int, shard_size: int) -> str | None:
    """A line saying that the export's shards differ from the parent's, or None when they do not."""
    before = source_shards(meta)
    if before is None or before == shards:
        return None
    return (f"re-sharded: the parent {meta.get('source')} had {before} safetensors file(s), the export has "
            f"{shards} (shards of at most {_size(shard_size)}; --shard-size sets it); the tensors are bit for bit")


def export(store: str, out_dir: str, *, shard_size: int, overwrite: bool,
           progress: Callable[[int], None] | None, on_start: Callable[[dict], None] | None = None) -> dict:
    """`store.export_store`, with OUT_DIR replaced (under its lock) only once the new one is complete."""
    from darwin_stream import store as zstore  # zarr and fsspec: only for the command that needs them
    from darwin_stream.store.api import open_store, reference_targets, root_meta

    meta = root_meta(open_store(store))
    paths = outputs.output_paths(out_dir)
    if _is_local(store):  # what this export reads: the store, and the shards a reference store points at
        outputs.check_not_input(paths.all(), [store, *reference_targets(store)], what="export output")
    out = paths.final
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not overwrite:
        raise StoreError(f"export: {out_dir} already exists and is not empty (use --overwrite to replace it)")
    if on_start:
        on_start(meta)
    if not occupied:
        report = zstore.export_store(store, out_dir, shard_size=shard_size, progress=progress)
    else:
        fresh = out.parent / f".{out.name}.overwrite"  # named after the output: a re-run reuses the name
        with outputs.lock(paths, out_dir):
            outputs.remove(fresh)
            report = zstore.export_store(store, fresh, shard_size=shard_size, progress=progress)
            outputs.remove(paths.old)
            out.rename(paths.old)
            fresh.rename(out)
            outputs.remove(paths.old)
        report["out_dir"] = str(out_dir)
    note = reshard_note(meta, report["shards"], shard_size)
    report["source_shards"] = source_shards(meta)
    report["notes"] = [note] if note else []
    return report
