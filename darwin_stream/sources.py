"""Parents: where a checkpoint's tensors live and how to read rows of them without loading shards.

A parent is a local directory, a Hugging Face repo id (resolved through huggingface_hub, offline from
its cache when HF_HUB_OFFLINE=1), an fsspec URL (file://, s3://, memory://...), or a darwin-stream
zarr store (reference JSON or materialised copy). Whatever its form, it is opened as a `Parent`: a
read-only index of `TensorInfo`, rows read on demand, plus the files a child inherits (config.json,
tokenizer, generation_config).

Shards are never read whole: local shards are memory-mapped, remote shards are read by ranged reads,
stores are read chunk by chunk. Nothing is ever unpickled: a checkpoint that holds only
.bin/.pt/.pth files is refused, naming the file. Every failure is a one-line `SourceError`.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from darwin_stream import dtypes
from darwin_stream.errors import DarwinError, SourceError

if TYPE_CHECKING:
    import fsspec
    import zarr

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own reader refuses larger headers too
INDEX_FILE = "model.safetensors.index.json"
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: a contiguous, row-major range of one file.

    For a parent that is a zarr store, `file` is the store and `offset` is 0: its bytes are read
    through the store's arrays, not by offset.
    """

    name: str
    dtype: str  # safetensors code: BF16, F16, F32, ...
    shape: tuple[int, ...]
    file: str  # local path or URL of the shard
    offset: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_safetensors_header(path: str, data: bytes | memoryview, file_size: int) -> dict[str, TensorInfo]:
    """Parse and check a shard header; `data` holds at least the first 8 + header bytes.

    Every offset is checked against the file size so that a truncated shard fails here, by name,
    rather than later as a short read. Tensor names are checked too: a name that could escape a
    zarr store (`../x`) is refused when the parent is opened, not halfway through an ingest.
    """
    from darwin_stream.store.layout import name_problem

    if file_size < 8:
        raise SourceError(f"{path}: not a safetensors file (only {file_size} bytes)")
    (n,) = np.frombuffer(bytes(data[:8]), dtype="<u8")
    n = int(n)
    if n > MAX_HEADER_BYTES:
        raise SourceError(f"{path}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > file_size:
        raise SourceError(f"{path}: truncated shard (header says {n} bytes, file has {file_size})")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        problem = name_problem(name)
        if problem:
            raise SourceError(f"{path}: tensor name {name!r} {problem}")
        if not dtypes.known(code):
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        want = int(np.prod(shape, dtype=np.int64)) * dtypes.itemsize(code)
        if not (0 <= start <= end) or end - start != want or any(s < 0 for s in shape):
            raise SourceError(f"{path}: tensor {name!r} has inconsistent offsets for shape {list(shape)}")
        if base + end > file_size:
            raise SourceError(f"{path}: truncated shard (tensor {name!r} ends at byte {base + end}, file has {file_size})")
        out[name] = TensorInfo(name, code, shape, path, base + start, want)
    return out


def bytes_to_tensor(buf: Any, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes (any buffer) -> tensor of `code`, without copying."""
    arr = np.frombuffer(buf, dtype=_storage_view(code))
    return torch.from_numpy(arr).view(dtypes.to_torch(code)).reshape(shape)


def numpy_to_tensor(arr: np.ndarray, code: str) -> torch.Tensor:
    """A numpy array of `code`'s dtype (ml_dtypes.bfloat16 included) -> tensor, without copying."""
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr.view(_storage_view(code))).view(dtypes.to_torch(code))


def _storage_view(code: str) -> np.dtype:
    # torch.from_numpy does not know ml_dtypes.bfloat16: hand it the raw bits and view them back.
    return np.dtype(np.int16) if code == "BF16" else dtypes.to_numpy(code)


class Parent:
    """A read-only parent checkpoint: an index of tensors, rows read on demand, inherited files.

    Subclasses say where the bytes come from; the engine only sees this interface.
    """

    spec: str
    tensors: dict[str, TensorInfo]

    @cached_property
    def config(self) -> dict:
        raw = self.read_aux().get("config.json")
        if raw is None:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SourceError(f"parent {self.spec}: config.json is not valid JSON") from None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"parent {self.spec}: no tensor named {name!r}") from None

    def _rows(self, name: str, start: int, stop: int | None) -> tuple[TensorInfo, int, int]:
        t = self.info(name)
        stop = t.rows if stop is None else stop
        if not (0 <= start <= stop <= t.rows):
            raise SourceError(f"parent {self.spec}: rows [{start}, {stop}) out of range for {name!r} with {t.rows} rows")
        return t, start, stop

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0, in the stored dtype."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)

    def read_aux(self) -> dict[str, bytes]:
        """Files a child inherits (config.json, tokenizer files, generation_config), by name."""
        raise NotImplementedError

    def array(self, name: str) -> zarr.Array:
        """The tensor as a read-only zarr array: the one read path every parent form shares."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles and maps; the parent may not be read afterwards."""

    def __enter__(self) -> Parent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self.tensors)} tensors)"


