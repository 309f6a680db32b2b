"""Parents: where a checkpoint's tensors live and how to read rows of them without loading shards.

A parent is a local directory, a Hugging Face repo id (resolved through huggingface_hub, offline from
its cache when HF_HUB_OFFLINE=1), an fsspec URL, or a darwin-stream zarr store. Whatever its form, it
is opened as a `Parent`: a read-only index of `TensorInfo` plus the files a child inherits
(config.json, tokenizer, generation_config).

Nothing is ever unpickled: a directory that holds only .bin/.pt/.pth checkpoints is refused.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from darwin_stream import dtypes
from darwin_stream.errors import SourceError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own reader refuses larger headers too
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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: a contiguous, row-major range of one file."""

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
    rather than later as a short read.
    """
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
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if not dtypes.known(code):
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        want = int(np.prod(shape, dtype=np.int64)) * dtypes.itemsize(code)
        if not (0 <= start <= end) or end - start != want or any(s < 0 for s in shape):
            raise SourceError(f"{path}: tensor {name!r} has inconsistent offsets for shape {list(shape)}")
        if base + end > file_size:
            raise SourceError(f"{path}: truncated shard (tensor {name!r} ends at byte {base + end}, file has {file_size})")
        out[name] = TensorInfo(name, code, shape, path, base + start, want)
    return out


class Parent:
    """A read-only parent checkpoint on the local disk, read by memory-map."""

    def __init__(self, spec: str, root: Path, tensors: dict[str, TensorInfo]):
        self.spec = spec
        self.root = root
        self.tensors = tensors
        self._maps: dict[str, mmap.mmap] = {}

    @cached_property
    def config(self) -> dict:
        p = self.root / "config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def aux_files(self) -> dict[str, Path]:
        """Files a child inherits from this parent, by name."""
        return {n: self.root / n for n in AUX_FILES if (self.root / n).is_file()}

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"parent {self.spec}: no tensor named {name!r}") from None

    def _map(self, file: str) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:  # read-only: a parent is never written
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = m
        return m

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0, in the stored dtype; zero-copy from the page cache."""
        t = self.info(name)
        stop = t.rows if stop is None else stop
        shape = (stop - start, *t.shape[1:]) if t.shape else ()
        lo = t.offset + start * t.row_bytes
        buf = memoryview(self._map(t.file))[lo : lo + (stop - start) * t.row_bytes]
        arr = np.frombuffer(buf, dtype=dtypes.to_numpy(t.dtype))
        return torch.from_numpy(arr.view(_storage_view(t.dtype))).view(dtypes.to_torch(t.dtype)).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)


def _storage_view(code: str) -> np.dtype:
    # torch.from_numpy does not know ml_dtypes.bfloat16: hand it the raw bits and view them back.
    return np.dtype(np.int16) if code == "BF16" else dtypes.to_numpy(code)


def open_parent(spec: str | os.PathLike) -> Parent:
    """Open a parent from a local directory (hub ids, URLs and stores: see the module docstring)."""
    root = Path(spec)
    if not root.is_dir():
        raise SourceError(f"parent {spec}: no such directory")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in sorted(root.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise SourceError(f"parent {spec}: {pickles[0]} is a pickle checkpoint; convert it to safetensors (darwin-stream never unpickles)")
        raise SourceError(f"parent {spec}: no .safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            n = int(np.frombuffer(head, dtype="<u8")[0]) if len(head) == 8 else 0
            data = head + f.read(min(n, MAX_HEADER_BYTES))
        tensors.update(read_safetensors_header(str(shard), data, size))
    return Parent(str(spec), root, tensors)
