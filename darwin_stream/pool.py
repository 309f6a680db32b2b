"""The parent pool: one open parent per spec per process, closed at the end.

Planners, the engine, breeding (`engine.iter_tensors`, the score backends) and the CLI get their
parents here, so a merge opens each parent once: before the pool, the planner, the engine and
`api.merge`'s identity check each opened their own (a local parent's headers parsed three times,
a URL parent's listing and headers fetched three times).

    get_parent(spec)     the open parent of `spec` in this process (opened on first use)
    session()            a scope (api.merge, the CLI): parents opened inside are closed when the
                         outermost scope ends, so a changed parent is read afresh by the next run
    ParentPool()         a pool of one's own (a context manager that closes what it opened)
    open_parent(spec)    one parent, afresh and unpooled: for callers that own and close it

Outside any session (a dask.distributed worker, a vLLM worker process, an evolve loop) the
process-level default pool serves: tasks carry parent specs, never open parents, and each worker
process opens a parent once, the first time one of its tasks reads it. `release_default()` closes
the default pool's parents (`engine.run` calls it on every worker when a distributed merge ends).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from darwin_stream import sources
from darwin_stream.sources import Parent, SafetensorsParent


def open_parent(spec: str | os.PathLike, *, storage_options: dict | None = None) -> Parent:
    """Open a parent afresh, outside any pool: a local directory, a darwin-stream store, an fsspec
    URL or a hub repo id (`sources.open_source` says in which order). The caller closes it."""
    return sources.open_source(spec, storage_options=storage_options, stores=_open_store, view=_zarr_view)


def _open_store(spec: str, storage_options: dict | None, *, probe_options: bool) -> Parent | None:
    """`spec` as a store parent, or None. A local directory without a root zarr.json is no store of
    either kind (a reference store is one file), which is answered without importing store/: zarr
    and ml_dtypes were 0.7-1.1 s of the 2.2 s a merge of local parents took to start
    (`python -X importtime`), and such a merge never touches them."""
    if "://" not in spec and os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "zarr.json")):
        return None
    from darwin_stream.store.parent import open_store_parent  # heavy: zarr (see above)

    return open_store_parent(spec, storage_options, probe_options=probe_options)


def _zarr_view(parent: SafetensorsParent) -> Callable[[str], Any]:
    """A safetensors parent's zarr view (store/), built on its first `array()` call."""
    from darwin_stream.store.parent import reference_arrays  # heavy: zarr (see _open_store)

    return reference_arrays(parent)


def _key(spec: str, storage_options: dict | None) -> tuple[str, str]:
    # Every task asks once per input: no JSON for the common case of no options.
    return spec, json.dumps(storage_options, sort_keys=True, default=str) if storage_options else ""


class ParentPool:
    """Open parents by spec (and storage options), each opened once; thread-safe.

    `opened` counts, per spec, how many times this pool has opened it: over a pool's life it stays
    1 per spec unless the pool was closed in between (tests read it on dask workers).
    """

    def __init__(self) -> None:
        self._parents: dict[tuple[str, str], Parent] = {}
        self._lock = threading.Lock()
        self.opened: Counter[str] = Counter()

    def get(self, spec: str | os.PathLike, storage_options: dict | None = None) -> Parent:
        key = _key(os.fspath(spec), storage_options)
        p = self._parents.get(key)
        if p is None:
            with self._lock:  # one opener at a time: two threads never open the same parent twice
                p = self._parents.get(key)
                if p is None:
                    # A copy: botocore rewrites a `config_kwargs.retries` it is given in place
                    # ({"max_attempts": 1} -> {"mode": "legacy", "total_max_attempts": 2}), which
                    # changed this key under the next caller and opened every URL parent twice.
                    opts = copy.deepcopy(storage_options)
                    p = self._parents[key] = open_parent(key[0], storage_options=opts)
                    self.opened[key[0]] += 1
        return p

    def __contains__(self, spec: str) -> bool:
        return any(k[0] == spec for k in self._parents)

    def close(self) -> None:
        """Close every parent; the pool may be used again (it then reopens them)."""
        with self._lock:
            parents, self._parents = self._parents, {}
        for p in parents.values():
            p.close()

    def __enter__(self) -> ParentPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default = ParentPool()
_sessions = 0
_sessions_lock = threading.Lock()


def default() -> ParentPool:
    """This process's pool: the one `get_parent` serves from."""
    return _default


_url_options: dict = {}  # the running merge's storage options, for URL parents asked for without any


def get_parent(spec: str | os.PathLike, storage_options: dict | None = None) -> Parent:
    """The open parent of `spec` in this process, opened on first use. A URL spec asked for
    without options gets the running merge's (`url_options`)."""
    if storage_options is None and _url_options and "://" in os.fspath(spec):
        storage_options = _url_options
    return _default.get(spec, storage_options)


def current_url_options() -> dict:
    """The storage options URL parents are opened with now (`url_options`): tasks carry them."""
    return _url_options


def set_url_options(storage_options: dict | None) -> None:
    """Open URL parents with these options from now on: a task sets its merge's before it reads, so
    a worker process reads each merge's URL parents with that merge's options (one merge at a time)."""
    global _url_options
    _url_options = dict(storage_options or {})


@contextmanager
def url_options(storage_options: dict | None) -> Iterator[None]:
    """A scope (a merge, building its plan) in which URL parents are opened with `storage_options`:
    the run's combined options (`storage.combine`: fsspec's config < the manifest's
    darwin.storage_options < --storage-options), which the planner, the identity check and the
    engine's tasks all read parents through. They are kept here, never in the plan."""
    old = _url_options
    set_url_options(storage_options)
    try:
        yield
    finally:
        set_url_options(old)


def release_default() -> None:
    """Close the process pool's parents: the next `get_parent` opens them afresh."""
    _default.close()


@contextmanager
def session() -> Iterator[ParentPool]:
    """A scope whose parents are closed when the outermost scope ends (scopes nest and may overlap
    across threads). A merge runs in one, so that the next merge in the same process reads a
    parent changed in between as it now is, not through a map of the replaced file."""
    global _sessions
    with _sessions_lock:
        _sessions += 1
    try:
        yield _default
    finally:
        with _sessions_lock:
            _sessions -= 1
            last = _sessions == 0
        if last:
            release_default()