class SafetensorsParent(Parent):
    """Safetensors shards in a local directory (memory-mapped) or behind an fsspec URL (ranged reads).

    `array()` serves the reference view (zarr arrays whose chunks are byte ranges of the shards),
    built in memory on first use.
    """

    def __init__(
        self,
        spec: str,
        root: str,
        tensors: dict[str, TensorInfo],
        fs: fsspec.AbstractFileSystem | None = None,
        storage_options: dict | None = None,
    ):
        self.spec = spec
        self.root = root  # local directory, or URL prefix when fs is set
        self.tensors = tensors
        self.fs = fs  # None: local files, read by mmap
        self.storage_options = storage_options or {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._view: zarr.Group | None = None
        self._paths: dict[str, str] = {}

    @property
    def is_local(self) -> bool:
        return self.fs is None

    def _map(self, file: str) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with self._lock:
                m = self._maps.get(file)
                if m is None:
                    try:
                        # The file is opened read-only and mapped copy-on-write (MAP_PRIVATE): the
                        # parent on disk can never change, pages stay shared with the page cache,
                        # and tensors over the map are writable (no torch warning), where a write
                        # would only make a private copy of that page.
                        with open(file, "rb") as f:
                            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    except OSError as e:
                        raise SourceError(f"parent {self.spec}: cannot read {file} ({e.strerror})") from None
                    self._maps[file] = m
        return m

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0; zero-copy from the page cache for local shards.

        Measured against the zarr reference view (docs/benchmarks.md, "Read path"), mmap stays the
        row path; `array()` gives the same bytes as zarr.
        """
        t, start, stop = self._rows(name, start, stop)
        shape = (stop - start, *t.shape[1:]) if t.shape else ()
        lo = t.offset + start * t.row_bytes
        n = (stop - start) * t.row_bytes
        if self.fs is None:
            buf: Any = memoryview(self._map(t.file))[lo : lo + n]
        else:
            try:
                buf = bytearray(self.fs.cat_file(t.file, start=lo, end=lo + n)) if n else bytearray()
            except OSError as e:
                raise SourceError(f"parent {self.spec}: cannot read {t.file} ({e})") from None
            if len(buf) != n:
                raise SourceError(f"parent {self.spec}: truncated shard {t.file} (short read for {name!r})")
        return bytes_to_tensor(buf, t.dtype, shape)

    def _aux_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.fs is not None else str(Path(self.root) / name)

    def read_aux(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for n in AUX_FILES:
            p = self._aux_path(n)
            if self.fs is None:
                if os.path.isfile(p):
                    out[n] = Path(p).read_bytes()
            elif self.fs.isfile(p):
                out[n] = self.fs.cat_file(p)
        return out

    def array(self, name: str) -> zarr.Array:
        from darwin_stream.store import layout
        from darwin_stream.store.reference import reference_view

        self.info(name)
        if self._view is None:
            self._view = reference_view(self)
            self._paths = layout.store_paths(list(self.tensors))
        return self._view[self._paths[name]]  # type: ignore[return-value]

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for m in maps.values():
            with contextlib.suppress(BufferError):  # a tensor still views it: unmapped when freed
                m.close()
        self._view = None


class StoreParent(Parent):
    """A darwin-stream zarr store (reference JSON or copy) opened as a parent, read through zarr."""

    def __init__(self, spec: str, group: zarr.Group):
        from darwin_stream.store.layout import ROOT_ATTR

        self.spec = spec
        self.group = group
        meta = group.attrs[ROOT_ATTR]
        self._paths: dict[str, str] = {}
        self.tensors = {}
        for name, entry in meta["tensors"].items():
            code, shape = entry["dtype"], tuple(entry["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtypes.itemsize(code)
            self.tensors[name] = TensorInfo(name, code, shape, spec, 0, nbytes)
            self._paths[name] = entry["path"]
        self._checksums: dict[str, str | None] = {n: e.get("checksum") for n, e in meta["tensors"].items()}
        self._aux_names: list[str] = list(meta.get("aux", []))
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        self.info(name)
        a = self._arrays.get(name)
        if a is None:
            try:
                a = self._arrays[name] = self.group[self._paths[name]]  # type: ignore[assignment]
            except KeyError:
                raise SourceError(f"parent {self.spec}: store has no array for {name!r}") from None
        return a

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        from darwin_stream.store.api import read_array, verify_checksum

        t, start, stop = self._rows(name, start, stop)
        sel = slice(start, stop) if t.shape else ()
        data = read_array(self.array(name), sel, f"parent {self.spec}: tensor {name!r}", SourceError)
        if start == 0 and stop == t.rows:  # a whole tensor: check it (a lost chunk reads as zeros)
            verify_checksum(data, self._checksums.get(name), f"parent {self.spec}: tensor {name!r}")
        return numpy_to_tensor(data, t.dtype)

    def read_aux(self) -> dict[str, bytes]:
        from darwin_stream.store.api import read_aux_file

        out = {}
        for n in self._aux_names:
            b = read_aux_file(self.group, n)
            if b is not None:
                out[n] = b
        return out


def _is_url(spec: str) -> bool:
    return "://" in spec


def _check_pickles(spec: str, names: list[str]) -> None:
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SourceError(
            f"parent {spec}: {pickles[0]} is a pickle checkpoint; convert it to safetensors (darwin-stream never unpickles)"
        )


def _shard_names(spec: str, listing: list[str], read_text: Any) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names from the index when there is one (validated), else every *.safetensors."""
    if INDEX_FILE in listing:
        try:
            index = json.loads(read_text(INDEX_FILE))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise SourceError(f"parent {spec}: {INDEX_FILE} is not a valid safetensors index") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for s in shards:
            if "/" in s or "\\" in s or s in ("", ".", ".."):
                raise SourceError(f"parent {spec}: {INDEX_FILE} names shard {s!r} outside the checkpoint")
            if s not in listing:
                raise SourceError(f"parent {spec}: shard {s} listed in {INDEX_FILE} is missing")
        return shards, weight_map
    shards = sorted(n for n in listing if n.endswith(".safetensors"))
    if not shards:
        _check_pickles(spec, listing)
        raise SourceError(f"parent {spec}: no .safetensors files")
    return shards, None


def _check_index(spec: str, tensors: dict[str, TensorInfo], weight_map: dict[str, str] | None) -> None:
    if weight_map is None:
        return
    for name, shard in weight_map.items():
        t = tensors.get(name)
        if t is None or os.path.basename(t.file.rstrip("/")) != shard:
            raise SourceError(f"parent {spec}: tensor {name!r} listed in {INDEX_FILE} is missing from shard {shard}")


def _add(spec: str, tensors: dict[str, TensorInfo], found: dict[str, TensorInfo]) -> None:
    for name, t in found.items():
        if name in tensors:
            raise SourceError(f"parent {spec}: tensor {name!r} appears in both {tensors[name].file} and {t.file}")
        tensors[name] = t


def _open_local_dir(spec: str, root: Path) -> SafetensorsParent:
    try:
        listing = sorted(p.name for p in root.iterdir() if p.is_file())
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot list directory ({e.strerror})") from None
    shards, weight_map = _shard_names(spec, listing, lambda n: (root / n).read_bytes())
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        shard = root / s
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            n = int(np.frombuffer(head, dtype="<u8")[0]) if len(head) == 8 else 0
            data = head + f.read(min(n, MAX_HEADER_BYTES))
        _add(spec, tensors, read_safetensors_header(str(shard), data, size))
    _check_index(spec, tensors, weight_map)
    return SafetensorsParent(spec, str(root), tensors)


def _open_url(spec: str, storage_options: dict | None) -> Parent:
    try:
        return _open_url_unchecked(spec, storage_options)
    except DarwinError:
        raise
    except Exception as e:  # remote backends raise their own types (botocore, aiohttp, ...)
        raise SourceError(f"parent {spec}: cannot open URL ({type(e).__name__}: {e})") from None


def _open_url_unchecked(spec: str, storage_options: dict | None) -> Parent:
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
    url = fs.unstrip_protocol  # full URLs in TensorInfo.file, so reference views find their filesystem
    from darwin_stream.store import api as store_api

    if store_api.is_store(spec, storage_options=storage_options):
        return StoreParent(spec, store_api.open_store(spec, storage_options=storage_options))
    try:
        if fs.isfile(path):
            raise SourceError(f"parent {spec}: is a file, not a checkpoint directory or store")
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise SourceError(f"parent {spec}: no such URL") from None
    except SourceError:
        raise
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot list ({e})") from None
    files = {os.path.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") == "file"}
    if not files:
        raise SourceError(f"parent {spec}: no such URL or empty directory")
    shards, weight_map = _shard_names(spec, sorted(files), lambda n: fs.cat_file(files[n]["name"]))
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        e = files[s]
        size = int(e.get("size") or fs.size(e["name"]))
        head = fs.cat_file(e["name"], start=0, end=min(8, size)) if size else b""
        n = int(np.frombuffer(head, dtype="<u8")[0]) if len(head) == 8 else 0
        data = head + (fs.cat_file(e["name"], start=8, end=8 + n) if 0 < n <= min(MAX_HEADER_BYTES, size - 8) else b"")
        _add(spec, tensors, read_safetensors_header(url(e["name"]), data, size))
    _check_index(spec, tensors, weight_map)
    root = url(path)
    return SafetensorsParent(spec, root, tensors, fs=fs, storage_options=storage_options)


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """A Hugging Face repo id -> its local snapshot directory (downloaded unless offline).

    Offline (HF_HUB_OFFLINE=1) it is resolved from the cache alone. HF_HUB_CACHE is read at call
    time, not at huggingface_hub's import time, so a test (or a user) can point it anywhere.
    """
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
        )
    except Exception as e:  # hub errors are many classes; all mean "cannot resolve this parent"
        raise SourceError(hub_failure(repo_id, revision, cache_dir, offline, e)) from None
    return Path(str(path))


def hub_failure(repo_id: str, revision: str | None, cache_dir: str | None, offline: bool, e: Exception) -> str:
    """One line saying what was looked for (repo, revision), where (the cache), and why it failed.

    huggingface_hub's own message is several lines, and its class name alone
    (`LocalEntryNotFoundError`: the hub was unreachable and the cache had nothing) says neither.
    """
    from huggingface_hub import constants, errors  # the hub client: only when a repo id is resolved

    what = f"parent {repo_id}{f'@{revision}' if revision else ''}"
    cache = cache_dir or constants.HF_HUB_CACHE
    if offline:
        return (f"{what}: not in the local Hugging Face cache ({cache}), and this machine is offline "
                "(HF_HUB_OFFLINE=1): download it where there is a network, or set HF_HUB_CACHE to a cache "
                "that holds it")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{what}: the Hugging Face hub has no revision {revision!r} of this repo"
    if isinstance(e, errors.GatedRepoError):
        return f"{what}: the repo is gated on the Hugging Face hub; accept its terms and log in (`hf auth login`)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{what}: no such repo on the Hugging Face hub (or it is private: log in with `hf auth login`), "
                f"and no local directory of that name")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return (f"{what}: the Hugging Face hub could not be reached and the repo is not in the local cache "
                f"({cache}); check the network, or the spelling of a local path")
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{what}: cannot resolve Hugging Face repo (cache {cache}; {type(e).__name__}: {first})"


