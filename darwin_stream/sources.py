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

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from darwin_stream import dtypes, lora
from darwin_stream.bounded import MAX_FILE_BYTES, check_local_file, clip, load_json, read_local, show
from darwin_stream.child_marker import refuse_incomplete
from darwin_stream.errors import DarwinError, SourceError
from darwin_stream.names import name_problem
from darwin_stream.transports import MemoryMap, RangedReads, Transport

if TYPE_CHECKING:
    import fsspec
    import zarr

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own reader refuses larger headers too
MAX_DIMS = 16  # torch refuses more than 64; real checkpoints stop at 5 (conv3d)
MAX_DIM = 2**62  # safetensors allows usize; torch indexes with int64
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (  # a tokenizer's files as transformers saves them; the child's are rebuilt from these
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
AUX_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "preprocessor_config.json")
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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field of the right type and bounds."""
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: corrupt safetensors header entry for {show(name)} (not an object)")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str):
        raise SourceError(f"{path}: tensor {show(name)} has dtype {show(code)}, not a dtype name")
    if not dtypes.known(code):
        raise SourceError(f"{path}: tensor {show(name)} has unsupported dtype {show(code)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(s) and 0 <= s <= MAX_DIM for s in shape):
        raise SourceError(
            f"{path}: tensor {show(name)} has shape {show(shape)}; expected at most {MAX_DIMS} integers in [0, 2**62]"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
        raise SourceError(f"{path}: tensor {show(name)} has data_offsets {show(offsets)}; expected two integers")
    return code, tuple(shape), offsets[0], offsets[1]


def _check_metadata(path: str, meta: Any) -> None:
    # safetensors' own type: a map of strings to strings
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SourceError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")


def read_safetensors_header(path: str, data: bytes | memoryview, file_size: int) -> dict[str, TensorInfo]:
    """Parse and check a shard header; `data` holds at least the first 8 + header bytes.

    As strict as safetensors' own reader (`Metadata::validate`): every field has its type, and the
    tensors, sorted by offset, tile the data region exactly, without gap or overlap, each exactly
    shape x itemsize long, the last one ending at the end of the file. A header that fails any of
    these would have the child built from another tensor's bytes (or from bytes past the end of
    the file, a SIGBUS), so it fails here, by name. Tensor names are checked too: a name that
    could escape a zarr store (`../x`) is refused when the parent is opened, not during an ingest.
    """
    if file_size < 8:
        raise SourceError(f"{path}: not a safetensors file (only {file_size} bytes)")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > MAX_HEADER_BYTES:
        raise SourceError(f"{path}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > file_size:
        raise SourceError(f"{path}: truncated shard (header says {n} bytes, file has {file_size})")
    header = load_json(bytes(data[8 : 8 + n]), f"{path}: corrupt safetensors header, which")
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(path, entry)
            continue
        problem = name_problem(name)
        if problem:
            raise SourceError(f"{path}: tensor name {show(name)} {problem}")
        code, shape, start, end = _entry(path, name, entry)
        want = math.prod(shape) * dtypes.itemsize(code)
        if not 0 <= start <= end or end - start != want:
            raise SourceError(
                f"{path}: tensor {show(name)} has data_offsets {show([start, end])}, "
                f"which do not hold shape {show(list(shape))} of {code} ({want} bytes)"
            )
        entries.append((start, end, name, code, shape))
    entries.sort()
    pos = 0
    for start, end, name, _, _ in entries:
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else f"leaves a gap of {start - pos} bytes before it"
            raise SourceError(f"{path}: tensor {show(name)} at data_offsets [{start}, {end}] {what}")
        pos = end
    if base + pos != file_size:
        how = "truncated shard" if base + pos > file_size else "corrupt shard"
        raise SourceError(f"{path}: {how} (its tensors end at byte {base + pos}, the file has {file_size})")
    return {name: TensorInfo(name, code, shape, path, base + start, end - start) for start, end, name, code, shape in entries}


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


_STR, _INT, _LIST = (str,), (int,), (list,)
# The config keys darwin-stream itself reads (arch adapters, breed, plan, model card), with their JSON
# types; null is allowed for each, as transformers allows it. Anything else is transformers' business.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": _STR, "architectures": _LIST, "text_config": (dict,), "layer_types": _LIST,
    "hidden_act": _STR, "hidden_activation": _STR, "torch_dtype": _STR, "dtype": _STR,
    "num_hidden_layers": _INT, "hidden_size": _INT, "intermediate_size": _INT, "vocab_size": _INT,
    "max_position_embeddings": _INT, "num_attention_heads": _INT, "num_key_value_heads": _INT,
}


def _check_config(spec: str, config: dict, prefix: str = "") -> None:
    """A config.json whose keys have the types darwin-stream relies on: a `model_type` that is a
    list, say, must be one line naming the key, not a TypeError deep in the arch adapters."""
    for key, types in CONFIG_TYPES.items():
        v = config.get(key)
        if v is None:
            continue
        ok = isinstance(v, types) and not (isinstance(v, bool) and types == _INT)
        if ok and types == _INT:
            ok = v >= 0
        if ok and key == "architectures":
            ok = all(isinstance(a, str) for a in v)
        if not ok:
            raise SourceError(f"parent {spec}: config.json: {prefix}{key} has the wrong type, got {show(v)}")


class AuxBytes(bytes):
    """An inherited file's bytes, with the permission bits of the parent's file: the child's copy
    must not be readable by more users than the original (a 0600 tokenizer stays 0600)."""

    mode: int

    def __new__(cls, data: bytes, mode: int) -> AuxBytes:
        obj = super().__new__(cls, data)
        obj.mode = mode
        return obj


class Parent:
    """A read-only parent checkpoint: an index of tensors, rows read on demand, inherited files.

    Subclasses say where the bytes come from; the engine only sees this interface.
    """

    spec: str
    tensors: dict[str, TensorInfo]

    @cached_property
    def config(self) -> dict:
        """The parent's config.json as an object; {} when it has none (see `require_config`)."""
        raw = self.read_aux_file("config.json")
        if raw is None:
            return {}
        config = load_json(raw, f"parent {self.spec}: config.json")
        if not isinstance(config, dict):
            raise SourceError(f"parent {self.spec}: config.json holds a JSON {type(config).__name__}, not an object")
        _check_config(self.spec, config)
        text = config.get("text_config")
        if isinstance(text, dict):
            _check_config(self.spec, text, "text_config.")
        return config

    def require_config(self) -> dict:
        """The config, for a parent the child takes its config from: without one the child's
        config.json would be `{}`, a checkpoint nothing can load."""
        if self.read_aux_file("config.json") is None:
            raise SourceError(f"parent {self.spec}: has no config.json (the child takes its config from it)")
        return self.config

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
        out = {}
        for n in self.aux_names():
            b = self.read_aux_file(n)
            if b is not None:
                out[n] = b
        return out

    def aux_names(self) -> list[str]:
        return list(AUX_FILES)

    def read_aux_file(self, name: str) -> bytes | None:
        """One inherited file's bytes, None when the parent has none by that name."""
        raise NotImplementedError

    def array(self, name: str) -> zarr.Array:
        """The tensor as a read-only zarr array: the one read path every parent form shares."""
        raise NotImplementedError

    def identity_parts(self) -> list:
        """What `identity.parent_identity` digests for a parent form it does not know itself
        (stores: store/parent.py); by default, the spec and the tensor table."""
        table = [[t.name, t.dtype, list(t.shape), t.file, t.offset, t.nbytes] for t in self.tensors.values()]
        return ["other", type(self).__name__, self.spec, table]

    def locations(self) -> set[str]:
        """Everything a run reads of this parent besides its spec (see `identity.parent_locations`)."""
        return {self.spec}

    def close(self) -> None:
        """Release file handles and maps; a later read opens them again."""

    def __enter__(self) -> Parent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self.tensors)} tensors)"


