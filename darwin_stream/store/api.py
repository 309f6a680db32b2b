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

import contextlib
import hashlib
import json
import os
from typing import Any

import fsspec
import numpy as np
import zarr

from darwin_stream import child_marker
from darwin_stream.errors import DependencyError, SourceError, StoreError
from darwin_stream.hints import missing_dependency
from darwin_stream.store import bfloat16
from darwin_stream.store.layout import AUX_PREFIX, CHUNKED_ALGO, ROOT_ATTR, TensorHash, name_problem

bfloat16.register()

_REF_ROOT = "store"
REFS_MARKER = b'{"darwin_stream"'  # a reference store's first bytes (see reference.write_refs)


def _url_to_fs(path: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    opts = storage_options if "://" in path else None  # options are for remote filesystems only
    try:
        return fsspec.core.url_to_fs(path, **(opts or {}))
    except ImportError as e:  # e.g. s3:// without s3fs: say which extra installs it
        hint = missing_dependency(e)
        if hint:
            raise DependencyError(f"store {path}: cannot open ({hint})") from None
        raise StoreError(f"store {path}: cannot open ({e})") from None
    except ValueError as e:
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


def check_ours(path: str, mode: str, storage_options: dict | None = None) -> None:
    """Refuse to ingest into anything that exists and is not a store of darwin-stream's own making.

    Reference mode writes one file: it may replace a reference store (recognised by its first bytes,
    REFS_MARKER), never another file (a parent's shard or config.json given as STORE) and never a
    directory. Copy mode writes into a directory: an empty one, or a copy store (its root zarr.json
    carries ROOT_ATTR), or one holding only the bare zarr.json a killed ingest wrote just before it.
    """
    fs, p = _url_to_fs(path, storage_options)
    try:
        if not fs.exists(p):
            return
        is_dir = fs.isdir(p)
    except OSError:
        return  # cannot look: the write itself will fail with its own error
    if mode == "reference":
        if is_dir:
            raise StoreError(f"store {path}: a reference store is one JSON file, and this is a directory")
        if not _refs_file(path, storage_options):
            raise StoreError(f"store {path}: exists and is not a darwin-stream reference store; refusing to overwrite it")
        return
    if not is_dir:
        raise StoreError(f"store {path}: exists and is a file, not a copy store; refusing to overwrite it")
    if is_store(path, storage_options=storage_options):
        return
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)}
    if not names:
        return
    if names == {"zarr.json"}:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if not json.loads(fs.cat_file(p.rstrip("/") + "/zarr.json")).get("attributes"):
                return
    raise StoreError(f"store {path}: exists and is not a darwin-stream copy store; refusing to write into it")


def zarr_store(path: str, *, read_only: bool, storage_options: dict | None = None) -> zarr.abc.store.Store:
    """The zarr Store of a copy store: LocalStore for plain paths, FsspecStore for URLs."""
    if "://" in path and not path.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(path, read_only=read_only, storage_options=storage_options)
    local = path[len("file://") :] if path.startswith("file://") else path
    return zarr.storage.LocalStore(local, read_only=read_only)


def _load_refs(path: str, storage_options: dict | None) -> dict:
    fs, p = _url_to_fs(path, storage_options)
    try:
        refs = json.loads(fs.cat_file(p))
    except (OSError, ValueError) as e:
        raise StoreError(f"store {path}: unreadable reference file ({e.__class__.__name__})") from None
    if not isinstance(refs, dict) or not isinstance(refs.get("refs"), dict):
        raise StoreError(f"store {path}: not a kerchunk reference set")
    return refs


def _refs_root(refs: dict, path: str) -> dict:
    try:
        meta = json.loads(refs["refs"]["zarr.json"])["attributes"][ROOT_ATTR]
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"store {path}: reference set has no darwin_stream root") from None
    if not isinstance(meta, dict):
        raise StoreError(f"store {path}: reference set has no darwin_stream root")
    return meta


def targets(refs: dict) -> list[str]:
    """The files a reference set points into, in first-use order."""
    seen: dict[str, None] = {}
    for v in refs["refs"].values():
        if isinstance(v, list) and v and isinstance(v[0], str):
            seen.setdefault(v[0])
    return list(seen)


def _is_abs(target: str) -> bool:
    return "://" in target or os.path.isabs(target)


def _lexical(target: str) -> str:
    if target.startswith("file://"):
        target = target[len("file://") :]
    return target.rstrip("/") if "://" in target else os.path.normpath(target)


def _folder(target: str) -> str:
    """The directory (or URL prefix) a shard sits in: shards are files at a checkpoint's top level."""
    return _lexical(target).rsplit("/", 1)[0]


def check_targets(refs: dict, path: str) -> None:
    """Refuse a reference set whose chunks point anywhere but the safetensors shards it was made from.

    A forged store could otherwise serve any readable file's bytes (`/etc/passwd`, a key) as
    weights. Each chunk must be `[shard, offset, length]`, the shard an absolute path or URL
    ending in `.safetensors` inside the recorded `root` (the parent's directory, resolved at
    ingest). Stores from before `root` was recorded are checked against their shards' common
    directory, and a relative shard path (which would resolve against the current directory) is
    refused. Containment is lexical: a hub snapshot's shards are links into its blob directory.
    """
    meta = _refs_root(refs, path)
    for key, v in refs["refs"].items():
        if isinstance(v, list) and not (len(v) == 3 and isinstance(v[0], str) and all(isinstance(x, int) for x in v[1:])):
            raise StoreError(f"store {path}: reference {key!r} is not [shard, offset, length]")
    files = targets(refs)
    for t in files:
        if not _is_abs(t):
            raise StoreError(f"store {path}: reference target {t!r} is a relative path; ingest the parent again")
        if not t.endswith(".safetensors"):
            raise StoreError(f"store {path}: reference target {t!r} is not a safetensors shard")
    if not files:
        return
    root = meta.get("root", _folder(files[0]))
    if not isinstance(root, str) or not _is_abs(root):
        raise StoreError(f"store {path}: recorded parent root {root!r} is not an absolute path or URL")
    for t in files:
        if _folder(t) != _lexical(root):
            raise StoreError(f"store {path}: reference target {t!r} lies outside the parent {root}")