def _hub_files(repo_id: str, revision: str | None, snap: Path) -> list[str]:
    """File names of a repo with no safetensors: from the hub when online, else the snapshot.

    Only the listing is fetched (pickles are never downloaded), so that the refusal can name them.
    """
    names = [p.name for p in snap.iterdir()]
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import list_repo_files

            names += [os.path.basename(f) for f in list_repo_files(repo_id, revision=revision)]
        except Exception:  # listing is a courtesy for the error message; its failure is not the error
            pass
    return names


def open_parent(spec: str | os.PathLike, *, storage_options: dict | None = None) -> Parent:
    """Open a parent: a local directory, a darwin-stream store, an fsspec URL or a hub repo id.

    Resolution order: URL (has `://`), then an existing local path (store or directory), then a
    `org/name[@revision]` hub repo id. Everything is opened read-only.
    """
    s = os.fspath(spec)
    try:
        if _is_url(s):
            return _open_url(s, storage_options)
        from darwin_stream.store import api as store_api

        root = Path(s)
        if root.exists():
            if store_api.is_store(s):
                return StoreParent(s, store_api.open_store(s, storage_options=storage_options))
            if not root.is_dir():
                if root.suffix in PICKLE_SUFFIXES:
                    _check_pickles(s, [root.name])
                raise SourceError(f"parent {s}: is a file, not a checkpoint directory or store")
            return _open_local_dir(s, root)
        repo, _, rev = s.partition("@")
        if _REPO_ID.match(repo) and not s.startswith((".", "/", "~")):
            snap = resolve_hub(repo, rev or None)
            if not any(snap.glob("*.safetensors")):
                _check_pickles(s, _hub_files(repo, rev or None, snap))
            return _open_local_dir(s, snap)
        raise SourceError(f"parent {s}: no such directory, store, URL or cached Hugging Face repo")
    except DarwinError as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(str(e)) from None