class SafetensorsParent(Parent):
    """Safetensors shards in a local directory (memory-mapped) or behind an fsspec URL (ranged reads).

    The bytes come through a `transports.Transport`. `array()` serves the reference view (zarr
    arrays whose chunks are byte ranges of the shards), built on first use by `view` (name -> array),
    which the parent pool supplies: store/ builds the view, and sources.py does not import store/.
    """

    def __init__(
        self,
        spec: str,
        root: str,
        tensors: dict[str, TensorInfo],
        fs: fsspec.AbstractFileSystem | None = None,
        storage_options: dict | None = None,
        confine: str | None = None,
        view: Callable[[SafetensorsParent], Callable[[str], zarr.Array]] | None = None,
    ):
        self.spec = spec
        self.root = root  # local directory, or URL prefix when fs is set
        # Local files only: the directory no symlink may leave (the parent, or a hub repo's cache).
        self.confine = confine if confine is not None else (root if fs is None else None)
        self.tensors = tensors
        # The size each shard had when its header was read (see transports.MemoryMap).
        sizes: dict[str, int] = {}
        for t in tensors.values():
            sizes[t.file] = max(sizes.get(t.file, 0), t.offset + t.nbytes)
        self.fs = fs  # None: local files, read by mmap
        self.storage_options = storage_options or {}
        self.transport: Transport = MemoryMap(spec, sizes) if fs is None else RangedReads(spec, fs)
        self._make_view = view
        self._view: Callable[[str], zarr.Array] | None = None

    @property
    def is_local(self) -> bool:
        return self.transport.is_local

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0; zero-copy from the page cache for local shards.

        Measured against the zarr reference view (docs/benchmarks.md, "Read path"), mmap stays the
        row path; `array()` gives the same bytes as zarr.
        """
        t, start, stop = self._rows(name, start, stop)
        shape = (stop - start, *t.shape[1:]) if t.shape else ()
        buf = self.transport.read(t.file, t.offset + start * t.row_bytes, (stop - start) * t.row_bytes)
        return bytes_to_tensor(buf, t.dtype, shape)

    def _aux_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.fs is not None else str(Path(self.root) / name)

    def read_aux_file(self, name: str) -> bytes | None:
        p = self._aux_path(name)
        if self.fs is None:
            if not os.path.lexists(p):
                return None
            data = read_local(self.spec, p, self.confine or self.root)
            return AuxBytes(data, os.stat(p).st_mode & 0o777)
        if self.confine is not None:  # a file:// URL: the same rules as a local directory
            local = self.fs._strip_protocol(p)
            if not os.path.lexists(local):
                return None
            return read_local(self.spec, local, self.confine)
        try:
            if not self.fs.isfile(p):
                return None
            size = self.fs.size(p)
            if size is not None and size > MAX_FILE_BYTES:
                raise SourceError(f"parent {self.spec}: {name} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
            data = self.fs.cat_file(p, start=0, end=MAX_FILE_BYTES + 1)
        except OSError as e:
            raise SourceError(f"parent {self.spec}: cannot read {name} ({e})") from None
        if len(data) > MAX_FILE_BYTES:
            raise SourceError(f"parent {self.spec}: {name} is over the {MAX_FILE_BYTES} byte limit")
        return data

    def array(self, name: str) -> zarr.Array:
        self.info(name)
        if self._view is None:
            if self._make_view is None:
                raise SourceError(f"parent {self.spec}: opened without a zarr view (open it with pool.open_parent)")
            self._view = self._make_view(self)
        return self._view(name)

    def close(self) -> None:
        self.transport.close()
        self._view = None


class LoraParent(Parent):
    """A base model with a PEFT LoRA adapter applied by rows (lora.py): mergekit's `base+adapter`.

    Its tensors are the base's, same names, shapes and dtypes; rows of a weight the adapter targets
    come back with the adapter applied, so nothing downstream (plan, engine, identity of the child)
    knows an adapter was involved, and no merged copy of the base is ever written.
    """

    def __init__(self, spec: str, base: Parent, adapter: Parent):
        self.spec, self.base, self.adapter = spec, base, adapter
        raw = adapter.read_aux_file(lora.CONFIG_FILE)
        if raw is None:
            raise SourceError(f"adapter {adapter.spec}: no {lora.CONFIG_FILE} (a PEFT adapter directory holds one)")
        cfg = lora.parse_config(load_json(raw, f"adapter {adapter.spec}: {lora.CONFIG_FILE}"), adapter.spec)
        self.changes = lora.plan_adapter({n: t.shape for n, t in adapter.tensors.items()},
                                         {n: t.shape for n, t in base.tensors.items()}, cfg, adapter.spec)
        self.tensors = base.tensors

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        _, start, stop = self._rows(name, start, stop)
        change = self.changes.get(name)
        if isinstance(change, lora.Replace):
            return self.adapter.read_rows(change.name, start, stop).to(dtypes.to_torch(self.tensors[name].dtype))
        rows = self.base.read_rows(name, start, stop)
        return rows if change is None else lora.apply_rows(rows, change, start, self.adapter.read_rows)

    def aux_names(self) -> list[str]:
        return self.base.aux_names()

    def read_aux_file(self, name: str) -> bytes | None:
        return self.base.read_aux_file(name)

    def array(self, name: str) -> zarr.Array:
        if name in self.changes:
            raise SourceError(f"parent {self.spec}: {name!r} is changed by the adapter and has no zarr view; "
                              "merge it into a checkpoint first (a passthrough merge of this parent)")
        return self.base.array(name)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def _open_lora(spec: str, storage_options: dict | None, stores: StoreOpener | None, view: View | None) -> LoraParent:
    """`base+adapter`, split as mergekit's ModelReference splits it: at the one '+'."""
    parts = spec.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise SourceError(f"parent {spec}: expected model+lora (one '+')")
    base, adapter = (open_source(p.strip(), storage_options=storage_options, stores=stores, view=view) for p in parts)
    return LoraParent(spec, base, adapter)