def aux_problem(name: str) -> str | None:
    """Why `name` may not be an inherited file of a store: a path, a weights file, or a hidden file.

    Aux files are written into a child or an export next to the weights, so a forged store must not
    be able to name one `model.safetensors` (replacing the weights) or `../x` (planting a file).
    """
    problem = name_problem(name)
    if problem:
        return problem
    if name.endswith((".safetensors", ".safetensors.index.json")) or name.startswith("."):
        return "is not an inherited file a store may carry (a weights, index or hidden file)"
    return None


def _path_problem(path: object) -> str | None:
    if not isinstance(path, str):
        return "is not a string"
    parts = path.split("/")
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit() and not name_problem(parts[2]):
        return None
    if parts[0] == "other" and len(parts) == 2 and not name_problem(parts[1]):
        return None
    return "is not a layers/<i>/<name> or other/<name> path"


def check_root(meta: object, path: str, *, allow_incomplete: bool = False) -> dict:
    """The root index of a store, refused if incomplete or if any name in it could leave the store."""
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise StoreError(f"store {path}: root attribute {ROOT_ATTR!r} has no tensor index")
    if not meta.get("complete") and not allow_incomplete:
        raise StoreError(f"store {path}: ingest did not complete; run ingest again to resume it")
    for name, entry in meta["tensors"].items():
        problem = name_problem(name) or (None if isinstance(entry, dict) else "has no entry")
        problem = problem or _path_problem(entry.get("path"))
        if problem:
            raise StoreError(f"store {path}: tensor {name!r} {problem}")
    aux = meta.get("aux", [])
    if not isinstance(aux, list):
        raise StoreError(f"store {path}: aux is not a list of file names")
    for n in aux:
        problem = aux_problem(n) if isinstance(n, str) else "is not a string"
        if problem:
            raise StoreError(f"store {path}: aux file {n!r} {problem}")
    return meta


def refuse_unfinished(path: str, storage_options: dict | None = None) -> None:
    """Refuse a URL store that a merge is still writing, or left unfinished (zarr_sink): its
    journal is there and its completion marker is not (child_marker)."""
    fs, p = _url_to_fs(path, storage_options)
    if child_marker.is_incomplete(fs, p):
        raise StoreError(f"store {path}: an incomplete darwin-stream child (its completion marker "
                         f"{child_marker.MARKER} is missing: a merge into it was interrupted or is still running); "
                         "run that merge again to finish it")


def open_store(path: str | os.PathLike, *, storage_options: dict | None = None, allow_incomplete: bool = False) -> zarr.Group:
    """Open a store of either kind read-only, as its root zarr group.

    An incomplete store (an ingest that did not finish) is refused unless `allow_incomplete`, and
    so are forged indexes: names that leave the store, aux files that would replace weights,
    references outside the parent the store was made from (see `check_targets`).
    """
    path = os.fspath(path)
    if "://" in path and not path.startswith("file://"):
        refuse_unfinished(path, storage_options)
    if _refs_file(path, storage_options):
        refs = _load_refs(path, storage_options)
        check_targets(refs, path)
        group = group_from_refs(refs, storage_options)
    elif is_store(path, storage_options=storage_options):
        group = zarr.open_group(zarr_store(path, read_only=True, storage_options=storage_options), mode="r")
    else:
        raise StoreError(f"store {path}: not a darwin-stream store (no reference file or zarr.json with {ROOT_ATTR!r})")
    if ROOT_ATTR not in group.attrs:
        raise StoreError(f"store {path}: not a darwin-stream store (root has no {ROOT_ATTR!r} attribute)")
    check_root(group.attrs[ROOT_ATTR], path, allow_incomplete=allow_incomplete)
    return group


def reference_targets(path: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """The shard files a reference store reads ([] for a copy store): inputs of any run that reads it."""
    path = os.fspath(path)
    if not _refs_file(path, storage_options):
        return []
    return targets(_load_refs(path, storage_options))


def read_aux_file(group: zarr.Group, name: str) -> bytes | None:
    """The bytes of an inherited file (`aux/<name>`, a uint8 array); None when absent."""
    if aux_problem(name):
        raise StoreError(f"aux file {name!r} {aux_problem(name)}")
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


def verify_checksum(data: np.ndarray, want: str | None, what: str) -> None:
    """Compare a whole tensor read from a store with the checksum recorded at ingest.

    Merges read row ranges, and a range is checked only when it is the whole tensor (every tensor a
    merge reads in one task: all of them below the 64 MiB task cap). A lost or rewritten chunk of a
    copy store otherwise reads as zeros or as foreign bytes without an error. `export_store` checks
    every tensor, whatever its size.
    """
    if not want or not isinstance(want, str) or ":" not in want:
        return
    algo = want.split(":", 1)[0]
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if algo == CHUNKED_ALGO:  # a zarr child a merge wrote into a bucket, chunk by chunk
        h = TensorHash(want)
        h.update(raw)
        got = h.checksum()
    elif algo in hashlib.algorithms_available:
        got = f"{algo}:{hashlib.new(algo, raw).hexdigest()}"
    else:
        return
    if got != want:
        raise SourceError(f"{what} does not match its checksum (store corrupt or its parent changed)")


def root_meta(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs[ROOT_ATTR])  # type: ignore[arg-type]
