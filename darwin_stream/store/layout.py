"""Where a tensor lives in a darwin-stream zarr store, and the small helpers both store modes share.

Layout (docs/store.md has the full description):

    zarr.json                      root group; attributes["darwin_stream"] indexes every tensor
    layers/<i>/<rest>/zarr.json    one array per tensor of decoder layer i (`model.layers.<i>.<rest>`)
    other/<name>/zarr.json         every tensor outside the layers, under its full name
    aux/<file>/zarr.json           config.json, tokenizer files, generation_config.json, each a 1-D
                                   uint8 array holding the file's bytes in one chunk

Tensor names become node names, so a name that could climb out of the store (`..`, `/`, `\\`, a
drive letter, control characters, zarr's reserved `__` prefix) is refused before anything is written.

`name_problem` lives in darwin_stream/names.py, a leaf that sources.py uses when it opens a parent.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from darwin_stream import dtypes
from darwin_stream.names import MAX_NAME_CHARS, name_problem  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
ROOT_ATTR = "darwin_stream"
AUX_PREFIX = "aux/"
CHECKSUM_ALGO = "sha256"  # hardware-accelerated on x86/arm: ~1.5 GB/s per core, twice blake2b

# Decoder layers as the common architectures spell them; group(1) is the layer index.
_LAYER = re.compile(r"^(?:model\.|model\.language_model\.|language_model\.model\.|transformer\.)?(?:layers|h|blocks)\.(\d+)\.(.+)$")

# safetensors code -> zarr v3 data_type name (bfloat16 is the zarr-extensions name, see bfloat16.py)
ZARR_DTYPE = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def store_path(name: str) -> str:
    """The array's path in the store: `layers/<i>/<rest>` for decoder layers, `other/<name>` else.

    The caller has checked `name_problem(name)`; both halves of a layer name are substrings of a
    safe name and so are safe too.
    """
    m = _LAYER.match(name)
    if m:
        return f"layers/{int(m.group(1))}/{m.group(2)}"
    return f"other/{name}"


def store_paths(names: list[str]) -> dict[str, str]:
    """Paths for all tensors of a parent; a layer path two names would share falls back to other/."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        path = store_path(name)
        if path in used:
            path = f"other/{name}"
        used.add(path)
        out[name] = path
    return out


def row_chunk_dividing(rows: int, row_bytes: int, budget: int) -> int:
    """Largest divisor of `rows` whose chunk stays within `budget` bytes (at least one row).

    A reference chunk is a byte range of the shard and an uncompressed zarr chunk must be full
    size, so the last chunk may not be short: the chunk row count has to divide the row count.
    """
    if rows <= 1:
        return max(rows, 1)
    limit = max(1, budget // max(row_bytes, 1))
    if limit >= rows:
        return rows
    best = 1
    i = 1
    while i * i <= rows:
        if rows % i == 0:
            for d in (i, rows // i):
                if best < d <= limit:
                    best = d
        i += 1
    return best


def fill_value(code: str) -> Any:
    return False if code == "BOOL" else (0.0 if code in dtypes.FLOAT_CODES else 0)


def bytes_codec(code: str) -> dict:
    if dtypes.itemsize(code) == 1:
        return {"name": "bytes", "configuration": {}}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def array_metadata(shape: tuple[int, ...], code: str, chunk_shape: tuple[int, ...], attributes: dict) -> dict:
    """zarr v3 array metadata for an uncompressed little-endian array, built by hand.

    Building the JSON directly (instead of through zarr's metadata classes) keeps a reference
    ingest at a few microseconds per tensor.
    """
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": ZARR_DTYPE[code],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value(code),
        "codecs": [bytes_codec(code)],
        "attributes": attributes,
        "storage_transformers": [],
    }


def aux_metadata(name: str, nbytes: int) -> dict:
    """An inherited file as a 1-D uint8 array in one chunk: a real zarr node, so listings stay clean."""
    return array_metadata((nbytes,), "U8", (max(nbytes, 1),), {"file": name})


def group_metadata(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def new_hash() -> Any:
    return hashlib.new(CHECKSUM_ALGO)


def checksum_string(h: Any) -> str:
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


# A tensor whose chunks were written by tasks in any order (zarr_sink: a merge into a bucket as
# zarr), none of which sees the tensor's bytes in order: `sha256-chunks:<n>:<hex>`, see TensorHash.
CHUNKED_ALGO = f"{CHECKSUM_ALGO}-chunks"


def chunked_checksum(digests: list[bytes], piece_bytes: int) -> str:
    """The `sha256-chunks` checksum from the sha256 digests of a tensor's consecutive pieces."""
    h = new_hash()
    for d in digests:
        h.update(d)
    return f"{CHUNKED_ALGO}:{piece_bytes}:{h.hexdigest()}"


class TensorHash:
    """The checksum of a tensor's raw bytes, fed in order, in the form `want` records.

    `sha256:<hex>` (what ingest records) hashes every byte. `sha256-chunks:<n>:<hex>` is the sha256
    of the concatenated sha256 digests of consecutive n-byte pieces, the last one shorter: what a
    merge writing a zarr child into a bucket records for a tensor of several chunks, each hashed
    by the task that wrote it (tasks run in any order, so none sees the whole tensor in order).
    Readers (export, a store parent) feed any blocks; pieces are cut here.
    """

    def __init__(self, want: str | None = None):
        self.piece = 0
        if isinstance(want, str) and want.startswith(CHUNKED_ALGO + ":"):
            size = want.split(":")[1]
            self.piece = int(size) if size.isdigit() else 0
        self.h = new_hash()
        self.digests: list[bytes] = []
        self.left = self.piece

    def update(self, raw: Any) -> None:
        view = memoryview(raw).cast("B")
        if not self.piece:
            self.h.update(view)
            return
        while len(view):
            take = min(self.left, len(view))
            self.h.update(view[:take])
            view, self.left = view[take:], self.left - take
            if not self.left:
                self.digests.append(self.h.digest())
                self.h, self.left = new_hash(), self.piece

    def checksum(self) -> str:
        if not self.piece:
            return checksum_string(self.h)
        tail = [self.h.digest()] if self.left < self.piece else []
        return chunked_checksum(self.digests + tail, self.piece)