def _is_url(spec: str) -> bool:
    return "://" in spec


def _check_pickles(spec: str, names: list[str]) -> None:
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SourceError(
            f"parent {spec}: {pickles[0]} is a pickle checkpoint; convert it to safetensors (darwin-stream never unpickles)"
        )


_SERIES = re.compile(r"^(.+)-(\d+)-of-(\d+)\.safetensors$")


def _shard_names(spec: str, listing: list[str], read_text: Any) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names from the index when there is one (validated), else every *.safetensors.

    The index is authoritative, as in transformers and mergekit: a `consolidated.safetensors`
    beside it is not read. But a shard of the index's own series (`model-00003-of-00003`) that is
    present and not listed, or a series the index lists only in part, means an incomplete index:
    refused, since reading only the listed shards would give a child without those tensors.
    """
    if INDEX_FILE not in listing:
        shards = sorted(n for n in listing if n.endswith(".safetensors"))
        if not shards:
            _check_pickles(spec, listing)
            raise SourceError(f"parent {spec}: no .safetensors files")
        return shards, None
    index = load_json(read_text(INDEX_FILE), f"parent {spec}: {INDEX_FILE}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"parent {spec}: {INDEX_FILE} is not a valid safetensors index (no weight_map of names)")
    if not weight_map:
        raise SourceError(f"parent {spec}: {INDEX_FILE} maps no tensors")
    shards = list(dict.fromkeys(weight_map.values()))
    for s in shards:
        if "/" in s or "\\" in s or s in ("", ".", ".."):
            raise SourceError(f"parent {spec}: {INDEX_FILE} names shard {show(s)} outside the checkpoint")
        if s not in listing:
            raise SourceError(f"parent {spec}: shard {clip(s)} listed in {INDEX_FILE} is missing")
    _check_series(spec, listing, shards)
    return shards, weight_map


def _check_series(spec: str, listing: list[str], shards: list[str]) -> None:
    series: dict[tuple[str, str], set[int]] = {}
    for s in shards:
        m = _SERIES.match(s)
        if m:
            series.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    for n in listing:
        m = _SERIES.match(n)
        if m and (m.group(1), m.group(3)) in series and n not in shards:
            raise SourceError(f"parent {spec}: shard {n} is present but {INDEX_FILE} does not list it (incomplete index)")
    for (prefix, total), listed in series.items():
        if len(listed) != int(total):
            raise SourceError(
                f"parent {spec}: {INDEX_FILE} lists {len(listed)} of the {int(total)} shards {prefix}-*-of-{total}.safetensors"
            )


def _check_index(spec: str, tensors: dict[str, TensorInfo], weight_map: dict[str, str] | None) -> None:
    if not tensors:
        raise SourceError(f"parent {spec}: its shards hold no tensors")
    if weight_map is None:
        return
    for name, shard in weight_map.items():
        t = tensors.get(name)
        if t is None or os.path.basename(t.file.rstrip("/")) != shard:
            raise SourceError(f"parent {spec}: tensor {show(name)} listed in {INDEX_FILE} is missing from shard {shard}")


def _add(spec: str, tensors: dict[str, TensorInfo], found: dict[str, TensorInfo]) -> None:
    for name, t in found.items():
        if name in tensors:
            raise SourceError(f"parent {spec}: tensor {name!r} appears in both {tensors[name].file} and {t.file}")
        tensors[name] = t


def _read_header(spec: str, path: str, size: int) -> dict[str, TensorInfo]:
    """A local shard's header, read with the 8-byte length bounded before the rest is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            data = head + f.read(min(n, MAX_HEADER_BYTES))
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot read {path} ({e.strerror})") from None
    return read_safetensors_header(path, data, size)


