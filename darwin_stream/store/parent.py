"""Stores as parents: a darwin-stream store (reference JSON or copy) read through zarr, and the
openers the parent pool hands to sources.py, so that sources.py never imports store/.

    open_store_parent(spec, options)   a `StoreParent`, or None when `spec` is not a store
    reference_arrays(parent)           name -> zarr array of a safetensors parent's reference view
    open_source(spec, options)         any parent form, unpooled (ingest's; pool.open_parent opens the same
                                       forms with lazy imports of this module)
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import zarr

from darwin_stream import dtypes
from darwin_stream.errors import SourceError
from darwin_stream.sources import Parent, SafetensorsParent, TensorInfo, numpy_to_tensor
from darwin_stream.sources import open_source as _open_form
from darwin_stream.store import api as store_api
from darwin_stream.store.layout import ROOT_ATTR, store_paths
from darwin_stream.store.reference import reference_view


class StoreParent(Parent):
    """A darwin-stream zarr store (reference JSON or copy) opened as a parent, read through zarr."""

    def __init__(self, spec: str, group: zarr.Group):
        self.spec = spec
        self.group = group
        meta = group.attrs[ROOT_ATTR]
        self._paths: dict[str, str] = {}
        self.tensors = {}
        for name, entry in meta["tensors"].items():  # type: ignore[union-attr]
            code, shape = entry["dtype"], tuple(entry["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtypes.itemsize(code)
            self.tensors[name] = TensorInfo(name, code, shape, spec, 0, nbytes)
            self._paths[name] = entry["path"]
        self._checksums: dict[str, str | None] = {n: e.get("checksum") for n, e in meta["tensors"].items()}  # type: ignore[union-attr]
        self._aux_names: list[str] = list(meta.get("aux", []))  # type: ignore[union-attr]
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
        t, start, stop = self._rows(name, start, stop)
        sel = slice(start, stop) if t.shape else ()
        data = store_api.read_array(self.array(name), sel, f"parent {self.spec}: tensor {name!r}", SourceError)
        if start == 0 and stop == t.rows:  # a whole tensor: check it (a lost chunk reads as zeros)
            store_api.verify_checksum(data, self._checksums.get(name), f"parent {self.spec}: tensor {name!r}")
        return numpy_to_tensor(data, t.dtype)

    def aux_names(self) -> list[str]:
        return list(self._aux_names)

    def read_aux_file(self, name: str) -> bytes | None:
        return store_api.read_aux_file(self.group, name) if name in self._aux_names else None

    def identity_parts(self) -> list:
        """The root index with its per-tensor checksums, and for a local reference store the size
        and mtime_ns of every shard it points into (its checksums may have been skipped at ingest)."""
        meta = dict(self.group.attrs[ROOT_ATTR])  # type: ignore[arg-type]
        shards = []
        local = "://" not in self.spec  # a URL store's credentials are not ours to reuse here: its index decides
        for t in store_api.reference_targets(self.spec) if local else []:
            path = t[len("file://"):] if t.startswith("file://") else t
            try:
                st = os.stat(path) if "://" not in path else None
            except OSError:
                st = None
            shards.append([t, st.st_size if st else None, st.st_mtime_ns if st else None])
        return ["store", [meta, shards]]

    def locations(self) -> set[str]:
        """The store, and the shards a local reference store points into."""
        return {self.spec, *(store_api.reference_targets(self.spec) if "://" not in self.spec else ())}


def open_store_parent(spec: str, storage_options: dict | None, *, probe_options: bool) -> StoreParent | None:
    """`spec` as a store parent, or None when it is no store. A local path is probed without the
    options (they are for remote filesystems), a URL with them."""
    if not store_api.is_store(spec, storage_options=storage_options if probe_options else None):
        return None
    return StoreParent(spec, store_api.open_store(spec, storage_options=storage_options))


def reference_arrays(parent: SafetensorsParent) -> Callable[[str], zarr.Array]:
    """A safetensors parent's tensors as zarr arrays: its reference view, built in memory once."""
    view, paths = reference_view(parent), store_paths(list(parent.tensors))
    return lambda name: view[paths[name]]  # type: ignore[return-value]


def open_source(spec: str | os.PathLike, *, storage_options: dict | None = None) -> Parent:
    """Any parent form, opened afresh (not pooled): what `pool.open_parent` and `ingest` of a spec use."""
    return _open_form(spec, storage_options=storage_options, stores=open_store_parent, view=reference_arrays)
