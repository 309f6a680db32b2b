"""Opening darwin-stream stores, whatever their kind, as read-only zarr groups.

A store is either
  * a reference store: one kerchunk-format JSON file (`{"darwin_stream": ..., "version": 1,
    "refs": {...}}`) whose chunks point into safetensors shards, read through fsspec's
    ReferenceFileSystem and zarr's FsspecStore; or
  * a copy store: a materialised zarr v3 hierarchy in a local directory or behind an fsspec URL.

Both carry the same root attributes (layout.ROOT_ATTR), so everything above this module treats them
alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import zarr

from darwin_stream.errors import StoreError
from darwin_stream.store import bfloat16
from darwin_stream.store.layout import AUX_PREFIX, ROOT_ATTR

bfloat16.register()

_REF_ROOT = "store"
REFS_MARKER = b'{"darwin_stream"'  # a reference store's first bytes (see reference.write_refs)


def _url_to_fs(path: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    opts = storage_options if "://" in path else None  # options are for remote filesystems only
    try:
        return fsspec.core.url_to_fs(path, **(opts or {}))
    except (ValueError, ImportError) as e:
        raise StoreError(f"store {path}: cannot open ({e})") from None


def async_filesystem(protocol: str | None, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """An asynchronous fsspec filesystem for `protocol`, wrapping synchronous ones (local, memory).

    ReferenceFileSystem in asynchronous mode (what zarr's FsspecStore needs) calls its targets'
    async methods directly, so every target has to be async.
    """
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    proto = protocol or "file"
    cls = fsspec.get_filesystem_class(proto)
    if cls.async_impl:
        return fsspec.filesystem(proto, asynchronous=True, **(storage_options or {}))
    return AsyncFileSystemWrapper(fsspec.filesystem(proto, **(storage_options or {})), asynchronous=True)


def group_from_refs(refs: dict, storage_options: dict | None = None) -> zarr.Group:
    """A read-only zarr group over a kerchunk reference set (dict), without writing anything."""
    from fsspec.implementations.reference import ReferenceFileSystem

    protocols: set[str | None] = {None}
    seen_urls: set[str] = set()
    for v in refs["refs"].values():
        if isinstance(v, list) and v[0] not in seen_urls:
            seen_urls.add(v[0])
            protocols.add(fsspec.core.split_protocol(v[0])[0])
    targets = {p: async_filesystem(p, None if p in (None, "file") else storage_options) for p in protocols}
    # zarr's FsspecStore lists "<path>/<prefix>"; with path "" that is "/layers", which the reference
    # filesystem does not know. Serving the keys under a root folder keeps listings working.
    rooted = {"version": 1, "refs": {f"{_REF_ROOT}/{k}": v for k, v in refs["refs"].items()}}
    fs = ReferenceFileSystem(rooted, fs=targets, asynchronous=True)
    store = zarr.storage.FsspecStore(fs=fs, read_only=True, path=_REF_ROOT)
    return zarr.open_group(store, mode="r", zarr_format=3)


def _refs_file(path: str, storage_options: dict | None) -> bool:
    fs, p = _url_to_fs(path, storage_options)
    try:
        if not fs.isfile(p):
            return False
        with fs.open(p, "rb") as f:
            return f.read(len(REFS_MARKER)) == REFS_MARKER
    except OSError:
        return False


def is_store(path: str | os.PathLike, *, storage_options: dict | None = None) -> bool:
    """True when `path` (local path or URL) is a darwin-stream store of either kind."""
    path = os.fspath(path)
    if _refs_file(path, storage_options):
        return True
    fs, p = _url_to_fs(path, storage_options)
    meta = p.rstrip("/") + "/zarr.json"
    try:
        if not fs.isfile(meta):
            return False
        return ROOT_ATTR in json.loads(fs.cat_file(meta)).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def zarr_store(path: str, *, read_only: bool, storage_options: dict | None = None) -> zarr.abc.store.Store:
    """The zarr Store of a copy store: LocalStore for plain paths, FsspecStore for URLs."""
    if "://" in path and not path.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(path, read_only=read_only, storage_options=storage_options)
    local = path[len("file://") :] if path.startswith("file://") else path
    return zarr.storage.LocalStore(local, read_only=read_only)


def open_store(path: str | os.PathLike, *, storage_options: dict | None = None) -> zarr.Group:
    """Open a store of either kind read-only, as its root zarr group."""
    path = os.fspath(path)
    if _refs_file(path, storage_options):
        fs, p = _url_to_fs(path, storage_options)
        try:
            refs = json.loads(fs.cat_file(p))
        except (OSError, ValueError) as e:
            raise StoreError(f"store {path}: unreadable reference file ({e.__class__.__name__})") from None
        if not isinstance(refs, dict) or not isinstance(refs.get("refs"), dict):
            raise StoreError(f"store {path}: not a kerchunk reference set")
        group = group_from_refs(refs, storage_options)
    elif is_store(path, storage_options=storage_options):
        group = zarr.open_group(zarr_store(path, read_only=True, storage_options=storage_options), mode="r")
    else:
        raise StoreError(f"store {path}: not a darwin-stream store (no reference file or zarr.json with {ROOT_ATTR!r})")
    if ROOT_ATTR not in group.attrs:
        raise StoreError(f"store {path}: not a darwin-stream store (root has no {ROOT_ATTR!r} attribute)")
    return group


def read_aux_file(group: zarr.Group, name: str) -> bytes | None:
    """The bytes of an inherited file (`aux/<name>`, a uint8 array); None when absent."""
    try:
        arr = group[f"{AUX_PREFIX}{name}"]
    except KeyError:
        return None
    return np.asarray(arr[:], dtype=np.uint8).tobytes()  # type: ignore[index]


def write_aux_file(group: zarr.Group, name: str, data: bytes) -> None:
    n = len(data)
    arr = group.create_array(
        f"{AUX_PREFIX}{name}", shape=(n,), dtype=np.uint8, chunks=(max(n, 1),), compressors=None,
        fill_value=0, attributes={"file": name}, overwrite=True,
    )
    if n:
        arr[:] = np.frombuffer(data, dtype=np.uint8)


def read_array(arr: zarr.Array, selection: Any, what: str, error: type[Exception] = StoreError) -> np.ndarray:
    """`arr[selection]`, with any failure underneath (a shard gone or shortened behind a reference
    store, an S3 error, a corrupt chunk) reported as one line naming `what`."""
    try:
        return np.asarray(arr[selection])
    except Exception as e:  # fsspec, zarr and the codecs raise many types; all mean "unreadable"
        why = (str(e).strip().splitlines() or [""])[0]
        raise error(f"{what}: cannot read ({type(e).__name__}: {why})") from None


def root_meta(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs[ROOT_ATTR])  # type: ignore[arg-type]