class StoreOpener(Protocol):
    """Opens `spec` as a store parent, or returns None when it is not a store (store/parent.py).

    The plug point through which stores are opened without sources.py importing store/, which
    itself reads safetensors parents through this module."""

    def __call__(self, spec: str, storage_options: dict | None, *, probe_options: bool) -> Parent | None: ...


View = Callable[[SafetensorsParent], Callable[[str], "zarr.Array"]]


def _open_local_dir(spec: str, root: Path, confine: Path | None = None, view: View | None = None) -> SafetensorsParent:
    """A local checkpoint directory; `confine` (default: `root`) is where its symlinks may lead."""
    top = str(confine or root)
    try:
        listing = sorted(p.name for p in root.iterdir() if p.is_file())
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot list directory ({e.strerror})") from None
    shards, weight_map = _shard_names(spec, listing, lambda n: read_local(spec, str(root / n), top))
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        shard = str(root / s)
        _add(spec, tensors, _read_header(spec, shard, check_local_file(spec, shard, top, limit=None)))
    _check_index(spec, tensors, weight_map)
    return SafetensorsParent(spec, str(root), tensors, confine=top, view=view)


def _open_url(spec: str, storage_options: dict | None, stores: StoreOpener | None, view: View | None) -> Parent:
    try:
        return _open_url_unchecked(spec, storage_options, stores, view)
    except DarwinError:
        raise
    except Exception as e:  # remote backends raise their own types (botocore, aiohttp, ...)
        raise SourceError(f"parent {spec}: cannot open URL ({type(e).__name__}: {e})") from None


def _open_url_unchecked(spec: str, storage_options: dict | None, stores: StoreOpener | None, view: View | None) -> Parent:
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
    refuse_incomplete(fs, path, spec)  # a bucket child whose merge has not finished
    url = fs.unstrip_protocol  # full URLs in TensorInfo.file, so reference views find their filesystem
    store = stores(spec, storage_options, probe_options=True) if stores is not None else None
    if store is not None:
        return store
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
    local_root = path if _is_local_fs(fs) else None

    def read_small(n: str) -> bytes:
        if local_root is not None:
            return read_local(spec, files[n]["name"], local_root)
        size = int(files[n].get("size") or 0)
        if size > MAX_FILE_BYTES:
            raise SourceError(f"parent {spec}: {n} is {size} bytes, over the {MAX_FILE_BYTES} byte limit for such files")
        return fs.cat_file(files[n]["name"], start=0, end=MAX_FILE_BYTES + 1)

    shards, weight_map = _shard_names(spec, sorted(files), read_small)
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        e = files[s]
        if local_root is not None:
            check_local_file(spec, e["name"], local_root, limit=None)
        size = int(e.get("size") or fs.size(e["name"]))
        head = fs.cat_file(e["name"], start=0, end=min(8, size)) if size else b""
        n = int(np.frombuffer(head, dtype="<u8")[0]) if len(head) == 8 else 0
        data = head + (fs.cat_file(e["name"], start=8, end=8 + n) if 0 < n <= min(MAX_HEADER_BYTES, size - 8) else b"")
        _add(spec, tensors, read_safetensors_header(url(e["name"]), data, size))
    _check_index(spec, tensors, weight_map)
    root = url(path)
    return SafetensorsParent(spec, root, tensors, fs=fs, storage_options=storage_options, confine=local_root, view=view)


def _is_local_fs(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


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


def open_source(spec: str | os.PathLike, *, storage_options: dict | None = None, stores: StoreOpener | None = None,
                view: View | None = None) -> Parent:
    """Open a parent: a local directory, a store (through `stores`), an fsspec URL or a hub repo id.

    Resolution order: URL (has `://`), then an existing local path (store or directory), then a
    `org/name[@revision]` hub repo id. Everything is opened read-only. Callers get parents from the
    parent pool (`pool.get_parent`, or `pool.open_parent` for one of their own), which passes the
    store opener and the zarr view of store/.
    """
    s = os.fspath(spec)
    try:
        if "+" in s and not os.path.exists(s):
            return _open_lora(s, storage_options, stores, view)
        if _is_url(s):
            return _open_url(s, storage_options, stores, view)
        root = Path(s)
        if root.exists():
            store = stores(s, storage_options, probe_options=False) if stores is not None else None
            if store is not None:
                return store
            if not root.is_dir():
                if root.suffix in PICKLE_SUFFIXES:
                    _check_pickles(s, [root.name])
                raise SourceError(f"parent {s}: is a file, not a checkpoint directory or store")
            return _open_local_dir(s, root, view=view)
        repo, _, rev = s.partition("@")
        if _REPO_ID.match(repo) and not s.startswith((".", "/", "~")):
            snap = resolve_hub(repo, rev or None)
            if not any(snap.glob("*.safetensors")):
                _check_pickles(s, _hub_files(repo, rev or None, snap))
            # Snapshot files are symlinks into the repo's blobs/: they may lead that far, no further.
            return _open_local_dir(s, snap, confine=snap.parent.parent, view=view)
        raise SourceError(f"parent {s}: no such directory, store, URL or cached Hugging Face repo")
    except DarwinError as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(str(e)) from None
